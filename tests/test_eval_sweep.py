"""Sweep orchestration with an injected train function: shared reference cache, failures kept, report."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from preftune.config import TrainConfig
from preftune.errors import ConfigError
from preftune.eval.kl import KLEstimate
from preftune.eval.sweep import SweepTask, parse_methods, run_sweep
from preftune.train.signals import Interrupted


class FakeTrainer:
    """Writes a run folder like the trainer and, like it, writes the reference cache only on a miss."""

    def __init__(self, fail: str) -> None:
        self.fail = fail
        self.configs: list[TrainConfig] = []

    def __call__(self, config: TrainConfig):
        self.configs.append(config)
        if config.method == self.fail:
            raise RuntimeError("loss went NaN")
        out = Path(config.out)
        out.mkdir(parents=True)
        if config.method != "simpo":  # reference-free: never touches the cache
            table = Path(config.cache_dir) / "reference" / "fp.safetensors"
            if not table.exists():
                table.parent.mkdir(parents=True, exist_ok=True)
                table.write_bytes(b"reference log-probs")
        start = {"dpo": 0.69, "rdpo": 0.7, "simpo": 1.2}[config.method]
        lines = [
            json.dumps(
                {
                    "step": s,
                    "split": "train",
                    "loss": start / s,
                    "rewards/accuracy": 0.5 + s / 40,
                    "logps/chosen_per_token": -1.0 - s / 100,
                }
            )
            for s in range(1, 21)
        ]
        lines.append(json.dumps({"step": 20, "split": "eval", "loss": start / 15, "rewards/accuracy": 0.75}))
        (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        metrics = {"loss": start / 20, "eval/loss": start / 15, "eval/rewards/accuracy": 0.75}
        return SimpleNamespace(final_dir=out / "final", steps=20, metrics=metrics)


def test_sweep_shares_the_reference_cache_and_keeps_going_after_a_failure(tmp_path):
    base = TrainConfig(model="m", data="d.jsonl", out="ignored", max_steps=20)
    trainer = FakeTrainer(fail="ipo")
    evaluated = []

    def evaluate(final_dir, config):
        evaluated.append(config.method)
        acc = {"dpo": 0.6, "rdpo": 0.55, "simpo": 0.5}[config.method]
        return acc, KLEstimate(mean=2.0 * acc, stderr=0.1, samples=8, mean_length=5.0)

    result = run_sweep(
        ["dpo", "ipo", "rdpo", "simpo"],
        base,
        tmp_path / "sweep",
        train_fn=trainer,
        evaluate_fn=evaluate,
        log=lambda _m: None,
    )
    # every run asked for the same cache folder, each wrote its own run folder
    assert {c.cache_dir for c in trainer.configs} == {str(tmp_path / "sweep" / "cache")}
    assert [c.out for c in trainer.configs] == [
        str(tmp_path / "sweep" / m) for m in ("dpo", "ipo", "rdpo", "simpo")
    ]
    assert all(c.max_steps == 20 and c.model == "m" for c in trainer.configs)
    by = {r.method: r for r in result.results}
    assert [by[m].reference_cache for m in ("dpo", "rdpo", "simpo")] == [
        "computed",
        "reused",
        "reference-free",
    ]
    assert by["ipo"].status == "failed" and "RuntimeError: loss went NaN" in by["ipo"].error
    assert evaluated == ["dpo", "rdpo", "simpo"]  # the failed method is not evaluated, the others are
    assert by["rdpo"].accuracy == 0.55 and by["rdpo"].kl["mean"] == pytest.approx(1.1)

    data = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert data["methods"] == ["dpo", "ipo", "rdpo", "simpo"]
    assert data["reference_cache"]["computed_by"] == ["dpo"] and data["reference_cache"]["reused_by"] == [
        "rdpo"
    ]
    assert data["results"][1]["error"].startswith("RuntimeError: loss went NaN")
    page = (tmp_path / "sweep" / "sweep.html").read_text()
    assert "loss went NaN" in page and 'id="failures"' in page
    for sid in ("accuracy", "kl-accuracy", "reward-accuracy", "curves"):
        assert f'<figure id="plot-{sid}"><img' in page
    assert "<td>rdpo</td><td>ok</td><td>20</td>" in page and "55.0%" in page and "1.1 ± 0.1" in page
    assert (tmp_path / "sweep" / "dpo" / "report.html").is_file()  # each run gets its own report
    # chosen log-prob −1 − s/100: mean of the first two steps −1.015, of the last two −1.195 → flagged
    assert "Best held-out accuracy: dpo with 60.0%." in page
    assert "Over-optimisation signature (the chosen" in page and "in: dpo, rdpo, simpo" in page
    # `preftune report SWEEP_DIR` rebuilds the page from sweep.json alone
    (tmp_path / "sweep" / "sweep.html").unlink()
    from preftune.cli import main

    assert main(["report", str(tmp_path / "sweep")]) == 0
    assert "<td>rdpo</td><td>ok</td><td>20</td>" in (tmp_path / "sweep" / "sweep.html").read_text()


def test_a_run_that_recomputes_the_reference_is_reported_as_computed(tmp_path):
    base = TrainConfig(model="m", data="d.jsonl", out="x", cache_dir=str(tmp_path / "c"))

    def train(config):
        table = Path(config.cache_dir) / "reference" / "fp.safetensors"
        table.parent.mkdir(parents=True, exist_ok=True)
        table.write_bytes(table.read_bytes() + b"x" if table.exists() else b"x")  # every run misses
        return SimpleNamespace(final_dir=Path(config.out), steps=1, metrics={})

    messages = []
    result = run_sweep(["dpo", "ipo"], base, tmp_path / "s", train_fn=train, write=False, log=messages.append)
    assert [r.reference_cache for r in result.results] == ["computed", "computed"]
    assert any("written by 2 runs" in m for m in messages)


def test_parse_methods_checks_names():
    assert parse_methods("dpo, ipo,simpo") == ["dpo", "ipo", "simpo"]
    with pytest.raises(ConfigError):
        parse_methods("dpo,dpoo")
    with pytest.raises(ConfigError, match="twice"):
        parse_methods("dpo,dpo")


def test_an_interrupted_sweep_still_writes_what_it_has(tmp_path):
    base = TrainConfig(model="m", data="d.jsonl", out="x")
    trainer = FakeTrainer(fail="none")

    def train(config):
        if config.method == "rdpo":
            raise KeyboardInterrupt  # Ctrl-C is not a method failure: it stops the sweep
        return trainer(config)

    with pytest.raises(Interrupted, match="not started: simpo") as stopped:
        run_sweep(["dpo", "rdpo", "simpo"], base, tmp_path / "s", train_fn=train, log=lambda _m: None)
    assert stopped.value.exit_code == 130
    data = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert data["methods"] == ["dpo", "rdpo"] and data["results"][0]["status"] == "ok"
    assert data["results"][1]["status"] == "interrupted"
    assert "<td>dpo</td><td>ok</td>" in (tmp_path / "s" / "sweep.html").read_text()


def test_builtin_task_reuses_a_prepared_folder_with_the_same_seed(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from preftune.data.char_tokenizer import build_char_tokenizer
    from preftune.eval import builtin

    build_char_tokenizer().save_pretrained(tmp_path / "sft")
    for name in ("pairs.jsonl", "eval_pairs.jsonl"):
        (tmp_path / name).write_text("{}\n")
    manifest = {
        "seed": 0,
        "level": 1,
        "ops": "+",
        "sft_dir": str(tmp_path / "sft"),
        "pairs_path": str(tmp_path / "pairs.jsonl"),
        "eval_pairs_path": str(tmp_path / "eval_pairs.jsonl"),
        "heldout_prompts": ["12+3=\n", "4+5=\n"],
        "accuracy_before": {"greedy": 0.7, "sampled": 0.5},
    }
    (tmp_path / "task.json").write_text(json.dumps(manifest))

    def prepare(*_a, **_k):
        raise AssertionError("prepare must not run again")

    fake = SimpleNamespace(
        QuickstartConfig=lambda: SimpleNamespace(max_steps=60, batch_size=8, lr=1e-4),
        prepare=prepare,
        online_settings=lambda cfg, task, prompts: {"prompts": str(prompts), "reward": "arithmetic"},
        evaluate_accuracy=lambda final, task, prompts, greedy: (
            0.25 if (task.level, len(prompts)) == (1, 2) else 0
        ),
    )
    monkeypatch.setattr(builtin, "_quickstart", lambda: fake)
    values, task = builtin.builtin_task(tmp_path, seed=0, log=lambda _m: None)
    assert values == {
        "model": str(tmp_path / "sft"),
        "data": str(tmp_path / "pairs.jsonl"),
        "eval_data": str(tmp_path / "eval_pairs.jsonl"),
        "max_steps": 60,
        "batch_size": 8,
        "lr": 1e-4,
        "eval_every": 10,
        "seed": 0,
    }
    assert task.baseline_accuracy == 0.7 and task.accuracy(tmp_path) == 0.25
    # online methods: the quickstart's training prompts (written next to the pairs) and the verifier
    assert task.online == {"prompts": str(tmp_path / "data" / "prompts.jsonl"), "reward": "arithmetic"}
    # char ids: <pad>,<s>,</s>,<unk> are 0-3, then a-z, A-Z, 0-9: '1' = 4 + 52 + 1
    assert task.prompts[0][:2] == [57, 58] and len(task.prompts) == 2
    with pytest.raises(AssertionError, match="must not run again"):  # another seed: a fresh preparation
        builtin.builtin_task(tmp_path, seed=1, log=lambda _m: None)
    # another training schedule (the preference or online runs'): the same preparation, reused
    (tmp_path / "task.json").write_text(
        json.dumps({**manifest, "recipe": {"max_steps": 150, "online_lr": 1}})
    )
    assert builtin.builtin_task(tmp_path, seed=0, log=lambda _m: None)[0]["model"] == str(tmp_path / "sft")
    (tmp_path / "task.json").write_text(json.dumps({**manifest, "recipe": {"level": 3}}))
    with pytest.raises(AssertionError, match="must not run again"):  # another recipe: a fresh preparation
        builtin.builtin_task(tmp_path, seed=0, log=lambda _m: None)


def test_sweep_into_a_folder_with_runs_fails_before_any_work(tmp_path: Path, capsys) -> None:
    """A second sweep into the same --out would train the SFT model again and then fail per method;
    it stops at once and names the way to reuse the prepared task."""
    from preftune.cli import main

    (tmp_path / "s" / "ipo").mkdir(parents=True)
    (tmp_path / "s" / "ipo" / "metrics.jsonl").write_text("{}\n")
    assert main(["sweep", "--methods", "dpo,ipo", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 's' / 'ipo'} already holds a run" in err
    assert f"--task-dir {tmp_path / 's' / 'task'}" in err
    assert not (tmp_path / "s" / "task").exists()  # nothing was prepared


def test_sweep_compares_offline_and_online_methods_in_one_report(tmp_path):
    """dpo, grpo, rloo, remax and bnpo on a tiny model: the online runs take the task's prompts and
    reward, not the pairs; the page shows their sample reward next to DPO's pairwise metrics."""
    from preftune.eval.sweep import SweepTask
    from test_train_fixtures import pair_rows, tiny_model, write_jsonl

    tiny_model(tmp_path / "model")
    write_jsonl(tmp_path / "prefs.jsonl", pair_rows(8))
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"{a}+{b}="} for a in range(4) for b in range(2)])
    (tmp_path / "rewards.py").write_text(
        "def digits(prompts, completions, **kwargs):\n"
        "    return [float(sum(ch.isdigit() for ch in c)) for c in completions]\n"
    )
    base = TrainConfig(
        model=str(tmp_path / "model"), data=str(tmp_path / "prefs.jsonl"), out="x", max_steps=2,
        batch_size=4, progress=False,
    )  # fmt: skip
    online = {"prompts": str(tmp_path / "prompts.jsonl"), "reward": f"{tmp_path / 'rewards.py'}:digits",
              "num_generations": 4, "max_completion_length": 4}  # fmt: skip
    methods = ["dpo", "grpo", "rloo", "remax", "bnpo"]
    assert parse_methods(",".join(methods)) == methods
    task = SweepTask([], online=online, online_overrides={"remax": {"num_generations": 3, "lr": 1e-4}})
    result = run_sweep(methods, base, tmp_path / "s", task=task, log=lambda _m: None)
    assert [(r.method, r.status, r.steps) for r in result.results] == [(m, "ok", 2) for m in methods], [
        r.error for r in result.results
    ]
    by = {r.method: r for r in result.results}
    assert "reward" in by["grpo"].metrics and "zero_signal_fraction" in by["rloo"].metrics
    assert "reward" not in by["dpo"].metrics and "rewards/accuracy" in by["dpo"].metrics
    assert by["remax"].reference_cache == "reference-free" and by["dpo"].reference_cache == "computed"
    saved = yaml.safe_load((tmp_path / "s" / "grpo" / "config.yaml").read_text())
    assert saved["prompts"] == online["prompts"] and saved["data"] is None and saved["max_steps"] == 2
    assert (saved["num_generations"], saved["lr"]) == (4, base.lr)
    remax = yaml.safe_load((tmp_path / "s" / "remax" / "config.yaml").read_text())
    assert (remax["num_generations"], remax["lr"], remax["prompts"]) == (3, 1e-4, online["prompts"])
    page = (tmp_path / "s" / "sweep.html").read_text()
    assert "<th>sample reward</th>" in page and "<th>zero-signal frac.</th>" in page
    assert '<figure id="plot-curves"><img' in page


def test_rto_in_a_sweep_takes_the_sweeps_own_dpo_run_as_its_token_reward(tmp_path):
    """`--methods dpo,rto`: rto trains with dpo_model = OUT/dpo/final; without a dpo run before it
    (or when dpo failed), rto fails with the check's message and the other methods still run."""
    from preftune.config import validate

    seen: list[TrainConfig] = []

    def fake_train(config: TrainConfig) -> SimpleNamespace:
        validate(config)  # the real trainer's checks
        seen.append(config)
        Path(config.out).mkdir(parents=True)
        return SimpleNamespace(final_dir=Path(config.out) / "final", steps=1, metrics={})

    base = TrainConfig(model="m", data="prefs.jsonl", out="x", progress=False)
    online = {"prompts": "p.jsonl", "reward": "arithmetic"}
    result = run_sweep(["dpo", "rto"], base, tmp_path / "a", task=SweepTask([], online=online),
                       train_fn=fake_train, write=False, log=lambda _m: None)  # fmt: skip
    assert [(r.method, r.status) for r in result.results] == [("dpo", "ok"), ("rto", "ok")]
    assert seen[1].dpo_model == str(tmp_path / "a" / "dpo" / "final") and seen[0].dpo_model is None
    alone = run_sweep(["rto", "grpo"], base, tmp_path / "b", task=SweepTask([], online=online),
                      train_fn=fake_train, write=False, log=lambda _m: None)  # fmt: skip
    assert [r.status for r in alone.results] == ["failed", "ok"]
    assert "list dpo before rto in --methods" in str(alone.results[0].error)


def test_builtin_sweep_flags_override_the_online_schedule_too(tmp_path, monkeypatch):
    """On the built-in task the online methods' schedule (the quickstart's online_* values) yields to
    the command line like the offline one: --max-steps 3 shortens every run."""
    import preftune.eval.builtin as builtin
    import preftune.eval.sweep as sweep
    from preftune.cli import main

    online = {"prompts": "p.jsonl", "reward": "arithmetic", "max_steps": 100, "lr": 5e-5}
    task = SweepTask([], online=dict(online))
    values = {"model": "m", "data": "d.jsonl", "max_steps": 100, "lr": 3e-5}
    monkeypatch.setattr(builtin, "builtin_task", lambda folder, seed, log: (dict(values), task))
    captured: dict[str, object] = {}

    def fake_run_sweep(methods, base, out, task, evaluate_fn, **_resume):
        captured.update(base=base, online=dict(task.online))
        return SimpleNamespace(results=[SimpleNamespace(method="grpo", status="ok")])

    monkeypatch.setattr(sweep, "run_sweep", fake_run_sweep)
    assert (
        main(
            [
                "sweep",
                "--methods",
                "grpo",
                "--out",
                str(tmp_path / "s"),
                "--max-steps",
                "3",
                "--kl-samples",
                "0",
            ]
        )
        == 0
    )
    assert captured["online"] == {"prompts": "p.jsonl", "reward": "arithmetic", "lr": 5e-5}
    assert captured["base"].max_steps == 3 and captured["base"].lr == 3e-5  # type: ignore[attr-defined]


def test_each_run_records_its_process_cpu_time_next_to_its_wall_time(tmp_path):
    """On a shared machine wall time ranks costs only roughly: each result also holds the CPU seconds
    of its training call (time.process_time), shown in the table. A run that burns ≥ 0.05 s of CPU
    records at least that; a run that sleeps records wall time but almost no CPU."""
    import time

    base = TrainConfig(model="m", data="d.jsonl", out="x")

    def train(config):
        if config.method == "dpo":
            start = time.process_time()
            while time.process_time() - start < 0.05:
                pass
        else:
            time.sleep(0.05)
        return SimpleNamespace(final_dir=Path(config.out), steps=1, metrics={})

    result = run_sweep(["dpo", "ipo"], base, tmp_path / "s", train_fn=train, log=lambda _m: None)
    dpo, ipo = result.results
    assert dpo.cpu_seconds >= 0.05 and ipo.seconds >= 0.05 and ipo.cpu_seconds < 0.04
    data = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert data["results"][0]["cpu_seconds"] == pytest.approx(dpo.cpu_seconds)
    assert "<th>CPU (s)</th>" in (tmp_path / "s" / "sweep.html").read_text()


def test_online_methods_take_their_task_options_under_the_command_lines(tmp_path):
    """The built-in task's per-method options (RAFT keeps the correct samples, the pair methods take the
    quickstart's β) reach only their method; a value given for the whole sweep wins over them."""
    from preftune.eval.builtin import online_method_hparams
    from preftune.tasks.quickstart import QuickstartConfig

    options = online_method_hparams(QuickstartConfig())
    assert options == {
        "raft": {"keep": 0, "min_reward": 1.0},
        "online_dpo": {"beta": 1.0},
        "dno": {"beta": 1.0},
        "xpo": {"beta": 1.0},
    }
    task = SweepTask([], online={"prompts": "p.jsonl", "reward": "arithmetic"}, online_hparams=options)
    configs: list[TrainConfig] = []

    def train(config):
        configs.append(config)
        return SimpleNamespace(final_dir=Path(config.out), steps=1, metrics={})

    def hparams_of(methods, given):
        base = TrainConfig(model="m", data="d.jsonl", out="x", hparams=given)
        run_sweep(methods, base, tmp_path / "s", task=task, train_fn=train, write=False, log=lambda _m: None)
        return {c.method: c.hparams for c in configs[-len(methods) :]}

    assert hparams_of(["raft", "online_dpo", "grpo", "dpo"], {}) == {
        "raft": {"keep": 0, "min_reward": 1.0},
        "online_dpo": {"beta": 1.0},
        "grpo": {},
        "dpo": {},
    }
    assert hparams_of(["raft"], {"min_reward": 0.5}) == {"raft": {"keep": 0, "min_reward": 0.5}}
    # given for one term (TERM.KEY) wins too: the task's flat β would otherwise be a second value
    assert hparams_of(["online_dpo"], {"dpo.beta": 0.3}) == {"online_dpo": {"dpo.beta": 0.3}}


def test_a_sweep_on_the_builtin_task_gives_remax_the_quickstarts_completion_budget() -> None:
    from preftune.eval.builtin import online_method_overrides
    from preftune.tasks.quickstart import QuickstartConfig

    cfg = QuickstartConfig()
    assert online_method_overrides(cfg) == {"remax": {"num_generations": cfg.num_generations - 1}}


def test_a_sweep_of_online_methods_needs_no_preference_data(tmp_path, capsys):
    """`--model M --prompts P --reward R` with online methods only used to be refused ("give both
    --model and --data"), and prompt rows as --eval-data could not be read; the KL prompts are now the
    held-out prompts. An offline method in the list still needs --data, and says so."""
    from preftune.cli import main
    from test_train_fixtures import tiny_model, write_jsonl

    tiny_model(tmp_path / "model")
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"{a}+{b}="} for a in range(4) for b in range(2)])
    write_jsonl(tmp_path / "held.jsonl", [{"prompt": f"{a}+{a}=", "answer": 2 * a} for a in range(3)])
    (tmp_path / "rewards.py").write_text(
        "def digits(prompts, completions, **kw):\n    return [1.0 * len(c) for c in completions]\n"
    )
    args = ["sweep", "--model", str(tmp_path / "model"), "--prompts", str(tmp_path / "prompts.jsonl"),
            "--reward", f"{tmp_path / 'rewards.py'}:digits", "--eval-data", str(tmp_path / "held.jsonl"),
            "--max-steps", "1", "--batch-size", "4", "--num-generations", "2", "--max-completion-length", "4",
            "--kl-prompts", "2", "--kl-samples", "2", "--kl-max-new-tokens", "4"]  # fmt: skip
    assert main([*args, "--methods", "grpo,rloo", "--out", str(tmp_path / "s")]) == 0
    data = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert [(r["method"], r["status"]) for r in data["results"]] == [("grpo", "ok"), ("rloo", "ok")]
    assert "2 prompts of" in data["task"] and "held.jsonl" in data["task"]
    capsys.readouterr()
    assert main([*args, "--methods", "grpo,dpo", "--out", str(tmp_path / "s2")]) == 2
    assert "sweep: dpo train on preference pairs — give --data" in capsys.readouterr().err
