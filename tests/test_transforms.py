"""Data transforms: reward-augmented pairs, Curry-DPO stages, Step-DPO pairs. Outputs are checked by
hand and must pass the data layer's own validation as pairwise records."""

from __future__ import annotations

import pytest

from preftune.data.schema import validate
from preftune.data.sources import SourceData
from preftune.data.transforms import curry_stages, reward_augmented_pairs, step_dpo_pairs
from preftune.errors import ConfigError, DataError


def valid_pairwise(records):
    data = SourceData(path="<transform>", rows=list(enumerate(records, start=1)))
    recs, problems, kind = validate(data, kind="pairwise")
    assert not problems, problems
    return recs


def test_reward_augmented_pairs_condition_on_each_score_and_swap():
    """(x, y_w = A, y_l = B, 8, 3) → "[goal 8] x": A ≻ B and "[goal 3] x": B ≻ A (label 0.9 → 0.1,
    margins swapped); a message prompt gets the goal as a system message; a tie is dropped."""
    records = [
        {
            "prompt": "x",
            "chosen": "A",
            "rejected": "B",
            "score_chosen": 8,
            "score_rejected": 3,
            "label": 0.9,
            "margins": [[1.0], [2.0]],
        },
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "chosen": "C",
            "rejected": "D",
            "score_chosen": 2.5,
            "score_rejected": 1,
        },
        {"prompt": "y", "chosen": "E", "rejected": "F", "score_chosen": 4, "score_rejected": 4},
    ]
    out = reward_augmented_pairs(records)
    assert len(out) == 4
    assert (out[0]["prompt"], out[0]["chosen"], out[0]["rejected"]) == ("[goal 8] x", "A", "B")
    assert (out[1]["prompt"], out[1]["chosen"], out[1]["rejected"]) == ("[goal 3] x", "B", "A")
    assert out[1]["label"] == pytest.approx(0.1) and out[1]["margins"] == [[2.0], [1.0]]
    assert (out[1]["score_chosen"], out[1]["score_rejected"]) == (3, 8)
    assert out[2]["prompt"] == [
        {"role": "system", "content": "[goal 2.5]"},
        {"role": "user", "content": "hi"},
    ]
    assert out[3]["prompt"][0]["content"] == "[goal 1]" and out[3]["chosen"] == "D"
    assert records[0]["prompt"] == "x"  # inputs untouched
    valid_pairwise(out)
    with pytest.raises(DataError, match="row 3: field 'score_rejected'"):
        reward_augmented_pairs(records, on_tie="error")
    with pytest.raises(DataError, match="row 1: field 'score_chosen'"):
        reward_augmented_pairs([{"prompt": "x", "chosen": "A", "rejected": "B"}])


def test_curry_stages_all_pairs_ordered_by_gap():
    """Record 1 scores a=9, b=5, c=1 → pairs (a,c) gap 8, (a,b) 4, (b,c) 4; record 2 d=3, e=2, f=2 →
    (d,e) and (d,f) gap 1, e and f tie (no pair). Sorted by gap, ties in input order: (a,c), (a,b),
    (b,c), (d,e), (d,f); 3 stages of sizes 2, 2, 1."""
    records = [
        {"prompt": "p1", "responses": ["b", "a", "c"], "scores": [5, 9, 1]},
        {"prompt": "p2", "responses": ["d", "e", "f"], "scores": [3, 2, 2]},
    ]
    stages = curry_stages(records, 3)
    flat = [(p["chosen"], p["rejected"]) for s in stages for p in s]
    assert flat == [("a", "c"), ("a", "b"), ("b", "c"), ("d", "e"), ("d", "f")]
    assert [len(s) for s in stages] == [2, 2, 1]
    assert stages[0][0]["score_chosen"] == 9 and stages[0][0]["score_rejected"] == 1
    for s in stages:
        valid_pairwise(s)


def test_curry_stages_best_vs_rest_and_errors():
    """best_vs_rest keeps only pairs whose chosen is the top response: (a,c) gap 8, (a,b) gap 4."""
    records = [{"prompt": "p", "responses": ["b", "a", "c"], "scores": [5, 9, 1]}]
    stages = curry_stages(records, 2, pairs="best_vs_rest")
    assert [[(p["chosen"], p["rejected"]) for p in s] for s in stages] == [[("a", "c")], [("a", "b")]]
    with pytest.raises(DataError, match="empty"):
        curry_stages(records, 5, pairs="best_vs_rest")
    with pytest.raises(ConfigError):
        curry_stages(records, 0)
    with pytest.raises(DataError, match="row 1: field 'scores'"):
        curry_stages([{"prompt": "p", "responses": ["a", "b"], "scores": [1]}], 1)


def test_step_dpo_pairs():
    """Steps s0, s1, BAD with first_error 2 and two corrections → prompt "Q\\ns0\\ns1\\n", chosen each
    correction, rejected "BAD"; first_error 0 gives prompt "Q\\n"."""
    records = [
        {
            "prompt": "Q",
            "steps": ["s0", "s1", "BAD", "s3"],
            "first_error": 2,
            "correct_steps": ["good", "also good"],
        },
        {"prompt": "R", "steps": ["oops"], "first_error": 0, "correct_step": "fine"},
    ]
    out = step_dpo_pairs(records)
    assert out == [
        {"prompt": "Q\ns0\ns1\n", "chosen": "good", "rejected": "BAD"},
        {"prompt": "Q\ns0\ns1\n", "chosen": "also good", "rejected": "BAD"},
        {"prompt": "R\n", "chosen": "fine", "rejected": "oops"},
    ]
    valid_pairwise(out)
    with pytest.raises(DataError, match="row 1: field 'first_error'"):
        step_dpo_pairs([{"prompt": "Q", "steps": ["a"], "first_error": 1, "correct_step": "b"}])
    with pytest.raises(DataError, match="field 'correct_steps'"):
        step_dpo_pairs([{"prompt": "Q", "steps": ["a"], "first_error": 0}])
    with pytest.raises(DataError, match="field 'prompt'"):
        step_dpo_pairs(
            [
                {
                    "prompt": [{"role": "user", "content": "Q"}],
                    "steps": ["a"],
                    "first_error": 0,
                    "correct_step": "b",
                }
            ]
        )


def test_curry_stages_per_prompt_is_the_papers_grouping():
    """K = 4 per prompt, best_vs_rest, 3 stages. p1 scores a=4, b=3, c=2, d=0: gaps (a,d) 4, (a,c) 2,
    (a,b) 1. p2 e=9, f=5, g=4, h=0: (e,h) 9, (e,g) 5, (e,f) 4.
    per_prompt: stage k holds each prompt's k-th easiest pair: [(a,d),(e,h)], [(a,c),(e,g)], [(a,b),(e,f)].
    global: gaps 9, 5, 4, 4, 2, 1 → [(e,h),(e,g)], [(a,d),(e,f)], [(a,c),(a,b)]."""
    records = [
        {"prompt": "p1", "responses": ["a", "b", "c", "d"], "scores": [4, 3, 2, 0]},
        {"prompt": "p2", "responses": ["e", "f", "g", "h"], "scores": [9, 5, 4, 0]},
    ]

    def names(stages):
        return [[(p["chosen"], p["rejected"]) for p in s] for s in stages]

    per_prompt = curry_stages(records, 3, pairs="best_vs_rest", order="per_prompt")
    assert names(per_prompt) == [[("a", "d"), ("e", "h")], [("a", "c"), ("e", "g")], [("a", "b"), ("e", "f")]]
    globally = curry_stages(records, 3, pairs="best_vs_rest")
    assert names(globally) == [[("e", "h"), ("e", "g")], [("a", "d"), ("e", "f")], [("a", "c"), ("a", "b")]]
    with pytest.raises(ConfigError):
        curry_stages(records, 2, order="random")
