"""generate(): batched KV-cache decoding equals a plain argmax loop, seeded sampling is reproducible,
rows stop at EOS, and nucleus filtering keeps exactly the smallest top-p set."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from preftune.errors import ConfigError
from preftune.generation import generate, sample_next

VOCAB = 40


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    m = LlamaForCausalLM(cfg)
    # Sharpen the output layer so sampling and greedy differ clearly from uniform noise.
    with torch.no_grad():
        m.lm_head.weight.mul_(8.0)
    return m.eval()


PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [20], [8, 30, 31, 4, 4]]


def argmax_no_cache(model: LlamaForCausalLM, prompt: list[int], n: int, eos: int | None) -> list[int]:
    """Reference: re-run the whole sequence each step, take the argmax of the last position."""
    seq = list(prompt)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            tok = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            out.append(tok)
            seq.append(tok)
            if tok == eos:
                break
    return out


def test_greedy_batched_with_left_padding_equals_argmax_loop_without_cache(model) -> None:
    ref = [argmax_no_cache(model, p, 12, eos=None) for p in PROMPTS]
    # EOS id outside the vocabulary: never emitted, so every row runs the full 12 tokens.
    for batch_size in (1, 3, 4):
        got = generate(model, VOCAB + 1, PROMPTS, max_new_tokens=12, temperature=0, batch_size=batch_size)
        assert [g[0] for g in got] == ref


def test_rows_stop_at_eos_and_keep_it(model) -> None:
    free = argmax_no_cache(model, PROMPTS[1], 12, eos=None)
    # Pick as EOS the first token that appears in the free run at position ≥ 2 for the first time.
    k = next(i for i in range(2, len(free)) if free[i] not in free[:i])
    eos = free[k]
    got = generate(model, eos, PROMPTS, max_new_tokens=12, temperature=0, batch_size=4)
    assert got[1][0] == free[: k + 1]
    for p, g in zip(PROMPTS, got):
        assert g[0] == argmax_no_cache(model, p, 12, eos=eos)
        assert eos not in g[0][:-1]


def test_seeded_sampling_is_reproducible_and_shaped(model) -> None:
    kw = dict(num_samples=3, max_new_tokens=10, temperature=1.0, batch_size=5)
    a = generate(model, VOCAB + 1, PROMPTS, seed=7, **kw)
    b = generate(model, VOCAB + 1, PROMPTS, seed=7, **kw)
    c = generate(model, VOCAB + 1, PROMPTS, seed=8, **kw)
    assert a == b and a != c
    assert [len(x) for x in a] == [3] * len(PROMPTS)
    assert all(len(s) == 10 for x in a for s in x)
    # Samples of one prompt differ from each other (sharp but not one-hot distributions).
    assert any(len({tuple(s) for s in x}) > 1 for x in a)


def test_tiny_top_p_is_greedy_and_mode_is_restored(model) -> None:
    model.train()
    greedy = generate(model, VOCAB + 1, PROMPTS, max_new_tokens=8, temperature=0)
    nucleus = generate(model, VOCAB + 1, PROMPTS, max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=1)
    assert nucleus == greedy
    assert model.training
    model.eval()


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    # probs [0.5, 0.3, 0.2]: with p = 0.7 the set {0, 1} (0.8 ≥ 0.7) is kept, renormalised to
    # [0.625, 0.375]; token 2 is never drawn. With p = 0.5 only token 0 remains.
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, temperature=1.0, top_p=0.7, generator=g)
    assert int((draws == 2).sum()) == 0
    assert abs(float((draws == 0).float().mean()) - 0.625) < 0.015
    assert bool((sample_next(logits, temperature=1.0, top_p=0.5, generator=g) == 0).all())
    # Temperature 2 flattens [0.5, 0.3, 0.2] to ∝ sqrt: P(0) = √.5 / (√.5 + √.3 + √.2).
    draws = sample_next(logits, temperature=2.0, top_p=1.0, generator=g)
    expected = 0.5**0.5 / (0.5**0.5 + 0.3**0.5 + 0.2**0.5)
    assert abs(float((draws == 0).float().mean()) - expected) < 0.015


def test_bad_arguments(model) -> None:
    with pytest.raises(ConfigError):
        generate(model, 2, [[1]], max_new_tokens=4, temperature=-1)
    with pytest.raises(ConfigError):
        generate(model, 2, [[1]], max_new_tokens=4, top_p=0)
    with pytest.raises(ConfigError):
        generate(model, 2, [[]], max_new_tokens=4)
