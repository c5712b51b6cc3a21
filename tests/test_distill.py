"""Distillation (ADPA, DCKD, AlignDistil): chunked full-vocabulary teacher distributions against the
naive full-logits formulas, ADPA's zero at π_dpo = π_ref, memory at a 128k vocabulary, exact
micro-batching and `preftune train adpa` (docs/online.md, Distillation)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from preftune.cli import main
from preftune.config import TrainConfig, validate
from preftune.errors import ConfigError
from preftune.losses.distill_losses import DISTILL_LOSSES
from preftune.method_checks import DISTILL_METHODS
from preftune.models.distill_head import distill_token_losses, nll_token_losses
from preftune.models.logprobs import LogitTransform
from preftune.train.api import train
from preftune.train.distill_step import distill_on_batch
from preftune.train.distributed import World
from preftune.train.loop import Objective
from preftune.types import Example
from test_train_fixtures import pair_rows, tiny_model, write_jsonl

T = LogitTransform(None)


def _heads(vocab: int = 11, hidden: int = 5) -> tuple[list[torch.nn.Linear], list[torch.Tensor]]:
    torch.manual_seed(0)
    heads = [torch.nn.Linear(hidden, vocab, bias=False) for _ in range(3)]
    states = [torch.randn(7, hidden) for _ in range(3)]
    return heads, states


def _naive(rule: str, z: list[torch.Tensor], ratio: float = 1.0) -> torch.Tensor:
    logp = z[0].log_softmax(-1)
    if rule == "advantage":
        return -(logp.exp() * (z[1].log_softmax(-1) - z[2].log_softmax(-1))).sum(-1)
    if rule == "forward_kl":
        q = z[1].log_softmax(-1)
        return (q.exp() * (q - logp)).sum(-1)
    target = z[2] + ratio * (z[1] - z[2]) if rule == "extrapolated" else z[1] + ratio * (z[1] - z[2])
    q = target.log_softmax(-1)
    return (logp.exp() * (logp - q)).sum(-1)  # AlignDistil: KL(π_θ ‖ π*)


@pytest.mark.parametrize("rule", ["advantage", "forward_kl", "extrapolated", "contrastive"])
def test_chunked_losses_and_gradients_equal_the_full_logits_formulas(rule: str) -> None:
    heads, states = _heads()
    h = states[0].clone().requires_grad_(True)
    n = 1 if rule == "forward_kl" else 2
    got = distill_token_losses(
        h, heads[0], states[1 : 1 + n], heads[1 : 1 + n], rule=rule, transforms=[T] * (n + 1),
        ratio=1.7, chunk_tokens=3,
    )  # fmt: skip
    got.sum().backward()
    grads = (h.grad.clone(), heads[0].weight.grad.clone())  # type: ignore[union-attr]
    h.grad, heads[0].weight.grad = None, None
    want = _naive(rule, [head(s) for head, s in zip(heads, [h, *states[1:]])], ratio=1.7)
    want.sum().backward()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grads[0], h.grad)
    torch.testing.assert_close(grads[1], heads[0].weight.grad)
    assert bool((got >= -1e-6).all()) or rule == "advantage"  # KL ≥ 0


def _identity_head(vocab: int) -> torch.nn.Linear:
    head = torch.nn.Linear(vocab, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(vocab))
    return head  # hidden states are the logits


def test_aligndistil_contrastive_teacher_by_hand() -> None:
    """Two tokens, student logits (0, 0), π_dpo (1, 0), the reverse DPO model (0, 1), k = 1:
    z* = z_dpo + k(z_dpo − z_dpo⁻) = (2, −1), so π* = (1, e⁻³)/(1 + e⁻³) and
    KL(π_θ ‖ π*) = Σ ½(log ½ − log π*) = −log 2 + log(1 + e⁻³) + 3/2 = 0.855440..."""
    head = _identity_head(2)
    student, dpo, reverse = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    loss = distill_token_losses(student, head, [dpo, reverse], [head, head], rule="contrastive",
                                transforms=[T] * 3, ratio=1.0)  # fmt: skip
    want = -math.log(2) + math.log(1 + math.exp(-3)) + 1.5
    assert loss.item() == pytest.approx(want, abs=1e-6) and want == pytest.approx(0.855440, abs=1e-6)
    # Theorem 1's teacher on the same numbers with π_ref = (0, 1): z* = z_ref + k(z_dpo − z_ref) = (1, 0)
    plain = distill_token_losses(student, head, [dpo, reverse], [head, head], rule="extrapolated",
                                 transforms=[T] * 3, ratio=1.0)  # fmt: skip
    assert plain.item() == pytest.approx(-math.log(2) + math.log(1 + math.exp(-1)) + 0.5, abs=1e-6)


def test_aligndistil_contrastive_teacher_is_the_dpo_model_at_k_0_or_without_contrast() -> None:
    """k = 0, or a reverse model equal to the DPO model (z_dpo − z_dpo⁻ = 0 exactly): π* = π_dpo, and
    the loss is the reverse KL to π_dpo, the same numbers as Theorem 1's teacher at k = 1."""
    heads, states = _heads()
    zero = distill_token_losses(states[0], heads[0], states[1:], heads[1:], rule="contrastive",
                                transforms=[T] * 3, ratio=0.0)  # fmt: skip
    same = distill_token_losses(states[0], heads[0], [states[1], states[1]], [heads[1], heads[1]],
                                rule="contrastive", transforms=[T] * 3, ratio=2.5)  # fmt: skip
    assert torch.equal(zero, same)
    logp, q = heads[0](states[0]).log_softmax(-1), heads[1](states[1]).log_softmax(-1)
    torch.testing.assert_close(zero, (logp.exp() * (logp - q)).sum(-1).detach())
    theorem1 = distill_token_losses(states[0], heads[0], states[1:], heads[1:], rule="extrapolated",
                                    transforms=[T] * 3, ratio=1.0)  # fmt: skip
    torch.testing.assert_close(zero, theorem1)


def test_adpa_is_exactly_zero_when_the_teacher_equals_its_reference() -> None:
    heads, states = _heads()
    h = states[0].clone().requires_grad_(True)
    loss = distill_token_losses(h, heads[0], [states[1], states[1]], [heads[1], heads[1]], rule="advantage",
                                transforms=[T] * 3, chunk_tokens=2)  # fmt: skip
    assert loss.abs().max().item() == 0.0
    loss.sum().backward()
    assert h.grad is not None and h.grad.abs().max().item() == 0.0


def test_nll_term_is_the_cross_entropy_of_the_data_tokens_in_any_chunking() -> None:
    heads, states = _heads()
    targets = torch.tensor([3, 0, 10, 7, 7, 1, 5])
    h = states[0].clone().requires_grad_(True)
    got = nll_token_losses(h, heads[0], targets, transform=T, chunk_tokens=3)
    want = torch.nn.functional.cross_entropy(heads[0](states[0]), targets, reduction="none")
    torch.testing.assert_close(got, want.detach())
    got.sum().backward()
    ref = states[0].clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(heads[0](ref), targets, reduction="sum").backward()
    assert h.grad is not None and ref.grad is not None
    torch.testing.assert_close(h.grad, ref.grad)
    with pytest.raises(ConfigError, match="one token per position"):
        nll_token_losses(h, heads[0], targets[:3], transform=T)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distill")
    out = {
        "student": tiny_model(root / "student", seed=1, hidden_size=16),
        "teacher": tiny_model(root / "teacher", seed=2),
        "teacher_copy": tiny_model(root / "teacher_copy", seed=2),
        "ref": tiny_model(root / "ref", seed=3),
    }
    out["data"] = write_jsonl(root / "prefs.jsonl", pair_rows(12))
    return out


def _examples(tok: Any) -> list[Example]:
    rows = pair_rows(6)
    return [
        Example(
            tok(r["prompt"]).input_ids,
            [tok(r["chosen"]).input_ids, tok(r["rejected"]).input_ids],
            source_row=i,
        )
        for i, r in enumerate(rows)
    ]


def _objective(text: str, teachers: tuple[Any, Any], **hp: Any) -> Objective:
    terms = [(DISTILL_LOSSES[n], 1.0, DISTILL_LOSSES[n].validate(hp.get(n, {}))) for n in text.split(",")]
    return Objective(terms, "distill", teachers=teachers)


def test_adpa_step_is_zero_with_identical_teachers_and_exact_across_micro_batches(
    models: dict[str, Path],
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load = AutoModelForCausalLM.from_pretrained
    student, tok = load(models["student"]), AutoTokenizer.from_pretrained(models["student"])
    batch = _examples(tok)
    same = (load(models["teacher"]).eval(), load(models["teacher_copy"]).eval())  # equal weights, two models
    sums = distill_on_batch(student, batch, objective=_objective("adpa", same), world=World(),
                            micro_batch_size=2, backward=True)  # fmt: skip
    assert sums.result()["loss"] == 0.0
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in student.parameters())
    teachers = (load(models["teacher"]).eval(), load(models["ref"]).eval())
    grads, losses = [], []
    for micro in (6, 4, 1):
        student.zero_grad()
        out = distill_on_batch(student, batch, objective=_objective("dckd,adpa", teachers), world=World(),
                               micro_batch_size=micro, backward=True)  # fmt: skip
        losses.append(out.result()["loss"])
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None]))
    assert losses[0] != 0.0
    for loss, grad in zip(losses[1:], grads[1:]):
        assert loss == pytest.approx(losses[0], abs=1e-6)
        torch.testing.assert_close(grad, grads[0], atol=1e-6, rtol=1e-5)


def test_nll_term_in_a_distillation_step_is_the_chosen_responses_token_mean_nll(
    models: dict[str, Path],
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load = AutoModelForCausalLM.from_pretrained
    student, tok = load(models["student"]).eval(), AutoTokenizer.from_pretrained(models["student"])
    batch = _examples(tok)
    teachers = (load(models["teacher"]).eval(), load(models["ref"]).eval())
    out = distill_on_batch(student, batch, objective=_objective("adpa,nll", teachers), world=World(),
                           micro_batch_size=4, backward=False).result()  # fmt: skip
    total, count = 0.0, 0
    with torch.no_grad():
        for e in batch:
            ids = list(e.prompt_ids) + list(e.response_ids[0])
            logp = student(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
            n = len(e.response_ids[0])
            total -= float(logp[-n:].gather(-1, torch.tensor(ids[-n:])[:, None]).sum())
            count += n
    assert out["loss/nll"] == pytest.approx(total / count, rel=1e-5)
    assert out["loss"] == pytest.approx(out["loss/adpa"] + out["loss/nll"], rel=1e-6)


def _peak_bytes(fn: Any) -> int:
    from test_models_logprobs import _peak_bytes as peak

    return int(peak(fn))


def test_chunked_teacher_distributions_peak_memory_at_128k_vocab() -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    vocab = 128_000

    def model(seed: int) -> Any:
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
        return AutoModelForCausalLM.from_config(config)

    student, teacher, ref = model(0), model(1).eval(), model(2).eval()
    g = torch.Generator().manual_seed(0)
    batch = [
        Example(torch.randint(3, vocab, (8,), generator=g).tolist(),
                [torch.randint(3, vocab, (32,), generator=g).tolist() for _ in range(2)], source_row=i)
        for i in range(4)
    ]  # fmt: skip
    objective = _objective("adpa", (teacher, ref), adpa={"on": "both"})

    def chunked() -> None:
        distill_on_batch(
            student, batch, objective=objective, world=World(), micro_batch_size=4, backward=True
        )

    def full_logits() -> None:  # every model's [rows, T, V] logits, then the loss
        ids = torch.tensor([e.prompt_ids + r for e in batch for r in e.response_ids])
        logp = student(input_ids=ids).logits.float().log_softmax(-1)[:, 7:-1]
        with torch.no_grad():
            adv = teacher(input_ids=ids).logits.float().log_softmax(-1)[:, 7:-1]
            adv -= ref(input_ids=ids).logits.float().log_softmax(-1)[:, 7:-1]
        (-(logp.exp() * adv).sum(-1).mean()).backward()

    student.zero_grad(set_to_none=False)
    ratio = _peak_bytes(chunked) / _peak_bytes(full_logits)
    print(f"distillation chunked / full-logits peak memory at vocab 128k: {ratio:.3f}")
    assert ratio <= 0.25


def test_train_adpa_command_and_config_checks(models: dict[str, Path], tmp_path: Path) -> None:
    assert set(DISTILL_METHODS) == set(DISTILL_LOSSES) - {"nll"}  # nll: a term next to one, not a method
    args = [
        "train", "adpa", "--model", str(models["student"]), "--teacher", str(models["teacher"]),
        "--teacher-ref", str(models["ref"]), "--data", str(models["data"]), "--max-steps", "2",
        "--batch-size", "4", "--no-progress", "--no-report", "--out", str(tmp_path / "adpa"),
    ]  # fmt: skip
    assert main(args) == 0
    assert (tmp_path / "adpa" / "final" / "model.safetensors").is_file()
    base = {"model": "m", "data": "d", "out": "o"}
    with pytest.raises(ConfigError, match="'adpa' needs 'teacher_ref'"):
        validate(TrainConfig(method="adpa", teacher="t", **base))
    with pytest.raises(ConfigError, match="method 'dckd' needs 'teacher'"):
        validate(TrainConfig(method="dckd", **base))
    with pytest.raises(ConfigError, match="teacher / teacher_ref are for distillation"):
        validate(TrainConfig(method="dpo", teacher="t", **base))
    assert validate(TrainConfig(method="dckd", teacher="t", **base))[0][2] == {"on": "both"}
    assert (
        validate(
            TrainConfig(method="aligndistil", teacher="t", teacher_ref="r", hparams={"ratio": 2}, **base)
        )[0][2]["ratio"]
        == 2.0
    )
    reverse = TrainConfig(
        method="aligndistil", teacher="t", teacher_ref="r", hparams={"contrast": "reverse"}, **base
    )
    assert validate(reverse)[0][2] == {"ratio": 1.0, "contrast": "reverse", "on": "chosen"}
    with pytest.raises(ConfigError, match="contrast"):
        validate(
            TrainConfig(method="aligndistil", teacher="t", teacher_ref="r", hparams={"contrast": "x"}, **base)
        )


def test_a_teacher_with_another_tokenizer_or_vocabulary_is_refused_before_any_forward(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """The teacher's distributions are indexed by its own token ids: a permuted tokenizer of the same
    size used to train silently on wrongly indexed targets, a smaller vocabulary crashed with an index
    error inside the teacher's embedding."""
    from preftune.data.char_tokenizer import build_char_tokenizer
    from preftune.models.tiny import save_tiny_model
    from test_train_fixtures import ALPHABET

    swapped = ALPHABET.replace("0", "#").replace("1", "0").replace("#", "1")
    permuted = save_tiny_model(
        "llama", tmp_path / "permuted", vocab_size=48, tokenizer=build_char_tokenizer(swapped), seed=2
    )
    small = save_tiny_model("llama", tmp_path / "small", vocab_size=40, seed=2)

    def run(teacher: Path) -> str:
        config = TrainConfig(
            method="dckd", model=str(models["student"]), teacher=str(teacher), data=str(models["data"]),
            out=str(tmp_path / f"out-{teacher.name}"), max_steps=1, batch_size=4, progress=False,
            report=False,
        )  # fmt: skip
        with pytest.raises(ConfigError) as err:
            train(config)
        assert not (tmp_path / f"out-{teacher.name}" / "checkpoints").exists()
        return str(err.value)

    text = run(permuted)
    assert "teacher" in text and "tokenizes differently" in text and str(permuted) in text
    assert "2 tokens have other ids" in text and "'0' is" in text  # '0' and '1' exchanged
    text = run(small)
    assert f"teacher '{small}' has a vocabulary of 40 tokens" in text and "48" in text
