"""Atomic, verified checkpoints: OUT/checkpoints/step-N/ with everything an exact resume needs.

A checkpoint is written into `checkpoints/.tmp-step-N-PID/`, flushed, then renamed to `step-N/` in one
`os.replace`: a folder named `step-N` is always complete, and a run killed while writing leaves only a
`.tmp-*` folder that the next run removes. A write that fails (disk full, file-size limit) removes its
`.tmp-*` folder and leaves the previous checkpoints as they were; pruning never deletes the checkpoint
just written (`prune`). Contents — no pickle anywhere:

    model.safetensors          policy weights (full fine-tuning), or
    adapter_model.safetensors  the PEFT adapter (LoRA runs)
    NAME.safetensors           extra tensors: the reference weights when they move (TR-DPO sync,
                               stages), the round-start weights of Accelerated PO
    optimizer.json             the optimizer's state_dict: structure and hyper-parameters (JSON) ...
    optimizer.safetensors      ... and its tensors (see `preftune.train.state_files`); keyed by
                               parameter index, or by parameter name for a sharded (FSDP) run
    scheduler.json             the LR scheduler's state_dict
    rng.json rng.safetensors   python and numpy RNG states (JSON); torch CPU/CUDA states (uint8 tensors)
    loss_state.safetensors     running state of stateful losses (e.g. BCO's δ), keys "TERM/NAME"
    trainer_state.json         step, data position, stage/round, last metrics, the gradient buffers
                               held between steps and the training data's digest (`train.run`)
    checksums.json             size and SHA-256 of every other file, written last (`integrity`)

Before a resume reads a checkpoint it verifies every file against checksums.json (`find_resume`);
`--resume` (latest) passes over a damaged newest checkpoint to the newest one that verifies, saying
which file is damaged. The old layout (optimizer.pt, scheduler.pt, rng.pt: pickles) is refused unread.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from preftune.errors import TrainingError
from preftune.train.distributed import World, broadcast_object, main_only
from preftune.train.integrity import DamagedCheckpoint, verify, write_checksums
from preftune.train.state_files import load_state, save_state

STEP_DIR = re.compile(r"^step-(\d+)$")
NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def model_weights(model: Any) -> dict[str, torch.Tensor]:
    """The trainable weights a checkpoint stores: the adapter of a PEFT model, else the full state."""
    if is_peft(model):
        from peft import get_peft_model_state_dict

        return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _save_weights(model: Any, folder: Path, name: str = "model") -> None:
    if is_peft(model):
        save_file(model_weights(model), str(folder / "adapter_model.safetensors"))
    else:
        save_model(model, str(folder / f"{name}.safetensors"))  # handles tied (shared) tensors


def _load_weights(model: Any, folder: Path, name: str = "model") -> None:
    file = folder / (
        "adapter_model.safetensors" if is_peft(model) and name == "model" else f"{name}.safetensors"
    )
    try:
        if is_peft(model) and name == "model":
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model, load_file(str(file)))
        else:
            load_model(model, str(file), strict=True)
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        raise TrainingError(f"resume: cannot load {file} into this run's model: {err}") from None
    except Exception as err:  # safetensors' own error type: a damaged file
        raise TrainingError(f"resume: cannot read {file}: {err}") from None


def rng_state() -> dict[str, Any]:
    """torch (CPU, CUDA) states as uint8 tensors; python's and numpy's as plain numbers."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.random.get_rng_state(),
        "python": random.getstate(),
        "numpy": [str(kind), [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.random.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())


def save_checkpoint(
    root: Path,
    step: int,
    *,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
    loss_state: dict[str, dict[str, torch.Tensor]],
    keep_last: int,
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write `root/step-{step}/` atomically, then delete all but the newest `keep_last`; return the folder.

    `weights` / `optimizer_state`: already gathered whole (a sharded FSDP policy, see
    `preftune.models.sharding`), written instead of `model`'s and `optimizer`'s own state.
    A full disk or a file-size limit is a TrainingError saying so; the partial folder is removed.
    """
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        if weights is not None:
            name = "adapter_model.safetensors" if is_peft(model) else "model.safetensors"
            save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / name))
        else:
            _save_weights(model, tmp)
        for name, tensors in (extra or {}).items():
            save_file(
                {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()},
                str(tmp / f"{name}.safetensors"),
            )
        save_state(
            optimizer_state if optimizer_state is not None else optimizer.state_dict(), tmp, "optimizer"
        )
        save_state(scheduler.state_dict(), tmp, "scheduler")
        save_state(rng_state(), tmp, "rng")
        flat = {
            f"{term}/{k}": v.detach().cpu().contiguous()
            for term, st in loss_state.items()
            for k, v in st.items()
        }
        save_file(flat, str(tmp / "loss_state.safetensors"))
        state = {**trainer_state, "step": step, "extra": sorted(extra or {})}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
        write_checksums(tmp)
        _fsync_tree(tmp)
        _move_into_place(tmp, final)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if os_error_number(err) in NO_SPACE:
            raise _no_space(err, final, tmp, root) from None
        raise
    prune(root, keep_last, upto=step)
    return final


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename the complete `tmp` to `final`. Re-saving a step after a resume: the old `final` (a
    checkpoint, or anything else by that name) is first renamed aside and deleted only once the new one
    is in place, so no moment leaves that step without a complete folder but a rename's."""
    if not (final.exists() or final.is_symlink()):
        os.replace(tmp, final)
        return
    aside = final.with_name(f".tmp-old-{final.name}-{os.getpid()}")
    _remove(aside)
    os.replace(final, aside)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(aside, final)
        raise
    _remove(aside)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def os_error_number(err: BaseException) -> int | None:
    """The OS error number of a failed write (safetensors reports it inside its message); None for
    another error."""
    if isinstance(err, OSError):
        return err.errno
    found = re.search(r"os error (\d+)", str(err))
    return int(found.group(1)) if found else None


def _no_space(err: BaseException, final: Path, tmp: Path, root: Path) -> TrainingError:
    code = os_error_number(err) or errno.ENOSPC
    previous = list_checkpoints(root)
    return TrainingError(
        f"no space left on device while writing checkpoint {final} ({os.strerror(code)}); "
        f"removed the partial {tmp.name}/, "
        + (f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint")
        + " — free disk space (or raise the file-size limit), then rerun with --resume"
    )


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def prune(root: Path, keep_last: int, upto: int | None = None) -> None:
    """Delete all but the newest `keep_last` checkpoints at steps up to `upto` (the one just written).

    A checkpoint at a later step was left by the run this one resumed: a damaged newest one passed
    over, or newer ones than the `--resume PATH` given. It is not counted, so the checkpoint just
    written is never deleted (a run that fell back from a damaged step-9 to step-6 with keep_last=1
    would otherwise delete each new checkpoint at once and keep the damaged one); it is replaced when
    the run writes that step again, or deleted once it is among the older ones."""
    found = list_checkpoints(root)
    if upto is not None:
        found = [p for p in found if _step_of(p) <= upto]
    for old in found[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _step_of(path: Path) -> int:
    named = STEP_DIR.match(path.name)
    return int(named.group(1)) if named else -1


def remove_partial(root: Path) -> None:
    """Delete `.tmp-*` folders a killed run left behind."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)


def find_resume(out: Path, resume: str, log: Callable[[str], None] = print) -> Path:
    """The verified checkpoint to resume from: `resume` = 'latest' (the newest in OUT/checkpoints that
    verifies: a damaged newer one is named via `log` and passed over) or a folder (which must verify)."""
    if resume != "latest":
        path = Path(resume)
        if not (path / "trainer_state.json").is_file() and not (path / "checksums.json").is_file():
            raise TrainingError(f"resume: '{path}' is not a checkpoint folder (no trainer_state.json)")
        try:
            verify(path)
        except DamagedCheckpoint as err:
            raise TrainingError(f"resume: {err} — resume from another checkpoint") from None
        return path
    found = list_checkpoints(out / "checkpoints")
    if not found:
        raise TrainingError(
            f"resume: no checkpoint under {out / 'checkpoints'} — run without --resume to start from scratch"
        )
    damaged: list[str] = []
    for path in reversed(found):
        try:
            verify(path)
        except DamagedCheckpoint as err:
            damaged.append(str(err))
            log(f"resume: {err}; passing over {path.name}")
            continue
        if damaged:
            log(f"resume: falling back to {path}, the newest checkpoint that verifies")
        return path
    raise TrainingError(f"resume: no checkpoint under {out / 'checkpoints'} verifies ({'; '.join(damaged)})")


def resume_point(world: World, find: Callable[[], Path | None]) -> Path | None:
    """`find()` — which reads and verifies the checkpoint's files (`find_resume`) — on rank 0 alone;
    every rank gets its answer, or its error."""
    chosen: list[Path | None] = []
    main_only(world, lambda: chosen.append(find()))
    found = broadcast_object(str(chosen[0]) if chosen and chosen[0] is not None else None, world)
    return Path(str(found)) if found is not None else None


def trainer_state(path: Path) -> dict[str, Any]:
    """The checkpoint's trainer_state.json (step, position, how it was written); a file that is not
    one (an edit that kept its checksum in step) is an error naming it."""
    file = path / "trainer_state.json"
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise TrainingError(
            f"resume: {file} cannot be read ({err}) — resume from another checkpoint"
        ) from None
    position = ("step", "phase", "step_in_phase")
    if not isinstance(state, dict) or not all(type(state.get(k)) is int for k in position):
        raise TrainingError(
            f"resume: {file} is not a trainer state (it needs whole numbers {', '.join(position)}); "
            "it was edited or damaged — resume from another checkpoint"
        )
    return state


def check_position(state: dict[str, Any], steps: list[int], path: Path) -> None:
    """Refuse a saved position whose `step` is not the one its (phase, step_in_phase) gives under the
    phases' step counts `steps` — those of the run that wrote it: a one-phase run being extended keeps
    its saved length. Another total of steps is left to the caller to judge."""
    saved_total = state.get("total_steps")
    if len(steps) == 1 and isinstance(saved_total, int):
        steps = [saved_total]
    if saved_total != sum(steps):
        return
    phase, in_phase, step = (state.get(k) for k in ("phase", "step_in_phase", "step"))
    ok = False
    if isinstance(phase, int) and isinstance(in_phase, int) and isinstance(step, int):
        ok = 0 <= phase <= len(steps) and 0 <= in_phase <= (steps[phase] if phase < len(steps) else 0)
        ok = ok and step == sum(steps[:phase]) + in_phase
    named = STEP_DIR.match(path.name)
    if not ok or (named and int(named.group(1)) != step):
        raise TrainingError(
            f"resume: {path / 'trainer_state.json'} is inconsistent: step {step!r} is not phase {phase!r}, "
            f"step {in_phase!r} of the run's {len(steps)} phase(s) of {steps} steps"
            + (f" (or the folder name {path.name})" if named else "")
            + "; it was edited or damaged — resume from another checkpoint"
        )


def load_weights(model: Any, path: Path) -> None:
    """The checkpoint's model weights into `model` (before FSDP shards it: a sharded model loads whole
    weights this way, then shards them)."""
    _load_weights(model, path)


def load_checkpoint(
    path: Path,
    *,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    weights: bool = True,
    load_optimizer: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]], dict[str, dict[str, torch.Tensor]]]:
    """Restore weights, optimizer, scheduler and RNG from `path` (verified by `find_resume`); return
    (trainer_state, loss_state, extra).

    `weights=False`: the weights were loaded already (`load_weights`, FSDP); `load_optimizer`: how to
    load the saved optimizer state (FSDP: a whole state keyed by parameter name), else its load_state_dict.
    """
    state = trainer_state(path)
    if weights:
        _load_weights(model, path)
    load_into = load_optimizer or optimizer.load_state_dict
    _restoring(path, "optimizer.json", lambda: load_into(load_state(path, "optimizer")))
    _restoring(path, "scheduler.json", lambda: scheduler.load_state_dict(load_state(path, "scheduler")))
    _restoring(path, "rng.json", lambda: set_rng_state(load_state(path, "rng")))
    loss_state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in _tensors(path, "loss_state.safetensors").items():
        term, _, name = key.partition("/")
        loss_state.setdefault(term, {})[name] = value
    extra = {}
    for name in state.get("extra", []):
        if not re.fullmatch(r"[A-Za-z0-9_]+", str(name)):
            raise TrainingError(f"resume: {path / 'trainer_state.json'} names an odd extra file '{name}'")
        extra[name] = _tensors(path, f"{name}.safetensors")
    return state, loss_state, extra


def _tensors(path: Path, file: str) -> dict[str, torch.Tensor]:
    return _restoring(path, file, lambda: load_file(str(path / file)))  # type: ignore[no-any-return]


def _restoring(path: Path, file: str, load: Callable[[], Any]) -> Any:
    """`load()`, its failure an error naming the checkpoint's `file`: it verified against its checksum,
    so it was written so (by another optimizer or scheduler than this run's) or edited with its
    checksum; safetensors reports a damaged file with its own error type."""
    try:
        return load()
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, SafetensorError) as err:
        if "out of memory" in str(err).lower():
            raise
        raise TrainingError(
            f"resume: {path / file} does not fit this run ({type(err).__name__}: {err}) — resume with the "
            "run's own settings, or from another checkpoint"
        ) from None
