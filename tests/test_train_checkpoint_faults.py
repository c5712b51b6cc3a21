"""Checkpoint faults: no pickle is ever loaded (a planted one never runs), optimizer/scheduler/RNG state
round-trips exactly through JSON + safetensors, every damaged file is named by its checksum and
`--resume` falls back past it, a hand-edited position is refused, a full disk is one named line that
leaves the previous checkpoint intact, and weights made non-finite by a step are never saved."""

from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from preftune.cli import main
from preftune.errors import TrainingError
from preftune.train import checkpoint as ckpt
from preftune.train.integrity import write_checksums
from preftune.train.state_files import load_state, save_state
from test_train_fixtures import one_line, pair_rows, tiny_model, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


def same(a: Any, b: Any) -> bool:
    """Equal values of equal types all the way down (tensors: dtype, shape and bits)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, float) and a != a and b != b)  # NaN equals NaN here


def stepped(fused: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, betas=(0.8, 0.9), fused=fused)
    for _ in range(2):
        net(torch.randn(5, 3)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    return net, opt


@pytest.mark.parametrize("fused", [True, False])
def test_optimizer_state_round_trips_exactly(tmp_path: Path, fused: bool) -> None:
    net, opt = stepped(fused)
    saved = opt.state_dict()
    assert isinstance(next(iter(saved["state"])), int)  # keyed by parameter index
    save_state(saved, tmp_path, "optimizer")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optimizer.json", "optimizer.safetensors"]
    back = load_state(tmp_path, "optimizer")
    assert same(saved, back)  # int keys, (0.8, 0.9) a tuple, fused a bool, step tensors float32
    twin, twin_opt = stepped(fused)
    twin_opt.load_state_dict(back)
    x = torch.randn(5, 3)
    for model, optim in ((net, opt), (twin, twin_opt)):
        model(x).pow(2).sum().backward()
        optim.step()
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), twin.parameters()))


def test_whole_fsdp_style_optimizer_state_round_trips(tmp_path: Path) -> None:
    """The whole state keyed by parameter name (`full_optimizer_state`'s form) loads back through
    `set_optimizer_state_dict` to the same optimizer state."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    net, opt = stepped(True)
    whole = get_optimizer_state_dict(net, opt, options=options)
    assert "0.weight" in whole["state"] and whole["param_groups"][0]["params"][0] == "0.weight"
    save_state(whole, tmp_path, "optimizer")
    back = load_state(tmp_path, "optimizer")
    assert same(whole, back)
    twin, twin_opt = stepped(True)
    with torch.no_grad():
        for p in twin_opt.state.values():
            p["exp_avg"].zero_()
    set_optimizer_state_dict(twin, twin_opt, optim_state_dict=back, options=options)
    assert same(opt.state_dict()["state"], twin_opt.state_dict()["state"])
    x = torch.randn(5, 3)
    for model, optim in ((net, opt), (twin, twin_opt)):
        model(x).pow(2).sum().backward()
        optim.step()
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), twin.parameters()))


def test_rng_states_round_trip(tmp_path: Path) -> None:
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    np.random.normal()  # numpy keeps a cached Gaussian: part of its state
    save_state(ckpt.rng_state(), tmp_path, "rng")
    first = (random.random(), np.random.normal(), torch.rand(3))
    ckpt.set_rng_state(load_state(tmp_path, "rng"))
    again = (random.random(), np.random.normal(), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])
    assert json.loads((tmp_path / "rng.json").read_text())["value"]["numpy"][0] == "MT19937"
    assert load_file(str(tmp_path / "rng.safetensors"))["torch"].dtype == torch.uint8


def test_state_refuses_objects(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match=r"param_groups/0/fn is a function.*no pickle"):
        save_state({"param_groups": [{"fn": lambda s: s}]}, tmp_path, "scheduler")


# --- a real run's checkpoints ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A 3-step DPO run with a checkpoint after every step (step-1, step-2, step-3) and its args."""
    root = tmp_path_factory.mktemp("faults")
    args = [
        "train",
        "dpo",
        "--model",
        str(tiny_model(root / "model")),
        "--data",
        str(write_jsonl(root / "pairs.jsonl", pair_rows(16))),
        "--cache-dir",
        str(root / "cache"),
        "--batch-size",
        "4",
        "--max-steps",
        "3",
        "--save-every",
        "1",
        "--keep-last",
        "3",
        "--lr",
        "3e-3",
        "--no-progress",
    ]
    assert main([*args, "--out", str(root / "whole")]) == 0
    return root, args


def copy_run(run: tuple[Path, list[str]], name: str) -> Path:
    """A copy of the whole run folder without its final/ (as if stopped after step 3's checkpoint)."""
    root, _ = run
    out = root / name
    shutil.copytree(root / "whole", out, ignore=shutil.ignore_patterns("final"))
    return out


def data_offset(path: Path) -> int:
    """Where a safetensors file's tensor data starts: after the 8-byte length and the JSON header."""
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def flip_middle(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    at = (data_offset(path) + len(raw)) // 2
    raw[at] ^= 0x40  # an exponent bit of a float32
    path.write_bytes(bytes(raw))


DAMAGE = {
    "truncated": ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])),
    "empty": ("optimizer.safetensors", lambda p: p.write_bytes(b"")),
    "bad-header": ("model.safetensors", lambda p: p.write_bytes(b"\xff" * 8 + p.read_bytes()[8:])),
    "garbage": (
        "rng.safetensors",
        lambda p: p.write_bytes(bytes(random.Random(0).randbytes(p.stat().st_size))),
    ),
    "missing": ("optimizer.json", lambda p: p.unlink()),
    "flip-model": ("model.safetensors", flip_middle),
    "flip-optimizer": ("optimizer.safetensors", flip_middle),
    "edited-state": (
        "trainer_state.json",
        lambda p: p.write_text(p.read_text().replace('"step": 3', '"step": 4')),
    ),
    "checksums": ("checksums.json", lambda p: p.write_text(p.read_text()[:40])),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_newest_is_named_and_passed_over(run: tuple[Path, list[str]], kind: str) -> None:
    out = copy_run(run, f"damaged-{kind}")
    name, damage = DAMAGE[kind]
    damage(out / "checkpoints" / "step-3" / name)
    said: list[str] = []
    assert ckpt.find_resume(out, "latest", log=said.append) == out / "checkpoints" / "step-2"
    assert f"step-3/{name}" in said[0] and said[1].endswith("step-2, the newest checkpoint that verifies")
    with pytest.raises(TrainingError, match=rf"step-3/{name}: ") as err:  # explicit: no fallback
        ckpt.find_resume(out, str(out / "checkpoints" / "step-3"))
    assert "\n" not in str(err.value)


def test_fallback_resume_is_exact(run: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    """A byte flipped in step-3's optimizer tensors: `--resume` names it, resumes from step-2, redoes
    step 3 and ends with the uninterrupted run's weights, bit for bit."""
    root, args = run
    out = copy_run(run, "fallback")
    flip_middle(out / "checkpoints" / "step-3" / "optimizer.safetensors")
    assert main([*args, "--out", str(out), "--resume"]) == 0
    said = capsys.readouterr().out
    assert "step-3/optimizer.safetensors: checksum mismatch" in said and "falling back to" in said
    whole = load_file(str(root / "whole" / "final" / "model.safetensors"))
    again = load_file(str(out / "final" / "model.safetensors"))
    assert all(torch.equal(whole[k], again[k]) for k in whole)


def test_explicit_damaged_checkpoint_is_one_line(
    run: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    _, args = run
    out = copy_run(run, "explicit")
    step3 = out / "checkpoints" / "step-3"
    (step3 / "loss_state.safetensors").write_bytes(b"")
    assert main([*args, "--out", str(out), "--resume", str(step3)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{step3 / 'loss_state.safetensors'}: 0 bytes" in err


def plant(folder: Path, marker: Path) -> None:
    """An optimizer.pt whose unpickling creates `marker`."""

    class Planted:
        def __reduce__(self) -> Any:
            return (Path.touch, (marker,))

    torch.save(Planted(), folder / "optimizer.pt")


@pytest.mark.parametrize("layout", ["old", "planted"])
def test_planted_pickle_never_runs(
    run: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str], layout: str
) -> None:
    _, args = run
    out = copy_run(run, f"pickle-{layout}")
    step3, marker = out / "checkpoints" / "step-3", out / "MARKER"
    if layout == "old":  # the former layout: optimizer.pt instead of optimizer.json/.safetensors
        for name in ("optimizer.json", "optimizer.safetensors", "checksums.json"):
            (step3 / name).unlink()
    plant(step3, marker)
    assert main([*args, "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "holds optimizer.pt: the old checkpoint layout" in err and "does not load" in err
    assert not marker.exists()


def test_position_is_checked(run: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    """trainer_state.json's step edited (and its checksum rewritten to match): refused, named."""
    _, args = run
    out = copy_run(run, "edited")
    step2 = out / "checkpoints" / "step-2"
    state = json.loads((step2 / "trainer_state.json").read_text())
    assert (state["step"], state["phase"], state["step_in_phase"]) == (2, 0, 2)
    (step2 / "trainer_state.json").write_text(json.dumps({**state, "step": 1}))
    write_checksums(step2)
    assert main([*args, "--out", str(out), "--resume", str(step2)]) == 2
    err = capsys.readouterr().err
    assert "trainer_state.json is inconsistent: step 1 is not phase 0, step 2" in err


@pytest.mark.parametrize(
    ("phase", "in_phase", "step", "ok"),
    [(1, 2, 6, True), (2, 0, 8, True), (0, 4, 4, True), (1, 2, 5, False), (0, 5, 5, False), (3, 0, 8, False)],
)
def test_check_position_by_hand(tmp_path: Path, phase: int, in_phase: int, step: int, ok: bool) -> None:
    state = {"phase": phase, "step_in_phase": in_phase, "step": step, "total_steps": 8}
    if ok:
        ckpt.check_position(state, [4, 4], tmp_path / f"step-{step}")
    else:
        with pytest.raises(TrainingError, match="inconsistent"):
            ckpt.check_position(state, [4, 4], tmp_path / f"step-{step}")
    ckpt.check_position(state, [4, 5], tmp_path)  # another total: the caller's to judge
    one = {"phase": 0, "step_in_phase": 3, "step": 3, "total_steps": 4}  # one phase, extended to 6 steps
    ckpt.check_position(one, [6], tmp_path / "step-3")
    with pytest.raises(
        TrainingError, match=r"step 5 is not phase 0, step 3 of the run's 1 phase\(s\) of \[4\]"
    ):
        ckpt.check_position({**one, "step": 5}, [6], tmp_path)


STATE_DOC = {"format": "preftune-state-1", "tensors": None}
EDITS = {
    "position-missing": ("trainer_state.json", '{"step": 3}', "is not a trainer state"),
    "not-json": ("trainer_state.json", '{"step": 3', "cannot be read"),
    "rng": ("rng.json", json.dumps({**STATE_DOC, "value": {"torch": 1}}), "does not fit this run"),
    "scheduler": ("scheduler.json", json.dumps({**STATE_DOC, "value": {}}), "does not fit this run"),
}


@pytest.mark.parametrize("kind", sorted(EDITS))
def test_edited_files_with_their_checksums_are_named(
    run: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    """A file edited and its checksum rewritten to match passes verification; reading it is then one
    line naming the file (was a KeyError or TypeError traceback)."""
    _, args = run
    out = copy_run(run, f"edit-{kind}")
    step3 = out / "checkpoints" / "step-3"
    name, text, said = EDITS[kind]
    (step3 / name).write_text(text)
    write_checksums(step3)
    assert main([*args, "--out", str(out), "--resume"]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"resume: {step3 / name}") and said in line
    assert "from another checkpoint" in line
