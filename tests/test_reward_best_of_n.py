"""Best-of-n with a reward model: the curve on known scores, a perfect and an inverted scorer, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from preftune.cli import main
from preftune.errors import ConfigError
from preftune.reward.best_of_n import best_of_n_curve, curve_points, sample_and_score
from test_train_fixtures import pair_rows, tiny_model, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


def test_curve_on_known_scores():
    # one prompt, 4 samples: gold 0 1 0 1; the RM ranks sample 0 highest in the first pair, 3 in the second
    scores = torch.tensor([[5.0, 1.0, 0.0, 2.0]])
    gold = torch.tensor([[0.0, 1.0, 0.0, 1.0]])
    curve = best_of_n_curve(scores, gold, [1, 2, 4])
    assert curve["n"] == [1.0, 2.0, 4.0]
    # n=1: the mean; n=2: picks sample 0 (gold 0) and sample 3 (gold 1); n=4: sample 0
    assert curve["rm"] == [0.5, 0.5, 0.0]
    assert curve["oracle"] == [0.5, 1.0, 1.0]
    # ties go to the first sample of the group
    assert best_of_n_curve(torch.zeros(1, 2), torch.tensor([[0.0, 1.0]]), [2])["rm"] == [0.0]
    assert curve_points(16) == [1, 2, 4, 8, 16] and curve_points(12) == [1, 2, 4, 8, 12]
    with pytest.raises(ConfigError, match="needs at least 8 samples per prompt, have 4"):
        best_of_n_curve(scores, gold, [8])


GOLD = (
    "def has_one(prompts, completions, **kw):\n    return [1.0 if '1' in c else 0.0 for c in completions]\n"
)


def test_a_perfect_scorer_is_the_oracle_and_an_inverted_one_the_worst(tmp_path):
    model = tiny_model(tmp_path / "policy")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in pair_rows(6)])
    (tmp_path / "gold.py").write_text(GOLD)
    gold = f"{tmp_path / 'gold.py'}:has_one"

    def perfect(p, c, **kw):
        return [1.0 if "1" in x else 0.0 for x in c]

    def inverted(p, c, **kw):
        return [-v for v in perfect(p, c)]

    kw = dict(temperature=1.0, max_new_tokens=6, seed=3)
    best = sample_and_score(perfect, str(model), str(prompts), gold, 8, **kw)
    worst = sample_and_score(inverted, str(model), str(prompts), gold, 8, **kw)
    assert best["prompts"] == 6 and best["n"] == [1.0, 2.0, 4.0, 8.0]
    assert best["rm"] == best["oracle"] and worst["oracle"] == best["oracle"]
    assert worst["rm"][0] == best["rm"][0]  # n = 1: no choice, the same samples (same seed)
    assert 0 < best["rm"][0] < 1  # the gold varies, so picking has an effect
    assert best["rm"][-1] > best["rm"][0] > worst["rm"][-1]
    assert all(a >= b for a, b in zip(worst["rm"], worst["rm"][1:]))  # worst-of-n falls with n
    one = sample_and_score(perfect, str(model), str(prompts), gold, 8, **{**kw, "max_new_tokens": 1})
    assert 0.0 <= best["unfinished"] <= one["unfinished"] <= 1.0  # what ends within 1 token ends within 6
    assert one["max_new_tokens"] == 1 and best["max_new_tokens"] == 6


def test_eval_of_an_rm_run_writes_bins_and_the_best_of_n_curve(tmp_path, capsys):
    model = tiny_model(tmp_path / "sft")
    data = write_jsonl(tmp_path / "prefs.jsonl", pair_rows(8, seed=1))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in pair_rows(4)])
    (tmp_path / "gold.py").write_text(GOLD)
    run = tmp_path / "rm"
    assert main(["train", "rm", "--model", str(model), "--data", str(data), "--out", str(run), "--max-steps", "2", "--batch-size", "4"]) == 0  # fmt: skip
    args = ["eval", str(run), "--data", str(data), "--best-of-n", "4", "--prompts", str(prompts),
            "--gold", f"{tmp_path / 'gold.py'}:has_one", "--max-new-tokens", "6"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "best-of-4 (oracle)" in out
    payload = json.loads((run / "eval.json").read_text())
    cut = payload["best_of_n"]["unfinished"]  # samples cut at 6 tokens: named when most are
    assert ("before their end of sequence and were judged cut off — raise --max-new-tokens" in out) == (
        cut > 0.5
    )
    bins = payload["reliability"]
    assert len(bins) == 10 and sum(b["pairs"] for b in bins) == 8
    assert [b["low"] for b in bins][:2] == [0.5, 0.55] and bins[-1]["high"] == 1.0
    ece = sum(b["pairs"] / 8 * abs(b["accuracy"] - b["confidence"]) for b in bins if b["pairs"])
    assert payload["metrics"]["ece"] == pytest.approx(ece)
    bon = payload["best_of_n"]
    assert bon["n"] == [1.0, 2.0, 4.0] and bon["prompts"] == 4 and bon["policy"] == str(model)
    assert bon["rm"][0] == bon["oracle"][0] and all(r <= o for r, o in zip(bon["rm"], bon["oracle"]))
    assert main([*args[:4], "--best-of-n", "4"]) != 0
    assert "--best-of-n needs --prompts FILE" in capsys.readouterr().err
