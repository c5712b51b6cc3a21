"""Pairs that share a prompt share its tokens: `build_packed(merge_prompts=True)` lays a prompt out once
per unit and each distinct response once, and the log-probs and gradients still equal separate forwards."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from preftune.models.load import load_causal_lm
from preftune.models.logprobs import sequence_logps
from preftune.models.packing import build_packed
from preftune.models.tiny import save_tiny_model

VOCAB = 96

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return save_tiny_model(
        "llama", root / "llama", vocab_size=VOCAB, config_overrides={"initializer_range": 0.3}
    )


def _all_pairs(seed: int = 0, k: int = 4, prompts: int = 2):
    """Every pair of k responses to each prompt, as separate pairwise examples (UltraFeedback-style)."""
    rng = random.Random(seed)
    out_p, out_b = [], []
    for _ in range(prompts):
        p = [1] + [rng.randrange(3, VOCAB) for _ in range(rng.randrange(20, 30))]
        resp = [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(2, 9))] for _ in range(k)]
        for i, j in itertools.combinations(range(k), 2):
            out_p.append(list(p))
            out_b.append([resp[i], resp[j]])
    return out_p, out_b


def test_merged_layout_holds_each_prompt_and_distinct_response_once():
    prompts, branches = _all_pairs()
    plain = build_packed(prompts, branches, max_tokens_per_row=10_000)
    merged = build_packed(prompts, branches, max_tokens_per_row=10_000, merge_prompts=True)
    distinct = {(tuple(p), tuple(b)) for p, bs in zip(prompts, branches) for b in bs}
    prompt_tokens = sum(len(p) for p in {tuple(p) for p in prompts})
    assert len({tuple(p) for p in prompts}) == 2 and len(distinct) == 8
    assert merged.num_tokens == prompt_tokens + sum(len(b) for _, b in distinct)
    assert plain.num_tokens == sum(len(p) + len(a) + len(b) for p, (a, b) in zip(prompts, branches))
    # the same tokens are scored for the same sequences, in the flat numbering
    assert torch.equal(merged.targets.sort().values, plain.targets.sort().values)
    assert torch.equal(merged.lengths, plain.lengths)
    order = lambda b: sorted(zip(b.seq_index.tolist(), b.tok_index.tolist(), b.targets.tolist()))  # noqa: E731
    assert order(merged) == order(plain)


def test_merged_units_never_outgrow_the_row_budget():
    prompts, branches = _all_pairs(k=6)
    budget = max(len(p) + sum(map(len, bs)) for p, bs in zip(prompts, branches))  # the unmerged default
    merged = build_packed(prompts, branches, merge_prompts=True)
    assert merged.input_ids.shape[1] <= budget
    # a prompt is repeated only where its distinct responses do not fit one row with it
    assert merged.num_tokens < build_packed(prompts, branches).num_tokens


def test_merged_logps_and_gradients_equal_separate_forwards(llama_dir):
    model = load_causal_lm(llama_dir)
    prompts, branches = _all_pairs(seed=1, k=4)
    weights = torch.linspace(0.5, 1.5, 2 * len(prompts))

    def run(merge: bool):
        model.zero_grad()
        sums, tokens = sequence_logps(model, prompts, branches, pack=merge, token_logps=True)
        (torch.cat(sums) * weights).sum().backward()
        return sums, tokens, [p.grad.clone() for p in model.parameters()]

    # pack=False is the padded reference: one row per (prompt, response)
    ref_sums, ref_tokens, ref_grads = run(False)
    sums, tokens, grads = run(True)
    for a, b in zip(sums, ref_sums):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-6)
    for a, b in zip(tokens, ref_tokens):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for g, rg in zip(grads, ref_grads):
        assert (g - rg).abs().max() <= 1e-5 * max(1.0, rg.abs().max().item())
