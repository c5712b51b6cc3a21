"""Online methods that turn scored samples into offline examples (rl/builders.py): RAFT, CoPG, online
DPO, DNO, XPO — each method's defining identity on tiny models (docs/online.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from online_fixtures import crash_in_call, digits_reward, online_root
from preftune.cli import main
from preftune.config import TrainConfig, config_to_dict, validate
from preftune.errors import ConfigError
from preftune.losses import REGISTRY
from preftune.reward import load_reward
from preftune.rl.builders import all_pairs, best_of_k, best_worst, cut_at_divergence
from preftune.rl.phase import OnlinePhase
from preftune.rl.prompts import load_prompts
from preftune.rl.sampling import Sampling
from preftune.train.distributed import World
from preftune.train.loop import Objective, objective_on_batch
from preftune.types import PreferenceBatch


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return online_root(tmp_path_factory, "opairs", teacher=True)


def test_best_worst_keeps_exactly_the_pairs_with_margin_above_the_threshold() -> None:
    """DNO's filter: best vs worst of each pool (first index on ties), kept iff r_best − r_worst > margin."""
    pools = [[0.2, 0.9, 0.1], [0.5, 0.5], [0.0, 0.4, 0.4, 0.1], [1.0, 0.0, 1.0, 0.0]]
    assert [best_worst(v, 0.3) for v in pools] == [(1, 2), None, (1, 0), (0, 1)]
    assert [best_worst(v, 0.4) for v in pools] == [(1, 2), None, None, (0, 1)]  # 0.4 is not > 0.4
    assert [best_worst(v) for v in pools] == [(1, 2), None, (1, 0), (0, 1)]  # online DPO: any margin
    for margin in (0.0, 0.35, 0.75, 0.95):
        kept = [i for i, v in enumerate(pools) if best_worst(v, margin) is not None]
        assert kept == [i for i, v in enumerate(pools) if max(v) - min(v) > margin]


def test_all_pairs_are_every_distinct_better_worse_pair_above_the_margin() -> None:
    """`pairing all`: each (i, j) with r_i − r_j > margin, better first in sample order; a response
    repeated in the pool counts once (its first copy), so no pair is trained twice."""
    distinct = [[1], [2], [3], [4]]
    assert all_pairs([1.0, 0.0, 1.0, 0.0], distinct) == [(0, 1), (0, 3), (2, 1), (2, 3)]  # k(G − k) = 4
    assert all_pairs([1.0, 0.0, 1.0, 0.0], [[1], [2], [1], [2]]) == [(0, 1)]  # copies of 0 and 1
    assert all_pairs([0.5, 0.5], [[1], [2]]) == []  # a tie is no pair
    assert all_pairs([0.2, 0.9, 0.1], [[1], [2], [3]]) == [(0, 2), (1, 0), (1, 2)]
    assert all_pairs([0.2, 0.9, 0.1], [[1], [2], [3]], margin=0.3) == [(1, 0), (1, 2)]
    for values in (
        [0.0, 0.4, 0.4, 0.1],
        [1.0, 0.0, 1.0, 0.0],
        [0.3, 0.3, 0.3],
    ):  # best vs worst is one of them
        one, every = best_worst(values), all_pairs(values, distinct[: len(values)])
        assert (one in every) if one else not every


def test_cut_at_divergence_keeps_the_rejected_through_its_first_differing_token() -> None:
    eos = 9
    assert cut_at_divergence([1, 2, 3, eos], [1, 2, 4, 5, 6, eos]) == [1, 2, 4]  # the mistake, then stop
    assert cut_at_divergence([1, 2, 3, eos], [7, 2, 3, eos]) == [7]  # wrong from the first token
    assert cut_at_divergence([1, 2, 3, eos], [1, 2, eos]) == [1, 2, eos]  # early EOS is its mistake
    assert cut_at_divergence([1, 2, eos], [1, 2, 3, 4, eos]) == [1, 2, 3]  # runs on past the answer
    assert cut_at_divergence([1, 2, 3, eos], [1, 2]) == [1, 2]  # a strict prefix stays whole


def test_cut_rejected_ends_each_pair_s_rejected_at_its_divergence(root: Path) -> None:
    """`cut_rejected`: the same samples and pairs as without it (same seed), each rejected response
    ended at its first token that differs from the chosen one; the chosen responses unchanged."""
    for builder in ("best_worst", "dno"):
        whole, _ = _phase(root, builder)
        cut, _ = _phase(root, builder, cut_rejected=True)
        pairs, cut_pairs = whole.batch(0), cut.batch(0)
        assert pairs and len(cut_pairs) == len(pairs)
        for e, c in zip(pairs, cut_pairs):
            chosen, rejected = e.response_ids
            k = next(i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b)  # they differ
            assert c.response_ids == [chosen, rejected[: k + 1]] and c.prompt_ids == e.prompt_ids
        assert any(len(c.response_ids[1]) < len(e.response_ids[1]) for e, c in zip(pairs, cut_pairs))


def test_pairing_all_trains_every_better_worse_pair_of_each_prompt(root: Path) -> None:
    """The same samples as best vs worst (same seed): each prompt's best-vs-worst pair is among its
    pairs, every pair's chosen response out-scores its rejected one, no pair repeats; XPO's ỹ is drawn
    once per prompt and shared by that prompt's pairs."""
    one, _ = _phase(root, "best_worst")
    every, _ = _phase(root, "best_worst", pairing="all")
    pairs, all_of = one.batch(0), every.batch(0)
    assert len(all_of) > len(pairs) and every.metrics["pairs"] == len(all_of) / 4
    score = {e.source_row: e for e in pairs}
    for e in pairs:
        assert e in all_of
    tok = every.tokenizer
    texts = [[tok.decode(r, skip_special_tokens=True) for r in e.response_ids] for e in all_of]
    assert all(digits_reward([], [c])[0] > digits_reward([], [r])[0] for c, r in texts)
    keys = [(e.source_row, tuple(e.response_ids[0]), tuple(e.response_ids[1])) for e in all_of]
    assert len(set(keys)) == len(keys) and set(score) <= {e.source_row for e in all_of}
    xpo, model = _phase(root, "xpo", pairing="all")
    xpo.reference = SimpleNamespace(model=model)  # a frozen copy serves as π_ref
    explore: dict[int, list[int]] = {}
    for e in xpo.batch(0):
        assert (
            len(e.response_ids) == 3
            and explore.setdefault(e.source_row, e.response_ids[2]) == e.response_ids[2]
        )
    assert len(explore) == len({e.source_row for e in all_of})


def test_best_of_k_keeps_the_best_above_min_reward() -> None:
    assert best_of_k([0.0, 1.0, 0.5, 1.0], 1, None) == [1]  # RAFT: the first best
    assert best_of_k([0.0, 1.0, 0.5, 1.0], 2, None) == [1, 3]
    assert best_of_k([0.0, 1.0, 0.5, 1.0], 0, 1.0) == [1, 3]  # every correct sample
    assert best_of_k([0.0, 0.0], 1, 1.0) == []  # a prompt with no sample good enough


def _pair_batch(scores: list[list[float]], pol: list[list[float]], ref: list[list[float]]) -> Any:
    policy = torch.tensor(pol, requires_grad=True)
    batch = PreferenceBatch(
        policy_logps=policy,
        lengths=torch.full(policy.shape, 3),
        ref_logps=torch.tensor(ref),
        scores=torch.tensor(scores),
    )
    return batch, policy


def test_copg_loss_of_a_hand_made_pair_and_group() -> None:
    """(r_1 − βρ_1 − r_2 + βρ_2)², and for K = 3 the sum of the 3 pairs over K − 1 = 2; its gradient
    −2β(R_β(y) − R_β(y′)) on log π_θ(y)."""
    copg = REGISTRY["copg_loss"]
    batch, policy = _pair_batch([[1.0, 0.0]], [[-2.0, -3.0]], [[-2.5, -2.0]])  # ρ = 0.5, −1
    out = copg(batch, {}, beta=0.2)
    hand = (1.0 - 0.2 * 0.5 - 0.0 + 0.2 * -1.0) ** 2  # (1 − 0.1 − 0.2)² = 0.49
    assert out.losses.item() == pytest.approx(hand, abs=1e-6)
    out.losses.sum().backward()
    assert policy.grad[0, 0].item() == pytest.approx(-2 * 0.2 * 0.7, abs=1e-6)
    assert policy.grad[0, 1].item() == pytest.approx(2 * 0.2 * 0.7, abs=1e-6)
    batch, _ = _pair_batch([[1.0, 0.5, 0.0]], [[-1.0, -1.0, -1.0]], [[-1.0, -1.0, -1.0]])
    assert copg(batch, {}, beta=0.2).losses.item() == pytest.approx((0.25 + 1.0 + 0.25) / 2, abs=1e-6)
    # with r_w − r_l = ½ it is β² × IPO's (h − 1/(2β))²
    batch, _ = _pair_batch([[0.5, 0.0]], [[-1.0, -2.0]], [[-1.2, -1.5]])
    ipo = REGISTRY["ipo"](
        _pair_batch([[0.5, 0.0]], [[-1.0, -2.0]], [[-1.2, -1.5]])[0], {}, beta=0.2, token_mean=False
    )
    assert copg(batch, {}, beta=0.2).losses.item() == pytest.approx(0.04 * ipo.losses.item(), rel=1e-5)


def test_xpo_loss_is_dpo_plus_alpha_log_prob_of_the_reference_sample() -> None:
    batch, _ = _pair_batch([[0.0] * 3], [[-2.0, -3.0, -7.0]], [[-2.5, -2.0, -6.0]])
    h = 0.5 - (-1.0)
    out = REGISTRY["xpo_loss"](batch, {}, beta=0.1, alpha=0.01)
    assert out.losses.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.1 * h))) + 0.01 * -7.0, abs=1e-6)
    two, _ = _pair_batch([[0.0] * 2], [[-2.0, -3.0]], [[-2.5, -2.0]])
    assert REGISTRY["xpo_loss"](two, {}, alpha=0.01).losses.item() == REGISTRY["dpo"](two, {}).losses.item()


def _phase(root: Path, builder: str, reward: Any = digits_reward, **hp: Any) -> tuple[OnlinePhase, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(root / "model")
    tok = AutoTokenizer.from_pretrained(root / "model")
    phase = OnlinePhase(
        0, load_prompts(str(root / "prompts.jsonl"), tok), 2, 4, 0, load_reward(reward), tok, "", 4,
        Sampling(max_new_tokens=5), builder=builder, builder_hparams=hp,
    )  # fmt: skip
    phase.attach(model)
    return phase, model


def test_raft_sft_loss_on_the_kept_samples_equals_the_hand_computed_nll(root: Path) -> None:
    """RAFT: the best sample of each prompt (unpaired, label 1); `sft` = Σ −log π over their tokens
    divided by their token count, computed here by a plain forward of each prompt + response."""
    phase, model = _phase(root, "best_of_k", keep=1, min_reward=None)
    batch = phase.batch(0)
    assert len(batch) == 4 and all(e.kind == "unpaired" and len(e.response_ids) == 1 for e in batch)
    assert phase.metrics["kept"] == pytest.approx(4 / 16)
    sft = REGISTRY["sft"]
    sums = objective_on_batch(
        model, batch, objective=Objective([(sft, 1.0, {})], "any"), reference=None, loss_state={},
        world=World(), micro_batch_size=3, backward=False,
    ).result()  # fmt: skip
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for e in batch:
            ids = torch.tensor([e.prompt_ids + e.response_ids[0]])
            logp = model(ids).logits.float().log_softmax(-1)[0, :-1].gather(1, ids[0, 1:, None])[:, 0]
            nll -= float(logp[len(e.prompt_ids) - 1 :].sum())
            tokens += len(e.response_ids[0])
    assert sums["loss"] == pytest.approx(nll / tokens, rel=1e-5)


def test_dno_puts_the_teacher_in_the_pool_and_filters_by_margin(root: Path) -> None:
    """The teacher response (the `teacher` column, 9 × the sum: more digits than 5 sampled tokens hold) is scored with the
    samples; a prompt whose best − worst ≤ margin gives no pair."""
    phase, _ = _phase(root, "dno", margin=0.0)
    batch = phase.batch(0)
    tok = phase.tokenizer
    teachers = [
        tok(r.columns["teacher"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        for r in phase.prompts
    ]
    assert batch and all(e.response_ids[0] in teachers for e in batch)  # the teacher wins each pool
    assert phase.metrics["teacher_chosen"] == 1.0 and phase.metrics["pairs"] == len(batch) / 4
    strict, _ = _phase(root, "dno", margin=100.0)
    assert strict.batch(0) == [] and strict.metrics["pairs"] == 0.0


def _train(root: Path, method: str, out: str, *extra: str) -> dict[str, torch.Tensor]:
    args = [
        "train", method, "--model", str(root / "model"), "--prompts", str(root / "prompts.jsonl"),
        "--reward", f"{root / 'rewards.py'}:digits", "--num-generations", "4", "--batch-size", "4",
        "--max-completion-length", "5", "--max-steps", "2", "--lr", "3e-3", "--no-progress", "--no-report",
        "--out", str(root / out), *extra,
    ]  # fmt: skip
    assert main(args) == 0
    return load_file(str(root / out / "final" / "model.safetensors"))


def test_xpo_with_alpha_zero_equals_online_dpo(root: Path) -> None:
    """Same samples, same pairs, the bonus 0: the weights after two steps equal online DPO's bit for
    bit. With a tiny α the third branch ỹ ~ π_ref is drawn and trained on: the same losses to float
    rounding (one more branch in the packed row); with α = 1 the weights move away."""
    dpo = _train(root, "online_dpo", "odpo")
    xpo0 = _train(root, "xpo", "xpo0", "--alpha", "0")
    _train(root, "xpo", "xpo_tiny", "--alpha", "1e-12")
    xpo1 = _train(root, "xpo", "xpo1", "--alpha", "1")
    start = load_file(str(root / "model" / "model.safetensors"))
    assert any(not torch.equal(dpo[k], start[k]) for k in dpo)
    for k in dpo:
        assert torch.equal(xpo0[k], dpo[k]), k
    assert any(not torch.allclose(xpo1[k], dpo[k]) for k in dpo)

    def rows(run: str) -> list[dict[str, float]]:
        return [json.loads(line) for line in (root / run / "metrics.jsonl").read_text().splitlines()]

    assert [r["loss"] for r in rows("xpo_tiny")] == pytest.approx([r["loss"] for r in rows("odpo")], abs=1e-6)
    assert all(r["pairs"] > 0 and r["xpo/logps_explore"] < 0 for r in rows("xpo_tiny"))
    assert all("xpo/logps_explore" not in r for r in rows("xpo0"))  # α = 0: no ỹ drawn


def test_a_step_without_pairs_is_skipped(root: Path) -> None:
    """A constant reward gives no pair: the step leaves the weights as they were and logs skipped 1."""
    args = [
        "train", "online_dpo", "--model", str(root / "model"), "--prompts", str(root / "prompts.jsonl"),
        "--reward", f"{root / 'rewards.py'}:constant", "--num-generations", "2", "--batch-size", "2",
        "--max-completion-length", "3", "--max-steps", "1", "--no-progress", "--no-report",
        "--out", str(root / "flat"),
    ]  # fmt: skip
    assert main(args) == 0
    start = load_file(str(root / "model" / "model.safetensors"))
    final = load_file(str(root / "flat" / "final" / "model.safetensors"))
    assert all(torch.equal(final[k], start[k]) for k in start)
    row = json.loads((root / "flat" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["skipped"] == 1.0 and row["pairs"] == 0.0


def _config(**kw: Any) -> TrainConfig:
    base = {"method": "online_dpo", "model": "m", "prompts": "p.jsonl", "reward": "arithmetic", "out": "o"}
    return TrainConfig(**{**base, **kw})


def test_presets_and_their_objective_checks() -> None:
    assert [s.name for s, _, _ in validate(_config(method="raft"))] == ["sft"]
    assert [s.name for s, _, _ in validate(_config(method="raft_pp"))] == ["ppo_clip"]
    assert [s.name for s, _, _ in validate(_config(method="copg"))] == ["copg_loss"]
    dno = _config(method="dno", hparams={"margin": 0.5})
    assert [s.name for s, _, _ in validate(dno)] == ["dpo"]
    assert config_to_dict(dno, validate(dno))["hparams"] == {
        "beta": 0.1,
        "wpo_weighting": False,
        "margin": 0.5,
        "cut_rejected": False,
        "pairing": "best_worst",
    }  # kept in config.yaml
    cut = _config(hparams={"cut_rejected": "true"})  # as the command line gives it (--cut-rejected)
    assert config_to_dict(cut, validate(cut))["hparams"] == {
        "beta": 0.1,
        "wpo_weighting": False,
        "cut_rejected": True,
        "pairing": "best_worst",
    }
    with pytest.raises(ConfigError, match="pairing"):
        validate(_config(hparams={"pairing": "every"}))
    with pytest.raises(ConfigError, match="cut_rejected"):
        validate(_config(method="grpo", hparams={"cut_rejected": True}))
    assert validate(_config(method="xpo", hparams={"alpha": 0.1}))[0][2]["alpha"] == 0.1
    assert validate(_config(objective="ipo", hparams={"beta": 0.5}))[0][2]["beta"] == 0.5
    with pytest.raises(ConfigError, match="makes pairwise examples of its samples, but objective 'kto'"):
        validate(_config(objective="kto"))
    with pytest.raises(ConfigError, match="unknown option 'margn'.*did you mean 'margin'"):
        validate(_config(method="dno", hparams={"margn": 0.5}))


def test_xpo_stopped_then_resumed_equals_uninterrupted(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pairs and ỹ ~ π_ref of a step depend on (seed, step) only: a run killed in step 3 and
    resumed from its step-2 checkpoint ends with the uninterrupted run's weights."""
    whole = _train(root, "xpo", "xw", "--alpha", "0.1", "--max-steps", "4", "--save-every", "2")
    crash_in_call(
        monkeypatch,
        3,
        lambda: _train(root, "xpo", "xs", "--alpha", "0.1", "--max-steps", "4", "--save-every", "2"),
    )
    resumed = _train(root, "xpo", "xs", "--alpha", "0.1", "--max-steps", "4", "--save-every", "2", "--resume")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
