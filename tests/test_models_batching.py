"""Row packing (first-fit decreasing) and the length-bucketing sampler."""

from __future__ import annotations

import random

import pytest

from preftune.data.batching import LengthBucketSampler, pack_rows
from preftune.errors import ConfigError
from preftune.models.packing import build_packed, build_padded


def test_pack_rows_hand_example():
    # sizes 6,5,4,3,2 into budget 8, longest first: 6→r0, 5→r1, 4→r2, 3→r1 (5+3), 2→r0 (6+2)
    assert pack_rows([6, 5, 4, 3, 2], 8) == [[0, 4], [1, 3], [2]]
    assert pack_rows([10, 1], 4) == [[0], [1]]  # an oversized item gets a row of its own
    with pytest.raises(ConfigError):
        pack_rows([1], 0)


def test_pack_rows_invariants():
    rng = random.Random(0)
    sizes = [rng.randrange(1, 50) for _ in range(200)]
    rows = pack_rows(sizes, 64)
    assert sorted(i for r in rows for i in r) == list(range(200))
    assert all(sum(sizes[i] for i in r) <= 64 for r in rows)
    # first-fit decreasing uses at most 11/9·OPT + 1 rows; OPT ≥ ceil(total / budget)
    assert len(rows) <= 11 / 9 * -(-sum(sizes) // 64) + 1


def test_packed_layout_positions_and_predictors():
    prompts, responses = [[1, 5, 6], [1, 7]], [[[8, 9], [10]], [[11, 12, 13]]]
    b = build_packed(prompts, responses, max_tokens_per_row=100)
    assert b.input_ids.tolist() == [[1, 5, 6, 8, 9, 10, 1, 7, 11, 12, 13]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 2, 3, 4]]
    assert b.branch_ids.tolist() == [[0, 0, 0, 1, 1, 2, 0, 0, 1, 1, 1]]
    assert b.example_ids.tolist() == [[0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1]]
    # branch 1 of example 0 (token 10) is predicted by the prompt's last token, column 2
    assert b.pred_cols.tolist() == [2, 3, 2, 7, 8, 9]
    assert b.seq_index.tolist() == [0, 0, 1, 2, 2, 2] and b.lengths.tolist() == [2, 1, 3]
    p = build_padded(prompts, responses)
    assert p.input_ids.shape == (3, 5) and p.num_tokens == 5 + 4 + 5
    assert b.num_tokens == 11  # the prompt of example 0 is stored once, not twice


def test_sampler_fixed_batches_cover_everything_and_are_homogeneous():
    rng = random.Random(1)
    lengths = [rng.randrange(10, 1000) for _ in range(400)]
    sampler = LengthBucketSampler(lengths, batch_size=8, seed=0, bucket_factor=50)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(400))
    assert all(len(b) == 8 for b in batches)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 100  # random batches of 8 from U(10, 1000) spread ≈ 770 on average
    assert list(LengthBucketSampler(lengths, batch_size=8, seed=0)) == batches  # deterministic
    sampler.set_epoch(1)
    assert list(sampler) != batches


def test_sampler_token_budget():
    lengths = [30, 10, 20, 40, 5, 25]
    batches = list(LengthBucketSampler(lengths, max_tokens=50, shuffle=False))
    # longest first (40, 30, 25, 20, 10, 5), cut when the budget would overflow: 40 | 30 | 25+20 | 10+5
    assert batches == [[3], [0], [5, 2], [1, 4]]
    assert all(sum(lengths[i] for i in b) <= 50 for b in batches)
    assert list(LengthBucketSampler([70, 3], max_tokens=50, shuffle=False)) == [[0], [1]]
    dropped = LengthBucketSampler(lengths, batch_size=4, shuffle=False, drop_last=True)
    assert list(dropped) == [[3, 0, 5, 2]] and len(dropped) == 1
    with pytest.raises(ConfigError, match="exactly one"):
        LengthBucketSampler(lengths)


def test_packed_mask_by_hand():
    from types import SimpleNamespace

    import torch

    from preftune.models.packing import attention_masks

    # row: [1 5 6 | 8 9 | 10] [1 7 | 11 12 13]: example 0 (prompt, branch A, branch B), example 1
    b = build_packed([[1, 5, 6], [1, 7]], [[[8, 9], [10]], [[11, 12, 13]]], max_tokens_per_row=11)
    cfg = SimpleNamespace(_attn_implementation="sdpa", sliding_window=None, layer_types=None)
    m = attention_masks(b, cfg, torch.float32, torch.device("cpu"))
    assert isinstance(m, torch.Tensor) and m.shape == (1, 1, 11, 11)
    sees = {q: [k for k in range(11) if m[0, 0, q, k]] for q in range(11)}
    assert sees[4] == [0, 1, 2, 3, 4]  # branch A: its prompt and itself
    assert sees[5] == [0, 1, 2, 5]  # branch B: its prompt and itself, not branch A
    assert sees[6] == [6] and sees[10] == [6, 7, 8, 9, 10]  # example 1 never sees example 0
    # sliding window 2 on positions: branch B's token (position 3) keeps keys at positions 2 and 3
    windowed = attention_masks(
        b,
        SimpleNamespace(
            _attn_implementation="eager",
            sliding_window=2,
            layer_types=["sliding_attention", "full_attention"],
        ),
        torch.float32,
        torch.device("cpu"),
    )
    assert isinstance(windowed, dict)
    slide, full = windowed["sliding_attention"], windowed["full_attention"]
    assert [k for k in range(11) if slide[0, 0, 5, k] == 0] == [2, 5]
    assert [k for k in range(11) if full[0, 0, 5, k] == 0] == [0, 1, 2, 5]
    assert slide[0, 0, 5, 3] == torch.finfo(torch.float32).min  # eager: additive minimum, not -inf
