"""Digests of what a run trains on. A checkpoint records one, so a `--resume` whose data file was
rewritten under the same path (or tokenizes otherwise) is refused, naming the file
(`runfolder.check_resume_data`), instead of silently training on other rows.

    data_digest(sources)   the main loop's phases (offline examples, an online phase's prompts)
    rows_digest(rows)      one list of rows: a reward model's examples, a PRM's (item, encoding)
                           pairs, an online diffusion run's prompt texts
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from typing import Any

from preftune.types import Example


def data_digest(sources: Sequence[Any]) -> str:
    """A hash of what each phase trains on, in order: its examples' token ids, kinds, labels, scores
    and margins (an online phase: its prompts' token ids, texts and columns; image examples: their
    count and labels, not their latents)."""
    h = hashlib.blake2b(digest_size=16)
    for source in sources:
        prompts = getattr(source, "prompts", None)
        rows: Sequence[Any] = source.examples if prompts is None else prompts
        h.update(f"phase {source.index}: {len(rows)} rows\n".encode())
        for row in rows:
            _add(h, row)
    return h.hexdigest()


def rows_digest(rows: Sequence[Any]) -> str:
    """A hash of `rows` in order: `Example`s as in `data_digest`; anything else by its repr (prompt
    texts; a PRM's `PRMItem` and `EncodedItem` dataclasses of text, labels and token ids)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{len(rows)} rows\n".encode())
    for row in rows:
        if isinstance(row, Example):
            _add(h, row)
        else:
            text = repr(row).encode()
            h.update(len(text).to_bytes(8, "little"))
            h.update(text)
    return h.hexdigest()


def _add(h: Any, row: Any) -> None:
    """Add an `Example` or an online phase's `PromptRow` to the hash `h`."""
    if isinstance(row, Example):
        ids = [row.prompt_ids, *row.response_ids]
        other: tuple[Any, ...] = (row.kind, row.label, row.scores, row.margins, row.margin)
    else:  # an online phase's PromptRow
        ids, other = [row.ids], (row.text, sorted(row.columns.items(), key=lambda kv: kv[0]))
    for seq in ids:
        h.update(len(seq).to_bytes(8, "little"))
        h.update(array("q", seq).tobytes())
    h.update(repr(other).encode())
