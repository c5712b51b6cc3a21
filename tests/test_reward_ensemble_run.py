"""preftune train rm --ensemble M: M seeds, a manifest, the aggregated reward and its evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from preftune.cli import main
from preftune.config import load_config
from preftune.errors import ConfigError
from preftune.reward import load_reward
from preftune.reward.model_reward import RewardModelFn
from test_train_fixtures import pair_rows, tiny_model, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ens")
    model = tiny_model(root / "sft")
    data = write_jsonl(root / "prefs.jsonl", pair_rows(8, seed=1))
    args = ["train", "rm", "--model", str(model), "--data", str(data), "--out", str(root / "ens"),
            "--ensemble", "3", "--aggregate", "min", "--max-steps", "2", "--batch-size", "4", "--lr", "1e-2"]  # fmt: skip
    assert main(args) == 0
    return root


def test_members_are_seeded_runs_and_the_manifest_names_them(ens):
    out = ens / "ens"
    assert [load_config(out / f"member-{i}" / "config.yaml").seed for i in range(3)] == [0, 1, 2]
    manifest = json.loads((out / "final" / "ensemble.json").read_text())
    assert manifest == {"members": [f"../member-{i}/final" for i in range(3)], "aggregate": "min", "lam": 0.5}
    prompts, completions = ["1+2=", "3+4=", "1+1="], ["3.", "9x.", "2."]
    members = torch.tensor([RewardModelFn(out / f"member-{i}" / "final")(prompts, completions) for i in range(3)],
                           dtype=torch.float64)  # fmt: skip
    assert len({tuple(m.tolist()) for m in members}) == 3  # three different reward models
    got = load_reward(str(out / "final"))(prompts, completions)
    torch.testing.assert_close(got, members.min(0).values, atol=1e-6, rtol=0)
    uwo = load_reward(f"ensemble:uwo:{out / 'final'}:2")(prompts, completions)  # weight 2
    expected = 2 * (members.mean(0) - 0.5 * members.var(0, unbiased=False))
    torch.testing.assert_close(uwo, expected, atol=1e-6, rtol=0)


def test_eval_scores_pairs_with_the_aggregated_reward(ens):
    out = ens / "ens"
    assert main(["eval", str(out), "--data", str(ens / "prefs.jsonl")]) == 0
    metrics = json.loads((out / "eval.json").read_text())["metrics"]
    rows = pair_rows(8, seed=1)
    reward = load_reward(str(out / "final"))
    s_c = reward([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    s_r = reward([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    assert metrics["accuracy"] == pytest.approx(float((s_c > s_r).double().mean()))
    assert metrics["margin"] == pytest.approx(float((s_c - s_r).mean()), abs=1e-5)


def test_bad_ensemble_settings_are_refused(ens, capsys):
    base = [
        "train",
        "rm",
        "--model",
        str(ens / "sft"),
        "--data",
        str(ens / "prefs.jsonl"),
        "--out",
        str(ens / "x"),
    ]
    assert main([*base, "--ensemble", "1"]) != 0
    assert "--ensemble 1: give the number of members, ≥ 2" in capsys.readouterr().err
    assert main([*base, "--ensemble", "2", "--aggregate", "max"]) != 0
    assert "--aggregate max: use one of mean, min, uwo, median" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="ensemble aggregator 'max'"):
        load_reward(f"ensemble:max:{ens / 'ens' / 'final'}")


# ---- M heads on one trunk (--heads M) ----


def _train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "rm", "--model", str(model), "--data", str(data), "--out", str(out), "--max-steps", "3",
            "--batch-size", "4", "--lr", "1e-2", "--max-grad-norm", "0", "--warmup-ratio", "0", *extra]  # fmt: skip


def test_heads_ensemble_is_one_classifier_with_m_heads_aggregated(ens):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = ens / "heads"
    assert main(_train_args(ens / "sft", ens / "prefs.jsonl", out, "--heads", "3", "--aggregate", "min")) == 0
    final = out / "final"
    assert json.loads((final / "ensemble.json").read_text()) == {"heads": 3, "aggregate": "min", "lam": 0.5}
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    assert model.config.num_labels == 3
    prompts, completions = ["1+2=", "3+4=", "1+1="], ["3.", "9x.", "2."]
    with torch.no_grad():  # the model's own forward, one unpadded row per completion (EOS appended)
        own = torch.stack([
            model(torch.tensor([tok(p + c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]])).logits[0]
            for p, c in zip(prompts, completions)
        ]).double()  # [N, 3]  # fmt: skip
    assert len({tuple(col.tolist()) for col in own.T}) == 3  # three different heads
    got = load_reward(str(final))(prompts, completions)
    torch.testing.assert_close(got, own.min(1).values, atol=1e-5, rtol=0)
    uwo = load_reward(f"ensemble:uwo:{final}")(prompts, completions)
    torch.testing.assert_close(uwo, own.mean(1) - 0.5 * own.var(1, unbiased=False), atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="3 labels; a reward model has 1"):
        RewardModelFn(final)
    assert main(["eval", str(out), "--data", str(ens / "prefs.jsonl")]) == 0
    metrics = json.loads((out / "eval.json").read_text())["metrics"]
    rows = pair_rows(8, seed=1)
    reward = load_reward(str(final))
    s_c = reward([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    s_r = reward([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    assert metrics["accuracy"] == pytest.approx(float((s_c > s_r).double().mean()))
    assert metrics["margin"] == pytest.approx(float((s_c - s_r).mean()), abs=1e-5)


def test_m_identical_heads_train_exactly_as_one_head(ens):
    """A pair's loss is the mean of its heads' losses: with M copies of one head the loss is that head's,
    the trunk's gradient is the single head's, and each copy's gradient is 1/M of it — Adam's update is
    scale-free, so (clipping off) the trunk and every copy follow the single-head run step for step."""
    from preftune.reward.scoring import load_scorer

    torch.manual_seed(5)
    one = load_scorer(ens / "sft")
    three = load_scorer(ens / "sft", num_labels=3)
    with torch.no_grad():
        three.score.weight.copy_(one.score.weight.repeat(3, 1))
    tok = (ens / "sft" / "tokenizer.json").read_text()
    for name, model in (("one", one), ("three", three)):
        model.save_pretrained(ens / f"init-{name}")
        (ens / f"init-{name}" / "tokenizer.json").write_text(tok)
        for f in ("tokenizer_config.json", "special_tokens_map.json"):
            if (ens / "sft" / f).is_file():
                (ens / f"init-{name}" / f).write_text((ens / "sft" / f).read_text())
    data = ens / "prefs.jsonl"
    assert main(_train_args(ens / "init-one", data, ens / "run-one")) == 0
    assert main(_train_args(ens / "init-three", data, ens / "run-three", "--heads", "3")) == 0
    a = load_scorer(ens / "run-one" / "final")
    b = load_scorer(ens / "run-three" / "final", num_labels=3)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        expected = p.detach().repeat(3, 1) if name == "score.weight" else p.detach()
        torch.testing.assert_close(q.detach(), expected, atol=2e-5, rtol=0, msg=name)
    logs = [
        [json.loads(x) for x in (ens / f"run-{n}" / "metrics.jsonl").read_text().splitlines()]
        for n in ("one", "three")
    ]
    assert [r["loss"] for r in logs[0]] == pytest.approx([r["loss"] for r in logs[1]], abs=1e-5)


def test_bad_heads_settings_are_refused(ens, capsys):
    base = _train_args(ens / "sft", ens / "prefs.jsonl", ens / "y")
    assert main([*base, "--heads", "1"]) != 0
    assert "--heads 1: give the number of heads on the trunk, ≥ 2" in capsys.readouterr().err
    assert main([*base, "--heads", "2", "--ensemble", "2"]) != 0
    assert "two kinds of ensemble" in capsys.readouterr().err
    assert main([*base, "--heads", "2", "--aggregate", "max"]) != 0
    assert "--aggregate max: use one of mean, min, uwo, median" in capsys.readouterr().err


# ---- M seeds of implicit RMs (--ensemble M --head implicit) ----


def test_implicit_members_are_implicit_rms_and_aggregate_their_r_theta(ens):
    from preftune.reward.implicit import is_implicit
    from preftune.reward.implicit_reward import ImplicitRewardFn

    out = ens / "iens"
    args = _train_args(ens / "sft", ens / "prefs.jsonl", out, "--ensemble", "2", "--aggregate", "mean",
                       "--head", "implicit", "--beta", "0.5")  # fmt: skip
    assert main(args) == 0
    finals = [out / f"member-{i}" / "final" for i in range(2)]
    assert all(is_implicit(f) for f in finals)
    assert [json.loads((f / "implicit.json").read_text())["beta"] for f in finals] == [0.5, 0.5]
    assert [load_config(out / f"member-{i}" / "config.yaml").seed for i in range(2)] == [0, 1]
    rows = pair_rows(8, seed=1)
    prompts = [r["prompt"] for r in rows] * 2
    completions = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    members = torch.stack([ImplicitRewardFn(f).outcome(prompts, completions).double() for f in finals])
    assert not torch.allclose(members[0], members[1])  # other batch orders: other models
    assert members.abs().max() > 0  # trained away from π_ref (r_θ ≡ 0 at the start)
    got = load_reward(str(out / "final"))(prompts, completions)
    torch.testing.assert_close(got, members.mean(0), atol=1e-5, rtol=0)
    low = load_reward(f"ensemble:min:{out / 'final'}")(prompts, completions)
    torch.testing.assert_close(low, members.min(0).values, atol=1e-5, rtol=0)
    # preftune eval orders the held-out pairs by the aggregated r_θ
    assert main(["eval", str(out), "--data", str(ens / "prefs.jsonl")]) == 0
    metrics = json.loads((out / "eval.json").read_text())["metrics"]
    s_c, s_r = got[: len(rows)], got[len(rows) :]
    assert metrics["accuracy"] == pytest.approx(float((s_c > s_r).double().mean()))
    assert metrics["margin"] == pytest.approx(float((s_c - s_r).mean()), abs=1e-4)


def test_implicit_ensemble_refuses_heads(ens, capsys):
    base = _train_args(ens / "sft", ens / "prefs.jsonl", ens / "z", "--head", "implicit")
    assert main([*base, "--ensemble", "2", "--heads", "2"]) != 0
    assert "two kinds of ensemble" in capsys.readouterr().err
    assert main([*base, "--heads", "2", "--aggregate", "min"]) != 0
    assert "--head implicit takes --beta" in capsys.readouterr().err


def test_the_ensemble_folder_has_a_summary_and_its_report_command_writes_each_members(ens, capsys):
    """OUT held only config.yaml and final/ (and `preftune report OUT` failed: no metrics.jsonl)."""
    out = ens / "ens"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "rm ensemble of 3 (min)" and summary["steps"] == 2
    assert sorted(summary["members"]) == ["member-0", "member-1", "member-2"]
    assert summary["members"]["member-1"]["steps"] == 2 and summary["final"]["aggregate"] == "min"
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    said = capsys.readouterr().out
    assert all(f"{out / f'member-{i}' / 'report.html'}" in said for i in range(3))
    assert (out / "member-2" / "report.html").is_file()
