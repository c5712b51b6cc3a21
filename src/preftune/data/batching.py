"""Grouping examples into rows and batches that fill a token budget.

`pack_rows` decides which examples share one packed row (first-fit decreasing bin packing);
`LengthBucketSampler` decides which examples form one micro-batch, keeping lengths alike so that rows
come out full. The packed layout itself (prefix sharing, masks, positions) is in `preftune.models.packing`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

from preftune.errors import ConfigError


def pack_rows(sizes: Sequence[int], budget: int) -> list[list[int]]:
    """Assign items of the given token `sizes` to rows of at most `budget` tokens; return indices per row.

    First-fit decreasing (Johnson 1973): place items longest first into the first row with room; an
    item longer than `budget` gets a row of its own. Within a row, indices are in ascending order, and
    rows are ordered by their first index, so the result does not depend on ties in the sort.
    """
    if budget < 1:
        raise ConfigError(f"row budget {budget}: must be at least 1 token")
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r, free in enumerate(room):
            if sizes[i] <= free:
                rows[r].append(i)
                room[r] -= sizes[i]
                break
        else:
            rows.append([i])
            room.append(budget - sizes[i])
    return sorted((sorted(row) for row in rows), key=lambda row: row[0])


class LengthBucketSampler:
    """Yield micro-batches of example indices with similar token counts.

    lengths:     token count of each example (prompt + all branches, `Example.num_tokens`).
    batch_size:  examples per batch (fixed count); or
    max_tokens:  token budget per batch (variable count: as many examples as fit, at least one).
    Exactly one of `batch_size` / `max_tokens` must be set.
    shuffle:     shuffle within and across buckets with `seed` + epoch (see `set_epoch`); when False,
                 batches follow length order, longest first.
    bucket_factor: a shuffled window of `bucket_factor` batches' worth of examples is sorted by
                 length before cutting batches, so batches are near-homogeneous yet random.
    drop_last:   drop a final batch smaller than `batch_size` (fixed-count mode only).

    Every index appears exactly once per epoch (unless dropped by `drop_last`). Deterministic given
    (seed, epoch).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        *,
        batch_size: int | None = None,
        max_tokens: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        bucket_factor: int = 50,
        drop_last: bool = False,
    ) -> None:
        if (batch_size is None) == (max_tokens is None):
            raise ConfigError("LengthBucketSampler: set exactly one of batch_size and max_tokens")
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"batch_size={batch_size}: must be ≥ 1")
        if max_tokens is not None and max_tokens < 1:
            raise ConfigError(f"max_tokens={max_tokens}: must be ≥ 1")
        if bucket_factor < 1:
            raise ConfigError(f"bucket_factor={bucket_factor}: must be ≥ 1")
        self.lengths = [int(n) for n in lengths]
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self.shuffle, self.seed, self.bucket_factor, self.drop_last = shuffle, seed, bucket_factor, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use a different (deterministic) shuffle for each epoch."""
        self.epoch = epoch

    def _cut(self, indices: list[int]) -> list[list[int]]:
        """Cut a length-sorted run of indices into batches."""
        if self.batch_size is not None:
            out = [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
            return out
        batches: list[list[int]] = []
        current: list[int] = []
        used = 0
        for i in indices:
            if current and used + self.lengths[i] > (self.max_tokens or 0):
                batches.append(current)
                current, used = [], 0
            current.append(i)
            used += self.lengths[i]
        if current:
            batches.append(current)
        return batches

    def batches(self) -> list[list[int]]:
        """All batches of the current epoch, in the order they will be yielded."""
        n = len(self.lengths)
        if not self.shuffle:
            order = sorted(range(n), key=lambda i: (-self.lengths[i], i))
            batches = self._cut(order)
        else:
            rng = random.Random(self.seed * 1_000_003 + self.epoch)
            order = list(range(n))
            rng.shuffle(order)
            if self.batch_size is not None:
                window = self.batch_size * self.bucket_factor
            else:
                mean = max(1.0, sum(self.lengths) / max(n, 1))
                window = max(1, math.ceil((self.max_tokens or 1) / mean)) * self.bucket_factor
            batches = []
            for start in range(0, n, window):
                chunk = sorted(order[start : start + window], key=lambda i: (-self.lengths[i], i))
                batches.extend(self._cut(chunk))
            rng.shuffle(batches)
        if self.drop_last and self.batch_size is not None:
            batches = [b for b in batches if len(b) == self.batch_size]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())
