"""The run folder's lifecycle: resume rules, resume without a checkpoint, signals, the folder lock,
`--out` checks, metrics-log repair, summary.json after a kill and report.html at the end.

Every resumed run is compared bit for bit with an uninterrupted one (constant learning rate after one
warmup step, so that a run may also be extended exactly)."""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import preftune.train.api as api
import preftune.train.run as train_run
from preftune.cli import main
from preftune.config import TrainConfig, save_config
from slow_steps import slow_step_driver
from test_train_fixtures import pair_rows, stopped_before_final, tiny_model, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

Setup = tuple[Path, list[str]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    """A tiny model, 24 pairs, and the finished 4-step run `whole` every resumed run must equal."""
    root = tmp_path_factory.mktemp("runfolder")
    model = tiny_model(root / "model")
    data = write_jsonl(root / "pairs.jsonl", pair_rows(24))
    args = [
        "train",
        "dpo",
        "--model",
        str(model),
        "--data",
        str(data),
        "--eval-data",
        str(data),
        "--cache-dir",
        str(root / "cache"),
        "--batch-size",
        "4",
        "--lr",
        "3e-3",
        "--scheduler",
        "constant",
        "--warmup-steps",
        "1",
        "--max-steps",
        "4",
        "--no-progress",
    ]
    assert main([*args, "--out", str(root / "whole")]) == 0
    return root, args


def assert_same_final(expected: Path, got: Path) -> None:
    a = load_file(str(expected / "final" / "model.safetensors"))
    b = load_file(str(got / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def on_step(monkeypatch: pytest.MonkeyPatch, step: int, action: Any) -> None:
    """Call `action()` when optimizer step `step` starts (its forward pass), then go on."""
    real, calls = train_run.objective_on_batch, {"n": 0}

    def patched(*a: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == step:
            action()
        return real(*a, **kw)

    monkeypatch.setattr(train_run, "objective_on_batch", patched)


def crash() -> None:
    raise RuntimeError("crashed")


def metric_steps(out: Path) -> list[tuple[int, str]]:
    return [
        (r["step"], r["split"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    ]


def test_a_changed_setting_is_refused_by_name_and_the_suggested_command_resumes_exactly(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root, args = setup
    out = root / "changed"
    on_step(monkeypatch, 4, crash)  # step 4 fails; step-2 is the newest checkpoint
    with pytest.raises(RuntimeError):
        main([*args, "--save-every", "2", "--out", str(out)])
    monkeypatch.undo()
    saved = (out / "config.yaml").read_bytes()
    capsys.readouterr()
    assert main([*args, "--out", str(out), "--resume", "--lr", "1e-3", "--beta", "0.2", "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "lr: 0.003 → 0.001; seed: 0 → 3; dpo.beta: 0.1 → 0.2" in err
    assert "save_every" not in err.split("would break")[1].split(". Resume")[0]  # a safe change
    assert (out / "config.yaml").read_bytes() == saved  # a refused resume leaves the config alone
    fix = re.search(r"— (preftune train --config \S+ --resume) ", err)
    assert fix is not None, err
    assert main(shlex.split(fix.group(1))[1:]) == 0
    assert_same_final(root / "whole", out)
    # --resume PATH into another folder: compared with the config of the run that wrote PATH
    other = root / "from-checkpoint"
    assert (
        main([*args, "--out", str(other), "--resume", str(out / "checkpoints" / "step-4"), "--lr", "1e-3"])
        == 2
    )
    assert (
        f"differ from the run's ({out / 'config.yaml'}) and would break an exact resume: lr: 0.003 → 0.001"
        in (capsys.readouterr().err)
    )


def test_a_checkpoint_of_another_run_is_not_resumed_into_a_folder_with_a_run_of_its_own(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--out MINE --resume THEIRS/checkpoints/step-4`: the settings must equal THEIRS's run (its
    weights and optimizer state were trained so; the optimizer state would bring back its lr while
    MINE's config.yaml claimed another) and MINE's run (whose checkpoints and metrics would be
    overwritten). Either refusal leaves MINE as it was."""
    root, args = setup
    mine, theirs = root / "mine", root / "whole" / "checkpoints" / "step-4"
    assert main([*args, "--out", str(mine), "--lr", "1e-3", "--save-every", "2"]) == 0
    before = {p: p.read_bytes() for p in mine.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main([*args, "--out", str(mine), "--lr", "1e-3", "--resume", str(theirs)]) == 2
    assert (
        f"differ from the run's ({root / 'whole' / 'config.yaml'}) and would break an exact resume: lr: 0.003 → 0.001"
        in (capsys.readouterr().err)
    )
    assert main([*args, "--out", str(mine), "--resume", str(theirs)]) == 2
    assert (
        f"differ from the run's ({mine / 'config.yaml'}) and would break an exact resume: lr: 0.001 → 0.003"
        in (capsys.readouterr().err)
    )
    assert {p: p.read_bytes() for p in mine.rglob("*") if p.is_file()} == before


def test_safe_settings_may_change_and_a_constant_lr_run_may_be_extended_exactly(
    setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, args = setup
    longer = [*args, "--max-steps", "6"]
    assert main([*longer, "--out", str(tmp_path / "six")]) == 0
    out = tmp_path / "extended"
    assert main([*args, "--out", str(out)]) == 0  # a finished 4-step run
    capsys.readouterr()
    assert main([*longer, "--out", str(out), "--resume", "--save-every", "1", "--keep-last", "3"]) == 0
    assert "resuming from step 4 of 6" in capsys.readouterr().out
    assert_same_final(tmp_path / "six", out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-4", "step-5", "step-6"]
    assert "max_steps: 6" in (out / "config.yaml").read_text()  # the accepted settings are recorded


def test_extending_a_decaying_schedule_is_refused_with_the_reason(
    setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, args = setup
    out = tmp_path / "cosine"
    (out / "checkpoints" / "step-2").mkdir(parents=True)  # refused before any checkpoint is read
    config = TrainConfig(
        model=str(root / "model"),
        data=str(root / "pairs.jsonl"),
        out=str(out),
        scheduler="cosine",
        max_steps=4,
    )
    save_config(config, out / "config.yaml")
    base = ["train", "--config", str(out / "config.yaml"), "--resume", "--no-progress"]
    assert main([*base, "--max-steps", "6"]) == 2
    err = capsys.readouterr().err
    assert "max_steps: 4 → 6 (max_steps: scheduler=cosine decays over the total steps)" in err


def test_resume_without_a_checkpoint_starts_over_in_the_same_folder(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root, args = setup
    out = root / "early"
    on_step(monkeypatch, 2, crash)  # save_every 0: no checkpoint before the end
    with pytest.raises(RuntimeError):
        main([*args, "--out", str(out)])
    monkeypatch.undo()
    assert metric_steps(out) == [(1, "train")] and not (out / "checkpoints").exists()
    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 2  # never overwritten without --resume
    assert (
        "already has a run (no checkpoint yet) — pass --resume to continue it (it restarts from step 0"
        in (capsys.readouterr().err)
    )
    assert main([*args, "--out", str(out), "--resume", "--lr", "1e-3"]) == 0  # nothing kept: any setting
    assert f"no checkpoint under {out / 'checkpoints'} yet — starting from step 0" in capsys.readouterr().out
    assert metric_steps(out) == [(1, "train"), (2, "train"), (3, "train"), (4, "train"), (4, "eval")]
    assert "lr: 0.001" in (out / "config.yaml").read_text()


def test_a_run_with_relative_paths_resumes_from_its_own_folder_only(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """config.yaml keeps the paths as given: `--config runs/x/config.yaml --resume` from another
    folder used to start a new run there from step 0. The printed command now changes to the run's
    starting folder first, and a resume from elsewhere is refused, naming that folder."""
    root, args = setup
    monkeypatch.chdir(root)
    on_step(monkeypatch, 2, lambda: os.kill(os.getpid(), signal.SIGTERM))
    capsys.readouterr()
    assert main([*args, "--out", "runs/rel"]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    command = f"cd {shlex.quote(str(root))} && preftune train --config runs/rel/config.yaml --resume"
    assert err.strip().endswith(f"resume with: {command}"), err[-500:]
    (root / "elsewhere").mkdir()
    monkeypatch.chdir(root / "elsewhere")
    assert main(["train", "--config", "../runs/rel/config.yaml", "--resume"]) != 0
    said = capsys.readouterr().err
    assert f"is the config of the run in {root / 'runs' / 'rel'}" in said and f"cd {root}" in said, said
    assert not (root / "elsewhere" / "runs").exists()
    monkeypatch.chdir(root)
    assert main(shlex.split(command.partition(" && ")[2])[1:]) == 0
    assert "resuming from step 2 of 4" in capsys.readouterr().out
    assert_same_final(root / "whole", root / "runs" / "rel")


def test_sigterm_saves_a_checkpoint_and_the_printed_command_resumes_exactly(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root, args = setup
    out = root / "sigterm-in-process"
    before = signal.getsignal(signal.SIGTERM)
    on_step(monkeypatch, 2, lambda: os.kill(os.getpid(), signal.SIGTERM))  # in step 2, save_every 0
    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 128 + signal.SIGTERM
    monkeypatch.undo()
    err = capsys.readouterr().err
    command = f"preftune train --config {out / 'config.yaml'} --resume"
    assert f"stopped by SIGTERM after step 2 of 4; checkpoint {out / 'checkpoints' / 'step-2'} saved" in err
    assert err.strip().endswith(f"resume with: {command}")
    assert signal.getsignal(signal.SIGTERM) == before  # the handlers are restored
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]
    assert main(shlex.split(command)[1:]) == 0
    assert "resuming from step 2 of 4" in capsys.readouterr().out
    assert_same_final(root / "whole", out)


def test_sighup_stops_the_same_way(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root, args = setup
    out = root / "sighup"
    on_step(monkeypatch, 3, lambda: os.kill(os.getpid(), signal.SIGHUP))
    assert main([*args, "--out", str(out)]) == 128 + signal.SIGHUP
    assert "stopped by SIGHUP after step 3 of 4; checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-3"]


def test_a_signal_while_final_is_written_says_what_is_saved_and_the_command_finishes_the_run(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGTERM after the last step, during the final save: the run used to end with no word (SIGTERM)
    or "preftune: interrupted" (Ctrl-C). It now says that final/ was not written, names the newest
    checkpoint and the command that writes the results from it; no final.tmp/ is left."""
    root, args = setup
    out = root / "signal-in-final"
    before = signal.getsignal(signal.SIGTERM)
    real = api.save_final

    def signalled(*a: Any, **kw: Any) -> Any:
        def half_written(*b: Any, **k: Any) -> Any:
            (out / "final.tmp").mkdir(exist_ok=True)
            os.kill(os.getpid(), signal.SIGTERM)

        monkeypatch.setattr(a[0], "save_pretrained", half_written)
        return real(*a, **kw)

    monkeypatch.setattr(api, "save_final", signalled)
    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 128 + signal.SIGTERM
    monkeypatch.undo()
    expected, command = stopped_before_final("SIGTERM", 4, out)
    assert capsys.readouterr().err.strip().splitlines()[-1] == expected
    assert signal.getsignal(signal.SIGTERM) == before  # the handlers are restored
    assert not (out / "final").exists() and not (out / "final.tmp").exists()
    assert main(shlex.split(command)[1:]) == 0
    assert "resuming from step 4 of 4" in capsys.readouterr().out
    assert_same_final(root / "whole", out)
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


def test_a_signal_after_final_is_written_says_so(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C while summary.json is written: final/ is named as written; SIGHUP during the report:
    final/ and summary.json are, and `preftune report OUT` writes the report."""
    from preftune.train import runfolder

    root, args = setup
    out = root / "signal-in-summary"
    real = runfolder.write_atomic

    def in_summary(path: Path, text: str) -> None:
        if path.name == "summary.json":
            os.kill(os.getpid(), signal.SIGINT)
        real(path, text)

    monkeypatch.setattr(runfolder, "write_atomic", in_summary)
    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 130
    monkeypatch.undo()
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("preftune: error: stopped by SIGINT after training finished (step 4 of 4)"), line
    assert f"final/ is written ({out / 'final'}); summary.json was not; the newest checkpoint is" in line
    assert line.endswith(
        f"— write summary.json (and final/ again) from it with: preftune train --config {out / 'config.yaml'} --resume"
    )
    assert_same_final(root / "whole", out)
    out = root / "signal-in-report"
    monkeypatch.setattr(runfolder, "write_run_report", lambda *_: os.kill(os.getpid(), signal.SIGHUP))
    assert main([*args, "--out", str(out)]) == 128 + signal.SIGHUP
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.endswith(
        f"final/ and summary.json are written ({out}); the report was not — write it with: preftune report {out}"
    ), line


def test_a_second_ctrl_c_stops_at_once_and_the_newest_checkpoint_resumes_exactly(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root, args = setup
    out = root / "ctrl-c-twice"

    def twice() -> None:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)

    on_step(monkeypatch, 3, twice)  # in step 3; step-2 is the newest checkpoint
    assert main([*args, "--save-every", "2", "--out", str(out)]) == 130
    monkeypatch.undo()
    err = capsys.readouterr().err
    command = f"preftune train --config {out / 'config.yaml'} --resume"
    expected = f"stopped at once during step 3 (a second signal); the newest checkpoint is {out / 'checkpoints' / 'step-2'}"
    assert expected in err and err.strip().endswith(f"resume with: {command}")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]
    assert main(shlex.split(command)[1:]) == 0
    assert_same_final(root / "whole", out)


LOCKER = """
import sys, time
from pathlib import Path
from preftune.train.runfolder import RunLock
RunLock(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_process_cannot_use_a_locked_folder_and_a_dead_holder_does_not_block(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    root, args = setup
    out = root / "locked"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(out)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        t0 = time.perf_counter()
        assert main([*args, "--out", str(out)]) == 2
        assert time.perf_counter() - t0 < 5  # fails at once, before any model loads
        err = capsys.readouterr().err
        assert f"run folder {out} is in use by process {holder.pid} " in err
        assert not (out / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    assert (out / ".lock").read_text().strip() == str(holder.pid)  # stale: its process is dead
    assert main([*args, "--out", str(out)]) == 0
    assert_same_final(root / "whole", out)


def test_out_that_is_a_file_or_not_writable_is_one_line(
    setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _, args = setup
    file = tmp_path / "notes.txt"
    file.write_text("x")
    assert main([*args, "--out", str(file)]) == 2
    assert f"--out {file} is a file, not a folder" in capsys.readouterr().err
    assert main([*args, "--out", str(file / "run")]) == 2
    assert f"--out {file / 'run'}: {file} is a file, not a folder" in capsys.readouterr().err
    import preftune.train.runfolder as runfolder

    monkeypatch.setattr(runfolder.os, "access", lambda path, mode: False)  # as a read-only mount
    assert main([*args, "--out", str(tmp_path / "ro")]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"preftune: error: --out {tmp_path / 'ro'}: the run folder is not writable (read-only) — "
        + ("make it writable or pass another --out\n")
    )
    monkeypatch.undo()

    def denied(self: Path, *a: Any, **kw: Any) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", denied)  # a parent folder that is not writable
    assert main([*args, "--out", str(tmp_path / "new" / "run")]) == 2
    assert f"--out {tmp_path / 'new' / 'run'}: cannot create the run folder (Permission denied)" in (
        capsys.readouterr().err
    )
    monkeypatch.undo()

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(runfolder.fcntl, "flock", no_locks)  # e.g. a network file system without locks
    assert main([*args, "--out", str(tmp_path / "nolocks")]) == 2
    lock = tmp_path / "nolocks" / ".lock"
    assert (
        f"cannot write or lock {lock} (No locks available) — make the folder writable"
        in capsys.readouterr().err
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_one_line(
    setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, args = setup
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    assert main([*args, "--out", str(folder)]) == 2
    assert "not writable" in capsys.readouterr().err


def test_a_partial_last_metrics_line_is_dropped_on_resume(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root, args = setup
    out = root / "partial"
    on_step(monkeypatch, 4, crash)
    with pytest.raises(RuntimeError):
        main([*args, "--save-every", "2", "--out", str(out)])
    monkeypatch.undo()
    log = out / "metrics.jsonl"
    good = log.read_text()
    log.write_text(good + '{"step": 4, "split": "train", "loss": 0.69')  # a kill mid-write
    capsys.readouterr()
    assert main([*args, "--save-every", "2", "--out", str(out), "--resume"]) == 0
    assert (
        f"{log}: dropped the partial last record (line 4) of an interrupted write" in capsys.readouterr().out
    )
    assert metric_steps(out) == [(1, "train"), (2, "train"), (3, "train"), (4, "train"), (4, "eval")]
    assert_same_final(root / "whole", out)
    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[0], "{garbage", *lines[1:]]) + "\n")  # damage in the middle: named
    assert main([*args, "--save-every", "2", "--out", str(out), "--resume"]) == 2
    assert (
        f"{log}:2: not a JSON object: the metrics log is damaged — delete that line"
        in capsys.readouterr().err
    )


def test_a_kill_during_the_final_save_keeps_the_eval_block_of_the_summary(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, args = setup
    out = root / "final-kill"
    monkeypatch.setattr(api, "save_final", lambda *a, **kw: crash())  # after the step-4 checkpoint
    with pytest.raises(RuntimeError):
        main([*args, "--out", str(out)])
    monkeypatch.undo()
    assert main([*args, "--out", str(out), "--resume"]) == 0  # nothing left to train: final/ + summary
    expected = json.loads((root / "whole" / "summary.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"] == expected["eval"] and set(summary["eval"]) >= {"loss", "rewards/accuracy"}
    assert_same_final(root / "whole", out)


@pytest.mark.train_report
def test_train_writes_the_report_with_preftune_eval_results(setup: Setup, tmp_path: Path) -> None:
    root, args = setup
    out = tmp_path / "reported"
    out.mkdir()  # an eval.json already there (as `preftune eval` writes it) is part of the report
    result = {"data": "held.jsonl", "reference": "sft", "metrics": {"loss": 0.4321}, "kl": {"mean": 1.25}}
    (out / "eval.json").write_text(json.dumps(result))
    assert main([*args, "--out", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert 'id="loss"' in page and 'id="final-metrics"' in page
    section = page.split('id="heldout-eval"')[1]
    assert "held.jsonl" in section and "0.4321" in section and "kl/mean" in section and "1.25" in section


DRIVER = slow_step_driver(0.4)


@pytest.mark.slow
def test_sigterm_to_a_training_process_then_resume_equals_uninterrupted(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real process: a second run into its folder fails naming its pid; SIGTERM saves and stops it."""
    root, args = setup
    out = root / "sigterm"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, *args, "--out", str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (log.is_file() and log.read_text().strip()):  # training has started
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 2
    assert f"is in use by process {proc.pid}" in capsys.readouterr().err
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    command = f"preftune train --config {out / 'config.yaml'} --resume"
    assert err.strip().endswith(f"resume with: {command}")
    step = int(re.findall(r"after step (\d) of 4", err)[0])
    assert step < 4 and (out / "checkpoints" / f"step-{step}").is_dir() and not (out / "final").exists()
    assert main(shlex.split(command)[1:]) == 0
    assert_same_final(root / "whole", out)


@pytest.mark.slow
def test_sigterm_under_torchrun_stops_every_rank_at_one_step_and_resumes_exactly(
    setup: Setup, tmp_path: Path
) -> None:
    """torchrun passes SIGTERM to both ranks; they agree on the step, save once, and the printed
    torchrun command resumes to the weights of an uninterrupted 2-process run."""
    from test_train_distributed import free_port, run_torchrun

    root, args = setup
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "stopped"
    launch = [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), str(driver)]
    proc = subprocess.Popen([*launch, *args, "--out", str(out)], env=env, stderr=subprocess.PIPE, text=True)
    log = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (log.is_file() and log.read_text().strip()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    command = f"torchrun --nproc_per_node 2 -m preftune train --config {out / 'config.yaml'} --resume"
    stops = re.findall(r"stopped by SIGTERM after step (\d) of 4", err)  # one line per rank
    assert len(stops) == 2 and stops[0] == stops[1] and f"resume with: {command}" in err, err[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step-{stops[0]}"]
    assert run_torchrun(shlex.split(command)[5:]).returncode == 0
    assert run_torchrun([*args, "--out", str(tmp_path / "whole")]).returncode == 0
    assert_same_final(tmp_path / "whole", out)
