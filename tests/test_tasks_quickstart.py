"""Quickstart pieces: pair building from labelled samples (by hand), and prepare() end to end at toy size
(files, labels, held-out separation, token ids as the trainer sees them, accuracy recomputed)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from preftune.tasks.arithmetic import ArithmeticTask, Problem, parse_prompt, solution
from preftune.tasks.quickstart import (
    QuickstartConfig,
    build_pairs,
    evaluate_accuracy,
    first_error_prefix,
    prepare,
)
from preftune.tasks.sft import SFTConfig, encode

RIGHT = solution(Problem(347, "+", 586))
CARRY_DROPPED = "7+6+0=13 r3\n4+8+0=12 r23\n3+5+1=9 r923\nanswer: 923"


def test_build_pairs_by_hand() -> None:
    task = ArithmeticTask()
    p = "347+586=\n"
    samples = [[RIGHT, CARRY_DROPPED, RIGHT, "7+6+0=13 r3"]]
    pairs, steps, counts = build_pairs(task, [p], samples, pairs_per_prompt=2, seed=0, rejected="full")
    # Distinct wrong answers: the carry error and the truncated one; both paired with the right answer.
    assert pairs == [
        {"prompt": p, "chosen": RIGHT, "rejected": CARRY_DROPPED},
        {"prompt": p, "chosen": RIGHT, "rejected": "7+6+0=13 r3"},
    ]
    # first_error: the carry sample is cut right after the wrong carry digit; the truncated sample
    # is a prefix of the right answer, so it stays whole (its EOS is the mistake).
    cut, _, _ = build_pairs(task, [p], samples, pairs_per_prompt=2, seed=0)
    assert [r["rejected"] for r in cut] == ["7+6+0=13 r3\n4+8+0", "7+6+0=13 r3"]
    assert first_error_prefix(RIGHT, RIGHT + "\nanswer: 1") == RIGHT + "\n"
    # Step-DPO: context = prompt + the correct line before the error; chosen/rejected = line 1.
    # The truncated sample's first error is a missing line: no step pair for it.
    assert steps == [{"prompt": p + "7+6+0=13 r3\n", "chosen": "4+8+1=13 r33", "rejected": "4+8+0=12 r23"}]
    assert counts == {"samples": 4, "correct": 2, "fully_correct": 2, "reference_chosen": 0}


def test_all_wrong_prompt_gets_the_reference_solution_as_chosen() -> None:
    task = ArithmeticTask()
    pairs, _, counts = build_pairs(task, ["347+586=\n"], [[CARRY_DROPPED] * 3], pairs_per_prompt=2, seed=0)
    assert pairs == [{"prompt": "347+586=\n", "chosen": RIGHT, "rejected": "7+6+0=13 r3\n4+8+0"}]
    assert counts["reference_chosen"] == 1 and counts["correct"] == 0
    # All right: nothing to prefer.
    assert build_pairs(task, ["347+586=\n"], [[RIGHT] * 2], pairs_per_prompt=2, seed=0)[0] == []


TOY = QuickstartConfig(
    level=1,
    sft=SFTConfig(hidden_size=24, num_layers=1, steps=25, batch_size=16, warmup_steps=5),
    train_prompts=24,
    heldout_prompts=8,
    samples_per_prompt=2,
    eval_samples=1,
    eval_fraction=0.25,
)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    before = torch.get_num_threads()
    out = tmp_path_factory.mktemp("qs")
    logs: list[str] = []
    art = prepare(out, seed=3, config=TOY, log=logs.append)
    yield art, logs
    torch.set_num_threads(before)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_prepare_writes_labelled_disjoint_data(toy) -> None:
    art, logs = toy
    task = art.task
    assert (art.sft_dir / "config.json").is_file() and (art.sft_dir / "tokenizer.json").is_file()
    train, evals = _rows(art.pairs_path), _rows(art.eval_pairs_path)
    assert train and evals
    held = set(art.heldout_prompts)
    assert len(held) == TOY.heldout_prompts
    assert not ({r["prompt"] for r in train} & {r["prompt"] for r in evals})
    for r in train + evals:
        assert r["prompt"] not in held
        assert task.verify(r["prompt"], r["chosen"]).fully_correct
        assert not task.verify(r["prompt"], r["rejected"]).correct
        assert r["rejected"][:-1] == r["chosen"][: len(r["rejected"]) - 1]  # cut at the first error
    for r in _rows(art.heldout_path):
        assert r["answer"] == parse_prompt(r["prompt"]).answer
    for r in _rows(art.step_pairs_path):
        problem, *done = r["prompt"].split("\n")[:-1]
        ref = solution(parse_prompt(problem + "=\n" if not problem.endswith("=") else problem)).split("\n")
        assert done == ref[: len(done)] and r["chosen"] == ref[len(done)] != r["rejected"]
    # prepare alone numbers its own three stages: SFT, sampling, writing + measuring
    assert _stage_numbers(logs) == ["1/3", "2/3", "3/3"]


def _stage_numbers(logs: list[str]) -> list[str]:
    """The "k/n" of every stage line ("[k/n] ...") in order."""
    return [line[1 : line.index("]")] for line in logs if line.startswith("[")]


def test_prepare_accuracy_is_reproducible_and_in_range(toy) -> None:
    art, _ = toy
    before = art.stats["accuracy_before"]
    assert 0.0 <= before["greedy"] <= 1.0 and 0.0 <= before["sampled"] <= 1.0
    again = evaluate_accuracy(art.sft_dir, art.task, art.heldout_prompts, greedy=True)
    assert again == before["greedy"]
    # A perfect "model" — the reference answer — scores 1 on the same prompts through the same reward.
    assert all(art.task.reward(p, art.task.solution(parse_prompt(p))) == 1.0 for p in art.heldout_prompts)


def test_greedy_mistakes_are_the_first_rejected_of_their_prompt(toy) -> None:
    from preftune.tasks.quickstart import sample_responses

    art, _ = toy
    task = art.task
    assert TOY.include_greedy
    # The same training prompts prepare() drew (seed 3), greedy-decoded in the same single batch.
    prompts = [
        p.prompt for p in task.problems(TOY.train_prompts, seed=20_003, exclude=set(art.heldout_prompts))
    ]
    greedy = [
        r[0] for r in sample_responses(art.sft_dir, task, prompts, num_samples=1, temperature=0, seed=3)
    ]
    # K sampled + 1 greedy response per prompt were labelled.
    assert art.stats["sampling"]["samples"] == TOY.train_prompts * (TOY.samples_per_prompt + 1)
    first: dict[str, str] = {}
    for r in _rows(art.pairs_path) + _rows(art.eval_pairs_path):
        first.setdefault(r["prompt"], r["rejected"])
    checked = 0
    for p, g in zip(prompts, greedy):
        cut = first_error_prefix(task.solution(parse_prompt(p)), g)
        if not task.verify(p, g).correct and cut.strip():
            assert first[p] == cut
            checked += 1
    assert checked > 0  # the toy model (25 SFT steps) makes greedy mistakes


def test_trainer_sees_the_same_token_ids_as_sft_and_generation(toy) -> None:
    from transformers import AutoTokenizer

    from preftune.data.pipeline import prepare_examples

    art, _ = toy
    tok = AutoTokenizer.from_pretrained(art.sft_dir)
    rows = _rows(art.pairs_path)
    examples = prepare_examples(str(art.pairs_path), tokenizer=tok, cache_dir=str(art.out_dir / "c")).examples
    assert len(examples) == len(rows)
    for ex, r in zip(examples, rows):
        assert ex.prompt_ids == encode(tok, r["prompt"])[0]
        assert ex.response_ids == [
            encode(tok, r["prompt"], r["chosen"])[1],
            encode(tok, r["prompt"], r["rejected"])[1],
        ]


def test_config_errors(tmp_path) -> None:
    from preftune.errors import ConfigError
    from preftune.tasks.quickstart import run_quickstart

    with pytest.raises(ConfigError, match="samples_per_prompt"):
        prepare(tmp_path, config=replace(TOY, samples_per_prompt=1), log=lambda _m: None)
    for typo, meant in (("grop", "grpo"), ("simpp", "simpo"), ("online_dop", "online_dpo")):
        with pytest.raises(ConfigError, match=f"unknown method '{typo}' — did you mean '{meant}'"):
            run_quickstart(tmp_path / typo, method=typo, config=TOY, log=lambda _m: None)
        assert not (tmp_path / typo).exists()  # refused before anything is written
    for other, family in (("ddpo", "online diffusion RL"), ("adpa", "distillation"), ("rm", "reward model")):
        with pytest.raises(
            ConfigError, match=rf"'{other}' \({family}\) is not one of the quickstart's methods"
        ):
            run_quickstart(tmp_path / other, method=other, config=TOY, log=lambda _m: None)
        assert not (tmp_path / other).exists()


def test_run_quickstart_toy_writes_summary_and_report(tmp_path) -> None:
    from preftune.errors import ConfigError
    from preftune.tasks.quickstart import run_quickstart

    cfg = replace(TOY, max_steps=2, batch_size=4)
    logs: list[str] = []
    summary = run_quickstart(tmp_path, seed=1, config=cfg, log=logs.append, progress=False)
    assert _stage_numbers(logs) == ["1/5", "2/5", "3/5", "4/5", "5/5"]
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["method"] == summary["method"] == "dpo"
    assert on_disk["steps"] == 2 and on_disk["seconds"] > 0
    for key in ("accuracy_before", "accuracy_after", "accuracy_before_sampled", "accuracy_after_sampled"):
        assert 0.0 <= on_disk[key] <= 1.0
    # "before" is the SFT model's greedy accuracy, recomputed independently.
    sft = evaluate_accuracy(tmp_path / "sft", ArithmeticTask(level=TOY.level), on_disk_heldout(tmp_path))
    assert sft == on_disk["accuracy_before"]
    html = (tmp_path / "report.html").read_text()
    assert "task-accuracy" in html and "held-out samples" in html
    assert (tmp_path / "final" / "config.json").is_file()
    with pytest.raises(ConfigError, match="already holds a run"):
        run_quickstart(tmp_path, config=cfg, log=lambda _m: None, progress=False)


def on_disk_heldout(run: Path) -> list[str]:
    return [r["prompt"] for r in _rows(run / "data" / "heldout.jsonl")]


def test_sft_stops_at_its_accuracy_target(tmp_path: Path) -> None:
    """Checks every `check_every` steps from `check_from`; a reachable target (0: any model reaches it)
    stops at the first check, an unreachable one runs every step with a check at each scheduled step."""
    from preftune.tasks.sft import greedy_accuracy, train_sft

    task = ArithmeticTask(level=1)
    small = SFTConfig(hidden_size=24, num_layers=1, steps=12, batch_size=8, warmup_steps=2, check_prompts=6)
    stop = train_sft(task, tmp_path / "a", replace(small, target_accuracy=0.0, check_from=4, check_every=3))
    assert stop.reached_target and stop.steps == 4 and [s for s, _ in stop.checks] == [4]
    full = train_sft(task, tmp_path / "b", replace(small, target_accuracy=1.0, check_from=4, check_every=3))
    assert not full.reached_target and full.steps == 12
    assert [s for s, _ in full.checks] == [4, 7, 10]
    # the check's accuracy is the verifier's verdict on the decoded greedy answers, counted by hand
    from transformers import AutoTokenizer

    from preftune.models.load import load_causal_lm
    from preftune.tasks.quickstart import sample_responses

    prompts = [p.prompt for p in task.problems(6, seed=5)]
    model = load_causal_lm(str(full.model_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(full.model_dir))
    answers = sample_responses(model, task, prompts, num_samples=1, temperature=0.0, seed=0)
    right = sum(task.reward(p, a[0]) for p, a in zip(prompts, answers))
    assert greedy_accuracy(model, tokenizer, task, prompts) == right / len(prompts)
    assert evaluate_accuracy(model, task, prompts) == right / len(prompts)  # the quickstart's greedy figure
    model.train()  # greedy_accuracy evaluates in eval mode and leaves the mode as it found it
    greedy_accuracy(model, tokenizer, task, prompts)
    assert model.training


def test_run_quickstart_online_method_trains_on_its_own_samples(tmp_path: Path) -> None:
    from preftune.tasks.quickstart import run_quickstart

    cfg = replace(TOY, online_steps=2, online_batch_size=2, num_generations=2)
    logs: list[str] = []
    summary = run_quickstart(tmp_path, method="grpo", seed=1, config=cfg, log=logs.append, progress=False)
    assert summary["method"] == "grpo" and summary["steps"] == 2
    assert 0.0 <= summary["accuracy_after"] <= 1.0 and "accuracy_before" in summary
    assert "sampling" not in summary["quickstart"]  # no pairs were sampled
    # only what the online run reads (its prompts) and the held-out prompts: no pairs files
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["heldout.jsonl", "prompts.jsonl"]
    # SFT, writing + measuring, training, accuracy: numbered without the skipped sampling stage
    assert _stage_numbers(logs) == ["1/4", "2/4", "3/4", "4/4"]
    prompts = [r["prompt"] for r in _rows(tmp_path / "data" / "prompts.jsonl")]
    assert prompts and not set(prompts) & set(on_disk_heldout(tmp_path))  # held-out prompts stay out
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all("accuracy" in r and "reward" in r for r in rows)


def test_run_quickstart_rto_uses_its_own_dpo_model_as_the_token_reward(tmp_path: Path) -> None:
    """`--method rto`: the quickstart's DPO run (on its pairs, into OUT/dpo) comes first, and RTO trains
    from the SFT model with that DPO model as `dpo_model`; without one, rto is refused (test_rl_ppo)."""
    from safetensors.torch import load_file

    from preftune.tasks.quickstart import run_quickstart

    cfg = replace(TOY, max_steps=2, batch_size=4, online_steps=2, online_batch_size=2, num_generations=2)
    logs: list[str] = []
    summary = run_quickstart(tmp_path, method="rto", seed=1, config=cfg, log=logs.append, progress=False)
    # SFT, sampling, writing, the DPO run, the RTO run, accuracy: six stages, each its own number
    assert _stage_numbers(logs) == [f"{k}/6" for k in range(1, 7)]
    dpo_final = tmp_path / "dpo" / "final"
    assert summary["method"] == "rto" and summary["steps"] == 2 and summary["dpo_model"] == str(dpo_final)
    dpo_config = yaml.safe_load((tmp_path / "dpo" / "config.yaml").read_text())
    assert dpo_config["method"] == "dpo" and dpo_config["data"] == str(tmp_path / "data" / "pairs.jsonl")
    assert dpo_config["model"] == str(tmp_path / "sft") and dpo_config["max_steps"] == 2
    rto_config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert rto_config["method"] == "rto" and rto_config["model"] == str(tmp_path / "sft")
    assert rto_config["dpo_model"] == str(dpo_final)
    # the token reward is the DPO model, not the SFT model: two DPO steps moved its weights
    sft, dpo = (
        load_file(str(tmp_path / "sft" / "model.safetensors")),
        load_file(str(dpo_final / "model.safetensors")),
    )
    assert any(not torch.equal(sft[k], dpo[k]) for k in sft)
    assert _rows(tmp_path / "data" / "pairs.jsonl")  # the DPO run's pairs were sampled


def test_quickstart_remax_spends_the_same_completions_per_prompt(tmp_path: Path) -> None:
    """ReMax's greedy baseline is a completion too: G − 1 samples + 1 greedy = the G of grpo / rloo."""
    from preftune.tasks.quickstart import Artifacts, QuickstartConfig, _online_config

    task = ArithmeticTask()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p.prompt}) + "\n" for p in task.problems(4, seed=0)))
    art = Artifacts(tmp_path, task, tmp_path / "sft", *(tmp_path / "x.jsonl",) * 4, [], prompts_path=prompts)
    cfg = QuickstartConfig()
    generations = {
        m: _online_config(m, art, cfg, 0, False).num_generations for m in ("grpo", "rloo", "remax")
    }
    assert generations == {
        "grpo": cfg.num_generations,
        "rloo": cfg.num_generations,
        "remax": cfg.num_generations - 1,
    }
    assert {_online_config(m, art, cfg, 0, False).lr for m in ("grpo", "rloo", "remax")} == {cfg.online_lr}


def test_quickstart_online_runs_take_the_tasks_options(tmp_path: Path) -> None:
    """On the 0/1 verifier RAFT keeps every correct sample and only those (keep 0, min_reward 1) and
    the online pair methods take the offline quickstart's β; the policy-gradient presets none."""
    from preftune.config import resolve_objective
    from preftune.rl.builders import builder_settings
    from preftune.tasks.quickstart import Artifacts, QuickstartConfig, _online_config

    task = ArithmeticTask()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p.prompt}) + "\n" for p in task.problems(4, seed=0)))
    art = Artifacts(tmp_path, task, tmp_path / "sft", *(tmp_path / "x.jsonl",) * 4, [], prompts_path=prompts)
    cfg = QuickstartConfig(beta=0.7)
    configs = {m: _online_config(m, art, cfg, 0, False) for m in ("raft", "online_dpo", "dno", "xpo", "grpo")}
    assert builder_settings(configs["raft"]) == ("best_of_k", {"keep": 0, "min_reward": 1.0})
    for m in ("online_dpo", "dno", "xpo"):
        assert {s.name: h["beta"] for s, _, h in resolve_objective(configs[m])} == {
            "dpo" if m != "xpo" else "xpo_loss": 0.7
        }
    assert configs["grpo"].hparams == {}


def test_quickstart_help_states_the_configs_schedules() -> None:
    """`preftune quickstart --help` names the defaults QuickstartConfig really has."""
    import argparse

    from preftune.tasks.commands import register
    from preftune.tasks.quickstart import QuickstartConfig

    sub = argparse.ArgumentParser().add_subparsers()
    register(sub)
    cfg = QuickstartConfig()
    text = " ".join(sub.choices["quickstart"].format_help().split())
    from preftune.tasks.diffusion_quickstart import DiffusionQuickstartConfig

    diff = DiffusionQuickstartConfig()
    assert (
        f"(default {cfg.max_steps}; online methods {cfg.online_steps}; --task diffusion {diff.max_steps})"
        in text
    )
    lr, online_lr, diff_lr = (f"{x:g}".replace("e-0", "e-") for x in (cfg.lr, cfg.online_lr, diff.lr))  # 3e-5
    assert f"(default {lr}; online methods {online_lr}; --task diffusion {diff_lr})" in text
    assert f"(--task diffusion: {diff.beta:g})" in text


def test_quickstart_offline_run_refuses_artifacts_prepared_without_pairs(tmp_path: Path) -> None:
    """prepare(with_pairs=False) writes no pairs files and leaves their paths None; an offline run
    on such artifacts is refused by name, not started on a missing file."""
    from preftune.errors import ConfigError
    from preftune.tasks.quickstart import Artifacts, QuickstartConfig, _offline_config

    art = Artifacts(tmp_path, ArithmeticTask(), tmp_path / "sft", None, None, None, tmp_path / "h.jsonl", [])
    with pytest.raises(ConfigError, match="dpo trains on pairs, but .* was prepared without them"):
        _offline_config("dpo", art, QuickstartConfig(), 0, False, tmp_path / "dpo")
