"""preftune data score: pairs scored, reward-augmented pairs, best-of-n re-ranking, RM folders."""

from __future__ import annotations

import json

import pytest
import torch

from preftune.cli import main
from preftune.reward import load_reward
from test_train_fixtures import pair_rows, tiny_model, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

LENGTH = "def length(prompts, completions, **kw):\n    return [float(len(c)) for c in completions]\n"


def _read(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_pairs_get_scores_and_augmented_pairs(tmp_path, capsys):
    (tmp_path / "r.py").write_text(LENGTH)
    rows = [{"prompt": "1+2=", "chosen": "3.", "rejected": "five.", "margin": 1},
            {"prompt": "2+2=", "chosen": "4.", "rejected": "5."}]  # fmt: skip
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    spec = f"{tmp_path / 'r.py'}:length"
    assert main(["data", "score", str(data), "--reward", spec, "--out", str(tmp_path / "s.jsonl")]) == 0
    assert "wrote 2 rows" in capsys.readouterr().out
    assert _read(tmp_path / "s.jsonl") == [
        {**rows[0], "score_chosen": 2.0, "score_rejected": 5.0},
        {**rows[1], "score_chosen": 2.0, "score_rejected": 2.0},
    ]
    assert (
        main(["data", "score", str(data), "--reward", spec, "--out", str(tmp_path / "a.jsonl"), "--augment"])
        == 0
    )
    aug = _read(tmp_path / "a.jsonl")  # the tied second pair is dropped; the first gives two pairs
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in aug] == [
        ("[goal 2] 1+2=", "3.", "five."),
        ("[goal 5] 1+2=", "five.", "3."),
    ]


def test_completions_are_reranked_and_best_of_n_keeps_the_top(tmp_path):
    rows = [{"prompt": "12+5=\n", "completions": ["1+5+0=6 r6\n1+0+0=1 r16\nanswer: 16",
                                                  "2+5+0=7 r7\n1+0+0=1 r17\nanswer: 17"]}]  # fmt: skip
    data = write_jsonl(tmp_path / "c.jsonl", rows)
    assert (
        main(["data", "score", str(data), "--reward", "arithmetic", "--out", str(tmp_path / "r.jsonl")]) == 0
    )
    ranked = _read(tmp_path / "r.jsonl")
    assert ranked == [{"prompt": "12+5=\n", "responses": rows[0]["completions"][::-1], "scores": [1.0, 0.0]}]
    assert (
        main(
            [
                "data",
                "score",
                str(data),
                "--reward",
                "arithmetic",
                "--out",
                str(tmp_path / "b.jsonl"),
                "--best",
            ]
        )
        == 0
    )
    assert _read(tmp_path / "b.jsonl") == [
        {"prompt": "12+5=\n", "completion": rows[0]["completions"][1], "score": 1.0}
    ]


def test_a_reward_model_folder_scores_as_the_reward_does(tmp_path):
    model = tiny_model(tmp_path / "rm")
    rows = pair_rows(3, seed=7)
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    torch.manual_seed(0)  # the causal-LM folder gets a new head from the global RNG: compare in one call
    expected = load_reward(str(model))([r["prompt"] for r in rows for _ in (0, 1)],
                                       [r[s] for r in rows for s in ("chosen", "rejected")])  # fmt: skip
    torch.manual_seed(0)
    assert main(["data", "score", str(data), "--reward", str(model), "--out", str(tmp_path / "t.jsonl")]) == 0
    got = _read(tmp_path / "t.jsonl")
    assert [x for r in got for x in (r["score_chosen"], r["score_rejected"])] == pytest.approx(
        expected.tolist(), abs=1e-6
    )


def test_bad_rows_are_named(tmp_path, capsys):
    data = write_jsonl(
        tmp_path / "p.jsonl",
        [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}],
    )
    assert (
        main(["data", "score", str(data), "--reward", "arithmetic", "--out", str(tmp_path / "o.jsonl")]) != 0
    )
    err = capsys.readouterr().err
    assert f"{data}:2: field 'rejected': missing — give every row prompt, chosen, rejected" in err
    assert not (tmp_path / "o.jsonl").exists()
