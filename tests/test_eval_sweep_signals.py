"""A sweep stopped by SIGINT / SIGTERM: the running method keeps its checkpoint, no further method
starts, the report of what finished is written, the exit status is 128 + the signal, and the printed
command resumes the sweep (finished methods kept, the stopped one resumed from its checkpoint)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from safetensors.torch import load_file

from preftune.config import TrainConfig
from preftune.eval.sweep import finished_results, run_sweep
from preftune.train.signals import GracefulStop, Interrupted
from slow_steps import slow_step_driver
from test_train_fixtures import pair_rows, tiny_model, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


def fake_train(calls: list[TrainConfig], on_call=None):
    def train(config: TrainConfig):
        calls.append(config)
        if on_call is not None:
            on_call(config)
        Path(config.out).mkdir(parents=True, exist_ok=True)
        return SimpleNamespace(final_dir=Path(config.out) / "final", steps=3, metrics={"loss": 0.5})

    return train


def test_a_signal_outside_training_lets_the_method_finish_its_evaluation_then_stops(tmp_path: Path) -> None:
    """SIGTERM while method 1 is being evaluated: its evaluation completes (its result is kept), method
    2 never starts, the error names both and the exit status is 143."""
    calls: list[TrainConfig] = []
    evaluated: list[str] = []

    def evaluate(final_dir: Path, config: TrainConfig):
        os.kill(os.getpid(), signal.SIGTERM)  # the sweep's handler only records it
        evaluated.append(config.method)
        return 0.5, None

    before = signal.getsignal(signal.SIGTERM)
    base = TrainConfig(model="m", data="d.jsonl", out="x")
    with pytest.raises(Interrupted) as stopped:
        run_sweep(["dpo", "ipo"], base, tmp_path / "s", train_fn=fake_train(calls), evaluate_fn=evaluate,
                  log=lambda _m: None)  # fmt: skip
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert "sweep stopped by SIGTERM; finished: dpo; not started: ipo" in str(stopped.value)
    assert [c.method for c in calls] == ["dpo"] and evaluated == ["dpo"]
    assert signal.getsignal(signal.SIGTERM) == before  # the handlers are restored
    data = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert [(r["method"], r["status"], r["accuracy"]) for r in data["results"]] == [("dpo", "ok", 0.5)]
    assert (tmp_path / "s" / "sweep.html").is_file()


def test_a_run_stopped_by_a_signal_is_kept_as_interrupted_and_resumed_with_the_finished_ones_kept(
    tmp_path: Path,
) -> None:
    calls: list[TrainConfig] = []

    def stop_ipo(config: TrainConfig) -> None:
        if config.method == "ipo":
            raise Interrupted("stopped by SIGINT after step 2 of 3; checkpoint C saved — resume with: X", 2)

    base = TrainConfig(model="m", data="d.jsonl", out="x")
    with pytest.raises(Interrupted) as stopped:
        run_sweep(["dpo", "ipo", "simpo"], base, tmp_path / "s", train_fn=fake_train(calls, stop_ipo),
                  log=lambda _m: None, resume_hint="preftune sweep ... --resume")  # fmt: skip
    message = str(stopped.value)
    assert stopped.value.exit_code == 130
    assert message.startswith("sweep stopped by SIGINT; finished: dpo; interrupted: ipo (stopped by SIGINT after "
                              "step 2 of 3; checkpoint C saved); not started: simpo")  # fmt: skip
    page = (tmp_path / "s" / "sweep.html").read_text()
    assert 'id="stopped"' in page and "not started: simpo" in page and 'id="failures"' not in page
    assert "not started: simpo" in message and message.endswith("resume with: preftune sweep ... --resume")
    assert [c.method for c in calls] == ["dpo", "ipo"]
    kept = finished_results(tmp_path / "s")
    assert list(kept) == ["dpo"]
    record = json.loads((tmp_path / "s" / "sweep.json").read_text())
    (tmp_path / "s" / "sweep.json").write_text(json.dumps({**record, "seconds": 3600.0}))  # an hour's work
    calls.clear()
    result = run_sweep(["dpo", "ipo", "simpo"], base, tmp_path / "s", train_fn=fake_train(calls),
                       log=lambda _m: None, previous=kept)  # fmt: skip
    assert 3600.0 <= result.seconds < 3660.0  # the resumed sweep's wall time counts the first part's
    assert [(c.method, c.resume) for c in calls] == [("ipo", "latest"), ("simpo", "latest")]
    assert [(r.method, r.status) for r in result.results] == [("dpo", "ok"), ("ipo", "ok"), ("simpo", "ok")]


def test_a_resumed_sweep_runs_a_failed_method_again(tmp_path: Path) -> None:
    calls: list[TrainConfig] = []

    def fail_ipo(config: TrainConfig) -> None:
        if config.method == "ipo":
            raise ValueError("reward function raised KeyError: 'answer'")

    base = TrainConfig(model="m", data="d.jsonl", out="x")
    first = run_sweep(["dpo", "ipo"], base, tmp_path / "s", train_fn=fake_train(calls, fail_ipo),
                      log=lambda _m: None)  # fmt: skip
    assert [(r.method, r.status) for r in first.results] == [("dpo", "ok"), ("ipo", "failed")]
    kept = finished_results(tmp_path / "s")
    assert list(kept) == ["dpo"]
    calls.clear()
    result = run_sweep(["dpo", "ipo"], base, tmp_path / "s", train_fn=fake_train(calls),
                       log=lambda _m: None, previous=kept)  # fmt: skip
    assert [(c.method, c.resume) for c in calls] == [("ipo", "latest")]
    assert [(r.method, r.status) for r in result.results] == [("dpo", "ok"), ("ipo", "ok")]


def test_nested_graceful_stops_hand_a_signal_on_both_ways() -> None:
    """A signal the sweep received before a run began stops that run at its first step boundary; one
    the run received after its last step check stops the sweep."""
    with GracefulStop() as outer:
        os.kill(os.getpid(), signal.SIGINT)
        with GracefulStop() as inner:
            assert inner.requested(SimpleNamespace(size=1)) == signal.SIGINT  # type: ignore[arg-type]
    with GracefulStop() as outer:
        with GracefulStop() as inner:
            os.kill(os.getpid(), signal.SIGTERM)
        assert inner.signum == outer.signum == signal.SIGTERM


def test_a_signal_while_the_sweep_prepares_stops_it_before_its_first_method(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import preftune.eval.sweep as sweep
    from preftune.cli import main

    real = sweep.prompts_from_data

    def prompts_then_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # while the held-out prompts are tokenized
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep, "prompts_from_data", prompts_then_sigterm)
    model = tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(8))
    out = tmp_path / "s"
    argv = ["sweep", "--methods", "dpo,ipo", "--model", str(model), "--data", str(data), "--out", str(out),
            "--max-steps", "2", "--kl-samples", "0", "--no-progress"]  # fmt: skip
    assert main(argv) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "preftune: error: sweep stopped by SIGTERM; finished: none; not started: dpo, ipo" in err
    assert not (out / "dpo").exists() and not (out / "sweep.json").exists()


DRIVER = slow_step_driver(0.3)


def test_ctrl_c_stops_a_sweep_process_with_its_checkpoint_and_the_printed_command_resumes_it(
    tmp_path: Path,
) -> None:
    model = tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(24))
    out = tmp_path / "s"
    args = ["sweep", "--methods", "dpo,ipo", "--model", str(model), "--data", str(data), "--out", str(out),
            "--batch-size", "4", "--max-steps", "6", "--kl-samples", "0", "--no-progress"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    log = out / "dpo" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (log.is_file() and log.read_text().strip()):  # dpo's training has started
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "Traceback" not in stdout
    assert not (out / "ipo").exists()  # the second method never started
    stopped = [
        line for line in err.splitlines() if line.startswith("preftune: error: sweep stopped by SIGINT")
    ]
    assert len(stopped) == 1 and "not started: ipo" in stopped[0]
    command = stopped[0].split("resume with: ")[1]
    assert command == "preftune " + shlex.join(args) + " --resume"
    checkpoints = sorted((out / "dpo" / "checkpoints").iterdir())
    assert len(checkpoints) == 1 and not (out / "dpo" / "final").exists()
    weights = load_file(str(checkpoints[0] / "model.safetensors"))
    assert weights and all(t.isfinite().all() for t in weights.values())
    data_json = json.loads((out / "sweep.json").read_text())
    assert [(r["method"], r["status"]) for r in data_json["results"]] == [("dpo", "interrupted")]

    from preftune.cli import main

    assert main(shlex.split(command)[1:]) == 0
    data_json = json.loads((out / "sweep.json").read_text())
    assert [(r["method"], r["status"], r["steps"]) for r in data_json["results"]] == [
        ("dpo", "ok", 6),
        ("ipo", "ok", 6),
    ]
