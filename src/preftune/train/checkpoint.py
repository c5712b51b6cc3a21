"""Atomic, verified checkpoints: OUT/checkpoints/step-N/ with everything an exact resume needs.

A checkpoint is written into `checkpoints/.tmp-step-N-PID/`, flushed, then renamed to `step-N/` in one
`os.replace`: a folder named `step-N` is always complete, and a run killed while writing leaves only a
`.tmp-*` folder that the next run removes. A write that fails (disk full, file-size limit) removes its
`.tmp-*` folder and leaves the previous checkpoints as they were. Contents — no pickle anywhere:

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
    trainer_state.json         step, data position, stage/round, last metrics
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
        if final.exists():  # re-saving a step after a resume: the new folder replaces the old one
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if _errno(err) in NO_SPACE:
            raise _no_space(err, final, tmp, root) from None
        raise
    prune(root, keep_last)
    return final


def _errno(err: BaseException) -> int | None:
    """The OS error number of a failed write (safetensors reports it inside its message)."""
    if isinstance(err, OSError):
        return err.errno
    found = re.search(r"os error (\d+)", str(err))
    return int(found.group(1)) if found else None


def _no_space(err: BaseException, final: Path, tmp: Path, root: Path) -> TrainingError:
    code = _errno(err) or errno.ENOSPC
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


def prune(root: Path, keep_last: int) -> None:
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


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
    """The checkpoint's trainer_state.json (step, position, how it was written)."""
    return json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))  # type: ignore[no-any-return]


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
    if weights:
        _load_weights(model, path)
    try:
        (load_optimizer or optimizer.load_state_dict)(load_state(path, "optimizer"))
        scheduler.load_state_dict(load_state(path, "scheduler"))
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        raise TrainingError(
            f"resume: {path}'s optimizer state does not fit this run's optimizer: {err}"
        ) from None
    set_rng_state(load_state(path, "rng"))
    loss_state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(path / "loss_state.safetensors")).items():
        term, _, name = key.partition("/")
        loss_state.setdefault(term, {})[name] = value
    state = trainer_state(path)
    extra = {}
    for name in state.get("extra", []):
        if not re.fullmatch(r"[A-Za-z0-9_]+", str(name)):
            raise TrainingError(f"resume: {path / 'trainer_state.json'} names an odd extra file '{name}'")
        extra[name] = load_file(str(path / f"{name}.safetensors"))
    return state, loss_state, extra
