"""Rating data (prompt / response / rating) for the reward model's regression loss."""

from __future__ import annotations

import json

import pytest
import torch

from preftune.cli import main
from preftune.config import load_config
from preftune.data.formatting import load_tokenizer
from preftune.errors import DataError
from preftune.reward.rated import rated_examples, rated_metrics, rated_scores
from preftune.reward.scoring import load_scorer
from preftune.train.api import seed_everything
from preftune.types import Example
from test_train_fixtures import pair_rows, tiny_model, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


def _ratings() -> list[dict]:
    rows = []
    for i, r in enumerate(pair_rows(3, seed=2)):
        rows += [{"prompt": r["prompt"], "response": r["chosen"], "rating": 4.0 + i},
                 {"prompt": r["prompt"], "response": r["rejected"], "rating": 1.0}]  # fmt: skip
    return rows


def test_regression_trains_on_ratings_with_the_hand_loss(tmp_path):
    model = tiny_model(tmp_path / "sft")
    data = write_jsonl(tmp_path / "ratings.jsonl", _ratings())
    out = tmp_path / "run"
    args = ["train", "rm", "--model", str(model), "--data", str(data), "--out", str(out), "--loss", "regression",
            "--max-steps", "1", "--batch-size", "6", "--seed", "4"]  # fmt: skip
    config = load_config(None, {"method": "rm", "model": str(model), "data": str(data), "out": "x"})
    examples = rated_examples(str(data), config, load_tokenizer(str(model)), None)
    assert [e.scores for e in examples] == [[4.0], [1.0], [5.0], [1.0], [6.0], [1.0]]
    assert [e.source_row for e in examples] == [1, 2, 3, 4, 5, 6]
    seed_everything(4)  # the new head as train rm draws it
    with torch.no_grad():
        scores, ratings = rated_scores(load_scorer(str(model)), examples)
    assert main(args) == 0
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(float(((scores - ratings) ** 2).mean()), abs=1e-5)
    assert first["loss"] > 10  # scores start near 0, ratings are 1-6
    assert main(["eval", str(out), "--data", str(data)]) == 0
    metrics = json.loads((out / "eval.json").read_text())["metrics"]
    assert metrics["responses"] == 6.0 and set(metrics) == {"responses", "loss", "mse", "accuracy"}


def test_ordering_accuracy_counts_pairs_of_one_prompt():
    batch = [Example([1], [[2]]), Example([1], [[3]]), Example([1], [[4]]), Example([9], [[2]])]
    scores = torch.tensor([2.0, 1.0, 3.0, 0.0])
    ratings = torch.tensor([5.0, 1.0, 1.0, 9.0])  # pairs of prompt [1] with different ratings: (0,1), (0,2)
    metrics = rated_metrics(scores, ratings, batch)
    assert metrics["accuracy"] == 0.5  # (0,1) ordered right, (0,2) wrong; (1,2) tied in rating
    assert metrics["mse"] == pytest.approx((9 + 0 + 4 + 81) / 4)


def test_bad_rating_rows_name_path_row_field(tmp_path):
    model = tiny_model(tmp_path / "sft")
    rows = [{"prompt": "1+1=", "response": "2.", "rating": 1}, {"prompt": "1+1=", "rating": "high"}]
    data = write_jsonl(tmp_path / "r.jsonl", rows)
    config = load_config(None, {"method": "rm", "model": str(model), "data": str(data), "out": "x"})
    with pytest.raises(DataError) as err:
        rated_examples(str(data), config, load_tokenizer(str(model)), None)
    lines = str(err.value).splitlines()
    assert lines[1:] == [
        f"{data}:2: field 'response': missing — give each row the rated 'response' (text or messages)",
        f"{data}:2: field 'rating': is 'high', expected a finite number — give each row a finite number 'rating', e.g. 3.5",
    ]
