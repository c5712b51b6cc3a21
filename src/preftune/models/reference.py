"""Reference-model statistics (docs/algorithms.md §4): cache | adapter-off | separate model.

Three ways to get `logp_ref` for a batch, behind one `stats(examples)` method:

- `CachedReference`: stored on disk (`preftune.models.refcache`). The cache is content-addressed: a
  folder per reference *model fingerprint* (a hash of its weights and dtype, and of the compute dtype
  under mixed precision) maps a hash of each sequence's token ids (prompt + response, so data,
  tokenization and truncation are all part of the key) to its summed log-prob, length and optionally
  per-token log-probs. Entries are computed only for the examples a run uses — per batch as training
  reaches it when the reference weights stay in memory anyway (LoRA: the policy's base), else for the
  run's batches before its first step — and each batch's entries are written as they are computed.
  A second run — of any method — on the same model and data computes nothing; `preftune sweep`
  relies on this. Values are computed in fixed groups (`Blocks`), so a lost entry is recomputed to
  the very same float.
- `AdapterReference`: the LoRA policy with its adapters disabled (peft's `disable_adapter()`): no copy.
- `ModelReference`: a separate frozen model; needed when the reference moves (TR-DPO sync).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from preftune.models.refcache import Entry, ReferenceStore, merge
from preftune.models.sharding import full_tensor, release
from preftune.types import Example, SequenceStats


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
        # the tensor's own bytes (no `.tobytes()` copy: that doubled the largest weight in memory)
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def reference_fingerprint(model: Any, *, adapter_off: bool, compute_dtype: torch.dtype | None) -> str:
    """The cache folder name of a reference: its weights' fingerprint, and the compute dtype when mixed
    precision computes in another dtype than the weights (other log-probs, another entry)."""
    fingerprint = model_fingerprint(model, adapters=not adapter_off)
    if compute_dtype is None:
        return fingerprint
    return hashlib.blake2b(f"{fingerprint}:compute={compute_dtype}".encode(), digest_size=16).hexdigest()


PROGRESS_FROM = 8  # groups computed in one go from which `prepare` shows progress lines


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


def keys_of(examples: Iterable[Example]) -> list[bytes]:
    return [sequence_key(e.prompt_ids, r) for e in examples for r in e.response_ids]


class Blocks:
    """The fixed groups of examples reference log-probs are computed in, and their forward sizes.

    A sequence belongs to the first group that holds it; whenever it is missing, its whole group is
    computed, in the same forwards. So a value never depends on when, or by which step, it was computed:
    recomputing a lost entry gives back the very same float (what keeps `--resume` exact)."""

    def __init__(self) -> None:
        self.groups: list[list[Example]] = []
        self.chunks: list[int] = []
        self.owner: dict[bytes, int] = {}

    def add(self, examples: Sequence[Example], chunk: int) -> int:
        gid = len(self.groups)
        self.groups.append(list(examples))
        self.chunks.append(max(1, chunk))
        for key in keys_of(examples):
            self.owner.setdefault(key, gid)
        return gid


@dataclass
class Source:
    """The model that computes missing entries, and how the processes of a run share the work.

    `rank`/`size` split each group's examples; `gather` concatenates per-rank lists (identity in one
    process); `equal_forwards`: the model is sharded (FSDP), so every rank runs as many forwards as the
    busiest (the others repeat one, discarded); `cast`: a context for mixed-precision compute."""

    model: Any
    adapter_off: bool = False
    rank: int = 0
    size: int = 1
    gather: Callable[[list[Any]], list[Any]] = lambda x: x
    equal_forwards: bool = False
    cast: Callable[[], Any] = nullcontext


class CachedReference:
    """Reference statistics from the cache (module docstring); with a `source`, missing ones are computed
    on demand by `prepare(global_batch)` — whole groups of `blocks`, every rank in step — and appended to
    the cache as they are computed (`store`: the writing process only)."""

    def __init__(
        self,
        fingerprint: str,
        table: dict[bytes, Entry],
        blocks: Blocks,
        *,
        token_logps: bool,
        store: ReferenceStore | None = None,
        source: Source | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.fingerprint, self.table, self.blocks = fingerprint, table, blocks
        self.token_logps, self.store, self.source, self.log = token_logps, store, source, log
        self.computed = 0  # sequences computed (all ranks together)

    def lacks(self, key: bytes) -> bool:
        """True when `key` has no entry, or none with the per-token values the objective needs."""
        have = self.table.get(key)
        return have is None or (self.token_logps and have[2] is None)

    def missing_groups(self, examples: Sequence[Example]) -> list[int]:
        """Groups to compute so that every sequence of `examples` is in the table (sorted)."""
        missing = [(key, e) for e in examples for key in keys_of([e]) if self.lacks(key)]
        unknown = [e for key, e in missing if key not in self.blocks.owner]
        if unknown:  # not in any group set up for this run: a group of their own
            first = {id(e): e for e in unknown}
            self.blocks.add(list(first.values()), self.blocks.chunks[-1] if self.blocks.chunks else 8)
        return sorted({self.blocks.owner[key] for key, _ in missing})

    def stats(self, examples: Sequence[Example], token_logps: bool = False) -> SequenceStats:
        try:
            entries = [self.table[key] for key in keys_of(examples)]
        except KeyError:
            from preftune.errors import TrainingError

            raise TrainingError(
                f"reference: a sequence of source row {examples[0].source_row} has no cached reference "
                "log-prob and no reference model is attached to compute it"
            ) from None
        return stats_from_entries(entries, token_logps)

    def prepare(self, examples: Sequence[Example]) -> None:
        """Compute what `examples` (a global batch, the same on every rank) lack; a no-op when cached."""
        if self.source is not None:
            groups = self.missing_groups(examples)
            if groups:  # many at once (a held-out set's first evaluation): with progress lines
                self.compute(groups, progress=len(groups) >= PROGRESS_FROM)

    def compute(self, group_ids: Sequence[int], *, progress: bool = False) -> None:
        """Compute `group_ids` in slices of about 5%, each appended to the cache as one shard; with
        `progress`, a line per slice (batches done, elapsed, ETA)."""
        if self.source is None:
            raise RuntimeError("CachedReference.compute without a source model")
        total = len(group_ids)
        step = max(1, -(-total // 20)) if progress else total
        start, done = time.perf_counter(), 0
        for i in range(0, len(group_ids), step):
            part = group_ids[i : i + step]
            results = [r for g in part for r in self._forward_group(g)]
            new = []
            for gid, key, entry in self.source.gather(results):
                if self.blocks.owner.get(key) == gid and self.lacks(key) and merge(self.table, key, entry):
                    new.append((key, self.table[key]))
            if self.store is not None:
                self.store.append(new)
            done += len(part)
            self.computed += len(new)
            if progress:
                spent = time.perf_counter() - start
                eta = spent / done * (total - done)
                self.log(
                    f"reference: {done}/{total} batches ({100 * done // total}%), {spent:.1f} s, eta {eta:.1f} s"
                )

    def _forward_group(self, gid: int) -> list[tuple[int, bytes, Entry]]:
        """This rank's share of group `gid`: (group, key, entry) for every sequence it computed."""
        src = self.source
        assert src is not None
        group, chunk = self.blocks.groups[gid], self.blocks.chunks[gid]
        mine = group[src.rank :: src.size]
        busiest = -(-len(group) // src.size) if src.equal_forwards else len(mine)
        out: list[tuple[int, bytes, Entry]] = []
        for i in range(0, -(-busiest // chunk) * chunk, chunk):
            part = mine[i : i + chunk]
            with src.cast():
                st = _model_stats(
                    src.model, part or group[:1], self.token_logps and bool(part), src.adapter_off
                )
            if not part:  # a padding forward of a sharded model: collectives in step, result dropped
                continue
            logps, lengths = st.logps.detach().cpu().tolist(), st.lengths.detach().cpu().tolist()
            toks = st.token_logps.detach().cpu() if st.token_logps is not None else None
            for j, key in enumerate(keys_of(part)):
                n = int(lengths[j])
                tok = toks[j, :n].clone() if toks is not None else None
                out.append((gid, key, (float(logps[j]), n, tok)))
        return out


def _model_stats(
    model: Any, examples: Sequence[Example], token_logps: bool, adapter_off: bool, temperature: float = 1.0
) -> SequenceStats:
    from preftune.models.logprobs import example_stats

    was_training = model.training
    model.eval()
    ctx = model.disable_adapter() if adapter_off else nullcontext()
    try:
        with torch.no_grad(), ctx:
            return example_stats(model, list(examples), token_logps=token_logps, temperature=temperature)
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

    def stats(
        self, examples: Sequence[Example], token_logps: bool = False, temperature: float = 1.0
    ) -> SequenceStats:
        return _model_stats(self.model, examples, token_logps, adapter_off=False, temperature=temperature)

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

    def stats(
        self, examples: Sequence[Example], token_logps: bool = False, temperature: float = 1.0
    ) -> SequenceStats:
        return _model_stats(self.policy, examples, token_logps, adapter_off=True, temperature=temperature)


def load_cached(
    cache_root: Path,
    fingerprint: str,
    blocks: Blocks,
    *,
    token_logps: bool,
    log: Callable[[str], None],
    write: bool = True,
    share: Callable[[Any], Any] = lambda table: table,
) -> CachedReference:
    """The cache of `fingerprint` for the sequences of `blocks`. The writing process reads and checks the
    shards (setting damaged ones aside) and `share` hands its table to the other processes (a broadcast
    under torchrun), so that every rank holds the same values and agrees on what is missing."""
    store = ReferenceStore(cache_root, fingerprint, log) if write else None
    table = store.load(set(blocks.owner), compact=True) if store is not None else None
    table = share(table)
    assert table is not None
    return CachedReference(fingerprint, table, blocks, token_logps=token_logps, store=store, log=log)
