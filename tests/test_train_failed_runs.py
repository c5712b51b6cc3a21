"""A run that fails before it records anything leaves its run folder as it was (docs/training.md,
"Faults and recovery"): a folder the run made is gone, an empty one stays empty, and a folder that
holds an earlier run — its checkpoints, metrics, config.yaml and .lock — is left byte for byte.
Before, a data error after the claim left OUT/config.yaml and OUT/.lock behind (a half-made folder)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from preftune.cli import main
from test_train_fixtures import one_line, pair_rows, tiny_model, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("failed_runs")
    bad = [{("chosen_response" if k == "chosen" else k): v for k, v in r.items()} for r in pair_rows(8)]
    return {
        "root": root,
        "model": tiny_model(root / "model"),
        "pairs": write_jsonl(root / "pairs.jsonl", pair_rows(8)),
        "bad": write_jsonl(root / "bad.jsonl", bad),  # a wrong column name: a data error after the claim
        "cache": root / "cache",
    }


def train(env: dict[str, Path], capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    argv = ["train", *args, "--model", str(env["model"]), "--cache-dir", str(env["cache"]), "--no-progress"]
    capsys.readouterr()
    rc = main(argv)
    return rc, capsys.readouterr().err


def files(folder: Path) -> dict[str, str]:
    """Every file under `folder` (dot files such as .lock included) → a hash of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.blake2b(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["dpo", "--data", "{bad}"], "field 'chosen': missing"),
        (["prm", "--data", "{pairs}"], "field 'steps'"),  # pair data given to a process reward model
        (["rm", "--loss", "bt_scaled", "--data", "{pairs}"], "no pair has a margin"),
    ],
)
def test_a_data_error_leaves_no_run_folder(
    env: dict[str, Path], capsys: pytest.CaptureFixture[str], args: list[str], says: str
) -> None:
    out = env["root"] / f"made-{args[0]}" / "bad1"  # neither OUT nor its parent existed
    rc, err = train(env, capsys, *[a.format(**{k: str(v) for k, v in env.items()}) for a in args],
                    "--out", str(out))  # fmt: skip
    assert rc == 2 and says in err and "Traceback" not in err
    assert not out.parent.exists()  # both made by the run, both gone


def test_a_typo_of_a_file_name_in_offline_mode_names_the_missing_file(
    env: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`prefs.jsnl` may be a hub id, so offline it went to `datasets`, whose "Couldn't reach" became
    "cannot load hub dataset … check that you are online" — and the run folder stayed."""
    import datasets

    def offline_hub(name: str, **_: Any) -> Any:  # what datasets raises in offline mode
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline_hub)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(env["root"])
    (env["root"] / "empty").mkdir()
    rc, err = train(env, capsys, "dpo", "--data", "prefs.jsnl", "--out", "empty")
    assert rc == 2
    line = one_line(err)
    assert line.startswith(
        "prefs.jsnl: no such file or folder (and no hub dataset of that name could be loaded"
    )
    assert "check the path" in line and "online" not in line.split(" — ")[-1]
    assert list((env["root"] / "empty").iterdir()) == []  # an empty folder stays, empty
    rc, err = train(env, capsys, "dpo", "--data", "org/prefs", "--out", "hub")
    assert one_line(err).startswith("org/prefs: neither a local file nor a reachable hub dataset")
    assert not (env["root"] / "hub").exists()


def test_other_files_in_the_folder_keep_it(env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = env["root"] / "notes"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("mine\n")
    before = files(out)
    rc, _ = train(env, capsys, "dpo", "--data", str(env["bad"]), "--out", str(out))
    assert rc == 2
    assert files(out) == before and (out / "sub").is_dir()  # config.yaml and .lock gone, the rest kept


@pytest.mark.parametrize("method", ["dpo", "rm"])
def test_a_failing_rerun_or_resume_leaves_the_earlier_run_intact(
    env: dict[str, Path], capsys: pytest.CaptureFixture[str], method: str
) -> None:
    data = write_jsonl(env["root"] / f"resumed-{method}.jsonl", pair_rows(8))
    out = env["root"] / f"earlier-{method}"
    common = ["--data", str(data), "--batch-size", "4", "--max-steps", "2", "--save-every", "1",
              "--no-report", "--out", str(out)]  # fmt: skip
    assert train(env, capsys, method, *common)[0] == 0
    before = files(out)
    assert any(name.startswith("checkpoints/") for name in before) and ".lock" in before
    rc, err = train(env, capsys, method, *common)  # a rerun without --resume: refused
    assert rc == 2 and "already has a run" in err
    assert files(out) == before
    data.write_bytes(env["bad"].read_bytes())  # the run's data is now unusable: resume fails loading it
    for resume in (["--resume"], ["--resume", str(out / "checkpoints" / "step-1")]):
        rc, err = train(env, capsys, method, *common, *resume)
        assert rc == 2 and "field 'chosen': missing" in err and "Traceback" not in err
        assert files(out) == before  # every checkpoint, metrics.jsonl, config.yaml and .lock as they were
    rc, err = train(env, capsys, "--config", str(out / "config.yaml"), "--resume")
    assert rc == 2 and files(out) == before
