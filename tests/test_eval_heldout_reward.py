"""`preftune eval RUN --prompts FILE`: the held-out reward of a policy run's final/ against its starting
model on the same prompts (the measure online methods are trained to raise), paired by prompt."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from online_fixtures import online_root
from preftune.cli import main
from preftune.errors import ConfigError
from preftune.eval.heldout_reward import heldout_reward, mean_rewards
from test_train_fixtures import pair_rows, write_jsonl


def test_mean_rewards_averages_each_prompt_s_samples_and_passes_the_columns() -> None:
    rows = [
        SimpleNamespace(text="p0", columns={"answer": 7}),
        SimpleNamespace(text="p1", columns={"answer": 8}),
    ]
    seen = {}

    def reward(prompts, completions, **kw):
        seen.update(prompts=prompts, **kw)
        return [1.0, 3.0, 0.0, 2.0]

    assert mean_rewards(reward, rows, ["a", "b", "c", "d"], 2).tolist() == [2.0, 1.0]
    assert seen == {"prompts": ["p0", "p0", "p1", "p1"], "answer": [7, 7, 8, 8]}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = online_root(tmp_path_factory, "heldout_reward")
    argv = [
        "train", "grpo", "--model", str(root / "model"), "--prompts", str(root / "prompts.jsonl"),
        "--reward", f"{root / 'rewards.py'}:digits", "--num-generations", "4", "--batch-size", "4",
        "--max-completion-length", "5", "--max-steps", "4", "--lr", "3e-3", "--no-progress", "--no-report",
        "--out", str(root / "grpo"),
    ]  # fmt: skip
    assert main(argv) == 0
    return root


def _greedy_digits(folder: Path, root: Path) -> list[float]:
    """Digits in each greedy 5-token response of `folder`, computed here without preftune.eval."""
    from preftune.data.formatting import load_tokenizer
    from preftune.generation import generate
    from preftune.models.load import load_causal_lm
    from preftune.rl.prompts import load_prompts

    tokenizer = load_tokenizer(str(root / "grpo" / "final"))
    rows = load_prompts(str(root / "prompts.jsonl"), tokenizer)
    out = generate(
        load_causal_lm(str(folder)), tokenizer, [r.ids for r in rows], max_new_tokens=5, temperature=0
    )
    texts = [tokenizer.decode(o[0], skip_special_tokens=True) for o in out]
    return [float(sum(ch.isdigit() for ch in t)) for t in texts]


def test_eval_prompts_reports_the_greedy_reward_before_and_after(run: Path, capsys) -> None:
    assert (
        main(["eval", str(run / "grpo"), "--prompts", str(run / "prompts.jsonl"), "--kl-samples", "0"]) == 0
    )
    result = json.loads((run / "grpo" / "eval.json").read_text())
    m = result["metrics"]
    before, after = _greedy_digits(run / "model", run), _greedy_digits(run / "grpo" / "final", run)
    assert m["reward/before"] == pytest.approx(sum(before) / 12) and m["reward/after"] == pytest.approx(
        sum(after) / 12
    )
    diffs = [a - b for a, b in zip(after, before)]
    mean = sum(diffs) / 12
    stderr = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 11) / math.sqrt(12)
    assert m["reward/gain"] == pytest.approx(mean) and m["reward/gain_stderr"] == pytest.approx(stderr)
    assert (m["reward/prompts"], m["reward/samples_per_prompt"]) == (12, 1)
    assert result["reward"].endswith("rewards.py:digits")  # the run's own reward by default
    assert "reward/gain" in capsys.readouterr().out


def test_the_same_model_on_both_sides_gains_exactly_nothing(run: Path) -> None:
    from preftune.data.formatting import load_tokenizer
    from preftune.models.load import load_causal_lm
    from preftune.reward.registry import load_reward
    from preftune.rl.prompts import load_prompts

    tokenizer = load_tokenizer(str(run / "model"))
    rows = load_prompts(str(run / "prompts.jsonl"), tokenizer)
    model = load_causal_lm(str(run / "model"))
    reward = load_reward(f"{run / 'rewards.py'}:digits")
    out = heldout_reward(
        model, model, tokenizer, rows, reward, num_samples=3, temperature=1.0, max_new_tokens=5
    )
    assert out["reward/gain"] == 0.0 and out["reward/gain_stderr"] == 0.0  # same seed, same samples
    with pytest.raises(ConfigError, match="greedy decoding"):
        heldout_reward(model, model, tokenizer, rows, reward, num_samples=2, temperature=0.0)


def test_eval_needs_data_or_prompts(run: Path, capsys) -> None:
    assert main(["eval", str(run / "grpo")]) == 2
    assert "pass --data" in capsys.readouterr().err
    write_jsonl(run / "pairs.jsonl", pair_rows(4, seed=3))
    argv = [
        "eval",
        str(run / "grpo"),
        "--data",
        str(run / "pairs.jsonl"),
        "--prompts",
        str(run / "prompts.jsonl"),
    ]
    assert main([*argv, "--kl-samples", "0"]) == 0  # both: one table, one eval.json
    metrics = json.loads((run / "grpo" / "eval.json").read_text())["metrics"]
    assert "rewards/accuracy" in metrics and "reward/gain" in metrics


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--num-samples", "0", "argument --num-samples: must be ≥ 1, got 0"),
        ("--temperature", "-1", "argument --temperature: must be a finite number ≥ 0 (0: greedy), got -1"),
        ("--max-new-tokens", "x", "argument --max-new-tokens: 'x' is not an integer"),
        ("--kl-prompts", "0", "argument --kl-prompts: must be ≥ 1, got 0"),
        ("--best-of-n", "-2", "argument --best-of-n: must be ≥ 0, got -2"),
    ],
)
def test_bad_sampling_flags_stop_before_any_model_loads(
    flag: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stop:  # argparse's usage error: no run folder is even read
        main(["eval", "runs/none", "--prompts", "p.jsonl", flag, value])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
