"""Nested state (an optimizer's or scheduler's `state_dict`, RNG states) stored without pickle.

`save_state(obj, folder, "optimizer")` writes `optimizer.json`, the structure with every tensor replaced
by a reference, and — when there are tensors — `optimizer.safetensors` holding them. `load_state` reads
it back equal to `obj`: the same tensors (dtype, shape, bits), ints, floats (JSON writes Python's
shortest round-tripping repr, and NaN/Infinity), strings, bools, None, lists, tuples, and dicts with
their key types and order (an unsharded optimizer's state is keyed by parameter index, an FSDP whole
state by parameter name). Anything else is refused when saving, so loading never builds an object
other than these: a checkpoint cannot carry code.

JSON encoding: a tensor is `{"__tensor__": NAME}`, a tuple `{"__tuple__": [...]}`, a dict whose keys
are not all strings (or collide with these markers) `{"__items__": [[key, value], ...]}`; any other dict
is a JSON object.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from preftune.errors import TrainingError

_MARKERS = ("__tensor__", "__tuple__", "__items__")
_SCALARS = (bool, int, float, str, type(None))


def encode(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """`obj` as a JSON-able structure plus the tensors it refers to (whole, on the CPU, contiguous)."""
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}  # one tensor met twice is stored once (and comes back shared)

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            if id(value) not in seen:
                name = path or "value"
                while name in tensors:
                    name += "'"
                seen[id(value)] = name
                tensors[name] = value.detach().cpu().contiguous()
            return {"__tensor__": seen[id(value)]}
        if isinstance(value, _SCALARS):
            return value
        if isinstance(value, tuple):
            return {"__tuple__": [walk(v, f"{path}/{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(value)]
        if isinstance(value, dict):
            items = [(k, walk(v, f"{path}/{k}" if path else str(k))) for k, v in value.items()]
            if all(isinstance(k, str) and k not in _MARKERS for k in value):
                return dict(items)
            if not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in value):
                raise TrainingError(f"checkpoint: {path or 'state'} has keys of type {_types(value)}")
            return {"__items__": [[k, v] for k, v in items]}
        raise TrainingError(
            f"checkpoint: {path or 'state'} is a {type(value).__name__}; a checkpoint stores only tensors, "
            "numbers, strings, lists and dicts (no pickle)"
        )

    return walk(obj, ""), tensors


def decode(structure: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `encode`; a reference to a tensor that is not there is a ValueError."""
    if isinstance(structure, list):
        return [decode(v, tensors) for v in structure]
    if not isinstance(structure, dict):
        return structure
    if "__tensor__" in structure:
        name = structure["__tensor__"]
        if name not in tensors:
            raise ValueError(f"tensor '{name}' is not in the file")
        return tensors[name]
    if "__tuple__" in structure:
        return tuple(decode(v, tensors) for v in structure["__tuple__"])
    if "__items__" in structure:
        return {k: decode(v, tensors) for k, v in structure["__items__"]}
    return {k: decode(v, tensors) for k, v in structure.items()}


def save_state(obj: Any, folder: Path, name: str) -> list[str]:
    """Write `folder/NAME.json` (+ `NAME.safetensors` when `obj` holds tensors); return the file names."""
    structure, tensors = encode(obj)
    files = [f"{name}.json"]
    if tensors:
        save_file(tensors, str(folder / f"{name}.safetensors"))
        files.append(f"{name}.safetensors")
    doc = {"format": "preftune-state-1", "tensors": files[1] if tensors else None, "value": structure}
    (folder / files[0]).write_text(json.dumps(doc), encoding="utf-8")
    return files


def load_state(folder: Path, name: str) -> Any:
    """Read what `save_state(obj, folder, NAME)` wrote. Errors name the file (a TrainingError)."""
    path = folder / f"{name}.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(doc, dict) or doc.get("format") != "preftune-state-1":
            raise ValueError("not a preftune state file")
    except (OSError, ValueError) as err:
        raise TrainingError(f"checkpoint: cannot read {path}: {err}") from None
    tensors: dict[str, torch.Tensor] = {}
    if doc.get("tensors"):
        tpath = folder / f"{name}.safetensors"
        try:
            tensors = load_file(str(tpath))
        except Exception as err:  # safetensors raises its own error type for a damaged file
            raise TrainingError(f"checkpoint: cannot read {tpath}: {err}") from None
    try:
        return decode(doc["value"], tensors)
    except (KeyError, ValueError, TypeError) as err:
        raise TrainingError(f"checkpoint: {path} does not match {name}.safetensors: {err}") from None


def _types(d: dict[Any, Any]) -> str:
    return ", ".join(sorted({type(k).__name__ for k in d}))
