"""Reference-model statistics (docs/algorithms.md §4): cache | adapter-off | separate model.

Three ways to get `logp_ref` for a batch, behind one `stats(examples)` method:

- `CachedReference`: precomputed once and stored on disk. The cache is content-addressed: a file per
  reference *model fingerprint* (a hash of its weights and dtype) maps a hash of each sequence's token
  ids (prompt + response, so data, tokenization and truncation are all part of the key) to its summed
  log-prob, length and optionally per-token log-probs. A second run — of any method — on the same
  model and data finds every sequence and skips the reference pass; a run on other data computes only
  what is missing. This is what lets `preftune sweep` share one reference pass.
- `AdapterReference`: the LoRA policy with its adapters disabled (peft's `disable_adapter()`): no copy.
- `ModelReference`: a separate frozen model; needed when the reference moves (TR-DPO sync).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from preftune.models.sharding import full_tensor, release
from preftune.types import Example, SequenceStats

Entry = tuple[float, int, "torch.Tensor | None"]


def default_cache_dir(cache_dir: str | None = None) -> Path:
    from preftune.paths import cache_root

    return Path(cache_dir) if cache_dir else cache_root()


def sequence_key(prompt_ids: Sequence[int], response_ids: Sequence[int]) -> bytes:
    """16-byte hash of one (prompt, response) token sequence; the boundary is part of the key."""
    h = hashlib.blake2b(digest_size=16)
    h.update(np.asarray(prompt_ids, dtype=np.int64).tobytes())
    h.update(b"|")
    h.update(np.asarray(response_ids, dtype=np.int64).tobytes())
    return h.digest()


def model_fingerprint(model: Any, *, adapters: bool = True) -> str:
    """Hash of the weights a reference computes with, dtype and shape included; `adapters=False`
    leaves out LoRA weights (the policy under `disable_adapter()` computes with its base only)."""
    h = hashlib.blake2b(digest_size=16)
    # The architecture settings too (same weights with another rope_theta or window give other log-probs);
    # names and bookkeeping keys are left out so that a saved copy of the same model matches.
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(lm, "config", None)
    if config is not None:
        settings = {
            k: v
            for k, v in config.to_dict().items()
            if not k.startswith("_") and k not in ("transformers_version", "use_cache", "name_or_path")
        }
        h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, t in model.state_dict().items():
        if not adapters and "lora_" in name:
            continue
        t = full_tensor(t)  # a sharded (FSDP) weight is gathered: every rank hashes in step
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def stats_from_entries(entries: Sequence[Entry], token_logps: bool) -> SequenceStats:
    logps = torch.tensor([e[0] for e in entries], dtype=torch.float32)
    lengths = torch.tensor([e[1] for e in entries], dtype=torch.int64)
    matrix = None
    if token_logps:
        width = max((int(e[1]) for e in entries), default=0)
        matrix = torch.zeros(len(entries), width)
        for i, e in enumerate(entries):
            if e[2] is None:
                raise KeyError("per-token reference log-probs missing from the cache entry")
            matrix[i, : e[1]] = e[2][: e[1]]
    return SequenceStats(logps=logps, lengths=lengths, token_logps=matrix)


class ReferenceTable:
    """sequence key → (logp, length, token logps | None), stored as one safetensors file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[bytes, Entry] = {}
        if path.is_file():
            data = load_file(str(path))
            keys, logps, lengths = data["keys"], data["logps"], data["lengths"]
            offsets, values, has_tok = data["tok_offsets"], data["tok_values"], data["has_tok"]
            for i in range(len(logps)):
                tok = values[offsets[i] : offsets[i + 1]].clone() if bool(has_tok[i]) else None
                self.entries[bytes(keys[i].tolist())] = (float(logps[i]), int(lengths[i]), tok)

    def missing(
        self, examples: Sequence[Example], token_logps: bool
    ) -> list[tuple[bytes, list[int], list[int]]]:
        """Unique (key, prompt, response) sequences of `examples` not (fully) in the table."""
        out: dict[bytes, tuple[bytes, list[int], list[int]]] = {}
        for ex in examples:
            for r in ex.response_ids:
                key = sequence_key(ex.prompt_ids, r)
                have = self.entries.get(key)
                if (have is None or (token_logps and have[2] is None)) and key not in out:
                    out[key] = (key, ex.prompt_ids, r)
        return list(out.values())

    def save(self) -> None:
        """Write the whole table atomically (tmp file + rename)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        items = list(self.entries.items())
        toks = [e[2] if e[2] is not None else torch.zeros(0) for _, e in items]
        offsets = np.cumsum([0] + [len(t) for t in toks])
        data = {
            "keys": torch.tensor([list(k) for k, _ in items], dtype=torch.uint8).reshape(len(items), 16),
            "logps": torch.tensor([e[0] for _, e in items], dtype=torch.float32),
            "lengths": torch.tensor([e[1] for _, e in items], dtype=torch.int64),
            "has_tok": torch.tensor([e[2] is not None for _, e in items], dtype=torch.bool),
            "tok_offsets": torch.tensor(offsets, dtype=torch.int64),
            "tok_values": torch.cat(toks).float() if toks else torch.zeros(0),
        }
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        save_file(data, str(tmp))
        os.replace(tmp, self.path)


class CachedReference:
    """Reference statistics looked up in a `ReferenceTable` (see module docstring)."""

    def __init__(self, table: ReferenceTable, fingerprint: str) -> None:
        self.table, self.fingerprint = table, fingerprint

    def stats(self, examples: Sequence[Example], token_logps: bool = False) -> SequenceStats:
        entries = [
            self.table.entries[sequence_key(e.prompt_ids, r)] for e in examples for r in e.response_ids
        ]
        return stats_from_entries(entries, token_logps)


def _model_stats(
    model: Any, examples: Sequence[Example], token_logps: bool, adapter_off: bool
) -> SequenceStats:
    from preftune.models.logprobs import example_stats

    was_training = model.training
    model.eval()
    ctx = model.disable_adapter() if adapter_off else nullcontext()
    try:
        with torch.no_grad(), ctx:
            return example_stats(model, list(examples), token_logps=token_logps)
    finally:
        release(model)
        model.train(was_training)


class ModelReference:
    """A separate frozen model computing reference statistics on the fly (no gradients)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)

    @property
    def collective(self) -> bool:
        """A sharded (FSDP) model: every forward is a collective, so all ranks must run as many."""
        return bool(getattr(self.model, "is_sharded_policy", False))

    def stats(self, examples: Sequence[Example], token_logps: bool = False) -> SequenceStats:
        return _model_stats(self.model, examples, token_logps, adapter_off=False)

    @torch.no_grad()
    def sync(self, policy: Any, alpha: float) -> None:
        """TR-DPO soft update π_ref ← α π_θ + (1 − α) π_ref (Gorbatovski et al. 2024, eq. 4); α=1 hard copy."""
        policy_params = dict(policy.named_parameters())
        for name, p_ref in self.model.named_parameters():
            p_ref.mul_(1.0 - alpha).add_(policy_params[name].detach().to(p_ref.dtype), alpha=alpha)


class AdapterReference:
    """The LoRA policy with adapters disabled: the base model is the reference, no second copy."""

    def __init__(self, policy: Any) -> None:
        if not hasattr(policy, "disable_adapter"):
            from preftune.errors import ConfigError

            raise ConfigError("reference='adapter' needs a LoRA (peft) policy; set lora=true")
        self.policy = policy

    def stats(self, examples: Sequence[Example], token_logps: bool = False) -> SequenceStats:
        return _model_stats(self.policy, examples, token_logps, adapter_off=True)


def precompute_reference(
    model: Any,
    example_sets: Sequence[Sequence[Example]],
    *,
    cache_dir: Path,
    token_logps: bool,
    batch_size: int,
    adapter_off: bool = False,
    log: Callable[[str], None] = print,
    gather: Callable[[list[Any]], list[Any]] = lambda x: x,
    shard: tuple[int, int] = (0, 1),
    write: bool = True,
    equal_forwards: bool = False,
    compute_dtype: torch.dtype | None = None,
    autocast: bool = True,
    device_type: str = "cpu",
) -> CachedReference:
    """Fill the reference cache of `model` for every sequence of `example_sets`; return the lookup.

    `shard=(rank, size)` splits the missing sequences across processes; `gather` concatenates the
    per-rank results (identity in one process); only the process with `write=True` writes the file.
    `equal_forwards`: `model` is sharded (FSDP), so every rank runs as many forward passes as the rank
    with the most sequences (the others repeat one, discarded).
    `compute_dtype` (mixed precision): the log-probs are computed in this dtype — under `torch.autocast`
    when `autocast`, else the model casts by itself (FSDP) — and the cache file is keyed by it too.
    """
    fingerprint = model_fingerprint(model, adapters=not adapter_off)
    if compute_dtype is not None:  # the same weights computing in bf16 give other log-probs
        fingerprint = hashlib.blake2b(
            f"{fingerprint}:compute={compute_dtype}".encode(), digest_size=16
        ).hexdigest()
    cast = (
        torch.autocast(device_type, dtype=compute_dtype)
        if compute_dtype is not None and autocast
        else nullcontext()
    )
    table = ReferenceTable(cache_dir / "reference" / f"{fingerprint}.safetensors")
    examples = [e for s in example_sets for e in s]
    total = len({sequence_key(e.prompt_ids, r) for e in examples for r in e.response_ids})
    missing = table.missing(examples, token_logps)
    if not missing:
        log(f"reference: all {total} sequences found in the cache ({table.path}); reference pass skipped")
        return CachedReference(table, fingerprint)
    log(f"reference: computing log-probs of {len(missing)} of {total} sequences (cache {table.path})")
    rank, size = shard
    mine = missing[rank::size]
    results: list[tuple[bytes, float, int, torch.Tensor | None]] = []
    # A sharded model runs collectives in each forward: every rank runs as many as the busiest one.
    passes = -(-len(missing[::size]) // batch_size) if equal_forwards else -(-len(mine) // batch_size)
    for i in range(0, passes * batch_size, batch_size):
        chunk = mine[i : i + batch_size]
        if not chunk:
            with cast:
                _model_stats(
                    model, [Example(prompt_ids=missing[0][1], response_ids=[missing[0][2]])], False, False
                )
            continue
        exs = [Example(prompt_ids=p, response_ids=[r]) for _, p, r in chunk]
        with cast:
            st = _model_stats(model, exs, token_logps, adapter_off)
        for j, (key, _, _) in enumerate(chunk):
            n = int(st.lengths[j])
            tok = st.token_logps[j, :n].detach().cpu().clone() if st.token_logps is not None else None
            results.append((key, float(st.logps[j]), n, tok))
    for key, logp, n, tok in gather(results):
        table.entries[key] = (logp, n, tok)
    if write:
        try:
            table.save()
        except OSError as err:  # a read-only or full disk must not stop training; the values are in memory
            log(f"reference: could not write the cache {table.path} ({err.strerror}); continuing without it")
    return CachedReference(table, fingerprint)
