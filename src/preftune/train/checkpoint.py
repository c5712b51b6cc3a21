"""Atomic checkpoints: OUT/checkpoints/step-N/ with everything an exact resume needs.

A checkpoint is written into `checkpoints/.tmp-step-N-PID/`, flushed, then renamed to `step-N/` in one
`os.replace`: a folder named `step-N` is always complete, and a run killed while writing leaves only a
`.tmp-*` folder that the next run removes. Contents:

    model.safetensors          policy weights (full fine-tuning), or
    adapter_model.safetensors  the PEFT adapter (LoRA runs)
    NAME.safetensors           extra tensors: the reference weights when they move (TR-DPO sync,
                               stages), the round-start weights of Accelerated PO
    optimizer.pt scheduler.pt  their state_dicts
    rng.pt                     torch (CPU + CUDA), python and numpy RNG states
    loss_state.safetensors     running state of stateful losses (e.g. BCO's δ), keys "TERM/NAME"
    trainer_state.json         step, data position, stage/round, last metrics
"""

from __future__ import annotations

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

STEP_DIR = re.compile(r"^step-(\d+)$")


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
    if is_peft(model) and name == "model":
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
    else:
        load_model(model, str(folder / f"{name}.safetensors"), strict=True)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.random.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.random.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
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
    torch.save(
        optimizer_state if optimizer_state is not None else optimizer.state_dict(), tmp / "optimizer.pt"
    )
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    flat = {
        f"{term}/{k}": v.detach().cpu().contiguous() for term, st in loss_state.items() for k, v in st.items()
    }
    save_file(flat, str(tmp / "loss_state.safetensors"))
    state = {**trainer_state, "step": step, "extra": sorted(extra or {})}
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
    _fsync_tree(tmp)
    if final.exists():  # re-saving a step after a resume: the new folder replaces the old one
        shutil.rmtree(final)
    os.replace(tmp, final)
    prune(root, keep_last)
    return final


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


def find_resume(out: Path, resume: str) -> Path:
    """The checkpoint to resume from: `resume` = 'latest' (newest in OUT/checkpoints) or a folder."""
    if resume != "latest":
        path = Path(resume)
        if not (path / "trainer_state.json").is_file():
            raise TrainingError(f"resume: '{path}' is not a checkpoint folder (no trainer_state.json)")
        return path
    found = list_checkpoints(out / "checkpoints")
    if not found:
        raise TrainingError(
            f"resume: no checkpoint under {out / 'checkpoints'} — run without --resume to start from scratch"
        )
    return found[-1]


def trainer_state(path: Path) -> dict[str, Any]:
    """The checkpoint's trainer_state.json (step, position, how it was written)."""
    return json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))  # type: ignore[no-any-return]


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
    """Restore weights, optimizer, scheduler and RNG from `path`; return (trainer_state, loss_state, extra).

    `weights=False`: the weights were loaded already (`load_weights`, FSDP); `load_optimizer`: how to
    load the saved optimizer state (FSDP: a whole state keyed by parameter name), else its load_state_dict.
    """
    if weights:
        _load_weights(model, path)
    saved = torch.load(path / "optimizer.pt", weights_only=False)
    (load_optimizer or optimizer.load_state_dict)(saved)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    loss_state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(path / "loss_state.safetensors")).items():
        term, _, name = key.partition("/")
        loss_state.setdefault(term, {})[name] = value
    state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    extra = {name: load_file(str(path / f"{name}.safetensors")) for name in state.get("extra", [])}
    return state, loss_state, extra
