"""Digests of what a run trains on. A checkpoint records one, so a `--resume` whose data file was
rewritten under the same path (or tokenizes otherwise) is refused, naming the file
(`runfolder.check_resume_data`), instead of silently training on other rows.

    data_digest(sources)   the main loop's phases (offline examples, an online phase's prompts)
    rows_digest(rows)      one list of rows: a reward model's examples, a PRM's (item, encoding)
                           pairs, an online diffusion run's prompt texts
    image_rows_digest(sources)  an offline diffusion run's images and captions, per data row
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
    count and labels — their images and captions are `image_rows_digest`'s)."""
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


def image_rows_digest(sources: Sequence[Any]) -> str:
    """The image examples' own digest, 8 hex digits per data row in order of first use (a pair split
    into two unpaired examples is one row): a hash of the SHA-256 of each image's bytes
    (`ImageRecord.digests`, computed once when the file is read, the latent cache's key) and of its
    captions. `data_digest` covers the rows' count and labels only, so a rewritten image file trained
    silently; "" for language data. `changed_image_row` names the first row that differs."""
    rows: dict[int, str] = {}
    for source in sources:
        for example in getattr(source, "examples", None) or []:
            meta = example.meta or {}
            if "image_digests" in meta and example.source_row not in rows:
                text = repr((meta["image_digests"], meta["captions"])).encode()
                rows[example.source_row] = hashlib.blake2b(text, digest_size=4).hexdigest()
    return "".join(f"{row}:{digest};" for row, digest in rows.items())


def changed_image_row(saved: str, now: str) -> str:
    """The first data row whose images or captions differ between two `image_rows_digest`s ("" when
    none does)."""
    old, new = (
        dict(p.split(":") for p in saved.split(";") if p),
        dict(p.split(":") for p in now.split(";") if p),
    )
    return next((row for row, digest in old.items() if new.get(row, digest) != digest), "")


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
