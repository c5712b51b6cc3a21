"""Image preference data: rows of a JSONL / JSON / Parquet file → validated `ImageRecord`s.

Four row formats, told apart by their fields (docs/diffusion.md, "Data"):

    pairs        {"prompt": str, "chosen": IMAGE, "rejected": IMAGE}
    Pick-a-Pic   {"caption": str, "jpg_0": IMAGE, "jpg_1": IMAGE, "label_0": 1 | 0 | 0.5}
                 (label_0 = 1: jpg_0 preferred; 0: jpg_1 preferred; 0.5, a tie, is dropped and counted)
    per image    {"prompt": str, "image": IMAGE, "label": true | false | 1 | 0}   (Diffusion-KTO)
    two captions {"chosen_prompt": str, "rejected_prompt": str, "chosen": IMAGE, "rejected": IMAGE}
                 (DCPO: each image conditioned on its own caption)

Pairs and two-caption rows may add "chosen_score" and "rejected_score" (normalised reward scores):
the row's label is then SmPO's smoothed preference p = softmax(s_w, s_l)_w = σ(s_w − s_l).

IMAGE is a path (relative to the data file's folder), raw bytes (Parquet), a `datasets` Image dict
({"bytes": ..., "path": ...}) or a `data:image/...;base64,` string. A bad row is a `DataError`
`PATH:ROW: field 'NAME': what — fix` (or, with on_invalid=drop, dropped and counted).
"""

from __future__ import annotations

import base64
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preftune.errors import DataError

FORMATS: dict[str, tuple[str, ...]] = {
    "two_captions": ("chosen_prompt", "rejected_prompt", "chosen", "rejected"),
    "pairs": ("prompt", "chosen", "rejected"),
    "pickapic": ("caption", "jpg_0", "jpg_1", "label_0"),
    "per_image": ("prompt", "image", "label"),
}


@dataclass
class ImageRecord:
    """One validated row: images [chosen, rejected] (pairs) or [image] (per-image label).

    captions: one shared caption, or [chosen caption, rejected caption] (two-caption rows).
    digests: SHA-256 of each image's bytes (the cache key); label: 1.0 / 0.0 for per-image rows,
    SmPO's smoothed p for pairs with scores.
    """

    row: int
    kind: str  # "pairwise" | "unpaired"
    images: list[bytes]
    digests: list[str]
    captions: list[str]
    label: float | None = None
    fields: tuple[str, ...] = ("chosen", "rejected")  # the row's field of each image (for messages)


def detect_format(record: dict[str, Any]) -> str | None:
    """The format whose fields the record has (two captions before plain pairs), else None."""
    return next((name for name, fields in FORMATS.items() if all(f in record for f in fields)), None)


def image_bytes(value: Any, base: Path, *, path: str, row: int, field: str) -> bytes:
    """The encoded image bytes of an IMAGE value (see the module docstring)."""
    fix = "give an image file path (relative to the data file), bytes, or a data:image/...;base64 string"
    if isinstance(value, dict):
        if value.get("bytes"):
            value = value["bytes"]
        elif value.get("path"):
            value = value["path"]
    if isinstance(value, (bytes, bytearray)):
        if not value:
            raise DataError("empty image bytes", path=path, row=row, field=field, fix=fix)
        return bytes(value)
    if not isinstance(value, str) or not value.strip():
        raise DataError(
            f"expected an image, got {type(value).__name__}", path=path, row=row, field=field, fix=fix
        )
    if value.startswith("data:image/"):
        try:
            return base64.b64decode(value.split(",", 1)[1], validate=True)
        except (IndexError, ValueError):
            raise DataError("not a valid base64 data URL", path=path, row=row, field=field, fix=fix) from None
    file = Path(value).expanduser()
    file = file if file.is_absolute() else base / file
    if not file.is_file():
        raise DataError(
            f"no image file '{value}' (looked for {file})", path=path, row=row, field=field, fix=fix
        )
    return file.read_bytes()


def _caption(record: dict[str, Any], name: str, *, path: str, row: int) -> str:
    value = record[name]
    if not isinstance(value, str) or not value.strip():
        raise DataError(
            "expected a non-empty caption (text)", path=path, row=row, field=name, fix="give the prompt text"
        )
    return value


def _label(value: Any, name: str, allowed: tuple[float, ...], *, path: str, row: int) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and float(value) in allowed:
        return float(value)
    shown = " or ".join(str(a).rstrip("0").rstrip(".") if a != int(a) else str(int(a)) for a in allowed)
    raise DataError(
        f"expected {shown}, got {value!r}", path=path, row=row, field=name, fix=f"set {name} to {shown}"
    )


def parse_record(record: dict[str, Any], base: Path, *, path: str, row: int) -> ImageRecord | None:
    """The `ImageRecord` of one row; None for a Pick-a-Pic tie (label_0 = 0.5)."""
    kind = detect_format(record)
    if kind is None:
        shown = "; ".join(", ".join(f) for f in FORMATS.values())
        raise DataError(
            f"not an image preference row (fields: {', '.join(sorted(record)) or 'none'})",
            path=path,
            row=row,
            fix=f"give one of these sets of fields: {shown} (docs/diffusion.md, 'Data')",
        )
    where: dict[str, Any] = {"path": path, "row": row}
    if kind == "pickapic":
        label = _label(record["label_0"], "label_0", (0.0, 0.5, 1.0), **where)
        if label == 0.5:
            return None
        order = ("jpg_0", "jpg_1") if label == 1.0 else ("jpg_1", "jpg_0")
        images = [image_bytes(record[f], base, field=f, **where) for f in order]
        return _record(row, "pairwise", images, [_caption(record, "caption", **where)], fields=order)
    if kind == "per_image":
        label = _label(record["label"], "label", (0.0, 1.0), **where)
        images = [image_bytes(record["image"], base, field="image", **where)]
        return _record(row, "unpaired", images, [_caption(record, "prompt", **where)], label, ("image",))
    images = [image_bytes(record[f], base, field=f, **where) for f in ("chosen", "rejected")]
    names = ("chosen_prompt", "rejected_prompt") if kind == "two_captions" else ("prompt",)
    captions = [_caption(record, n, **where) for n in names]
    return _record(row, "pairwise", images, captions, _smoothed_label(record, **where))


def _smoothed_label(record: dict[str, Any], *, path: str, row: int) -> float | None:
    """SmPO's p = softmax(s_w, s_l)_w = σ(s_w − s_l) from the optional chosen_score / rejected_score."""
    if "chosen_score" not in record and "rejected_score" not in record:
        return None
    scores = []
    for name in ("chosen_score", "rejected_score"):
        value = record.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DataError(
                f"expected a number, got {value!r}", path=path, row=row, field=name,
                fix="give both chosen_score and rejected_score (normalised reward scores), or neither",
            )  # fmt: skip
        scores.append(float(value))
    return 1.0 / (1.0 + math.exp(scores[1] - scores[0]))


def _record(
    row: int,
    kind: str,
    images: list[bytes],
    captions: list[str],
    label: float | None = None,
    fields: tuple[str, ...] = ("chosen", "rejected"),
) -> ImageRecord:
    digests = [hashlib.sha256(b).hexdigest() for b in images]
    return ImageRecord(row, kind, images, digests, captions, label, fields)


def read_image_records(
    source: str, *, split: str | None = None, on_invalid: str = "error"
) -> tuple[list[ImageRecord], dict[str, int]]:
    """(records, counts) of an image preference file; counts: rows, ties dropped, invalid dropped."""
    from preftune.data.sources import read_source

    data = read_source(source, split=split)
    fatal = [p for p in data.problems if p.row is None]
    if fatal:
        raise DataError(fatal[0].render())
    records: list[ImageRecord] = []
    counts = {"rows": len(data.rows), "ties": 0, "invalid": 0}
    for _row, _record, parse in _row_parsers(data, source):
        try:
            parsed = parse()
        except DataError:
            if on_invalid != "drop":
                raise
            counts["invalid"] += 1
            continue
        if parsed is None:
            counts["ties"] += 1
        else:
            records.append(parsed)
    return records, counts


def _row_parsers(
    data: Any, source: str
) -> list[tuple[int, dict[str, Any] | None, Callable[[], ImageRecord | None]]]:
    """(row, record, parse) for each row of read data: `parse()` is the row's `ImageRecord` (None for a tie),
    or a DataError naming the row (an unreadable line included). Image paths resolve against the data
    file's folder (the working directory for a dataset folder or hub id)."""
    base = Path(source).expanduser().resolve().parent if Path(source).is_file() else Path.cwd()
    problems = {p.row: p for p in data.problems if p.row is not None}

    def parser(row: int, record: dict[str, Any] | None) -> Callable[[], ImageRecord | None]:
        def parse() -> ImageRecord | None:
            if record is None:
                problem = problems.get(row)
                raise DataError(problem.render() if problem else f"{data.path}:{row}: unreadable row")
            return parse_record(record, base, path=data.path, row=row)

        return parse

    return [(row, record, parser(row, record)) for row, record in data.rows]


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def looks_like_images(record: dict[str, Any]) -> bool:
    """Whether a row is image preference data: Pick-a-Pic or per-image fields, or a pair whose chosen
    value is an image (bytes, a `datasets` Image dict, a data URL or a path with an image suffix)."""
    kind = detect_format(record)
    if kind in ("pickapic", "per_image"):
        return True
    value = record.get("chosen") if kind else None
    if isinstance(value, (bytes, bytearray, dict)):
        return True
    return isinstance(value, str) and (
        value.startswith("data:image/") or value.strip().lower().endswith(_IMAGE_SUFFIXES)
    )


def check_image_file(source: str, data: Any) -> tuple[list[ImageRecord], dict[str, Any], list[str]]:
    """`preftune data check` of image preference data (`data`: `source` as `read_source` read it):
    (records, summary, problems) with every row parsed as `read_image_records` parses it and each
    image decoded as training decodes it, one `PATH:ROW: field 'NAME': what — fix` per bad row;
    summary: rows, ties (Pick-a-Pic label_0 = 0.5, dropped), rows per format, images per size."""
    problems = [p.render() for p in data.problems if p.row is None]
    records: list[ImageRecord] = []
    summary: dict[str, Any] = {"rows": len(data.rows), "ties": 0, "formats": {}, "sizes": {}}
    for _row, record, parse in _row_parsers(data, source):
        try:
            parsed = parse()
            sizes = (
                []
                if parsed is None
                else [_image_size(parsed, i, data.path) for i in range(len(parsed.images))]
            )
        except DataError as err:
            problems.append(str(err))
            continue
        if parsed is None:
            summary["ties"] += 1
            continue
        records.append(parsed)
        fmt = detect_format(record or {}) or "?"
        summary["formats"][fmt] = summary["formats"].get(fmt, 0) + 1
        for size in sizes:
            summary["sizes"][size] = summary["sizes"].get(size, 0) + 1
    return records, summary, problems


def open_image(data: bytes, where: Callable[[], tuple[str, int, str]]) -> Any:
    """The decoded RGB image (PIL) of an image's bytes; a DataError at `where()` (path, row, field) when
    PIL cannot read them."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(io.BytesIO(data)).convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        # (PIL's own message for an unknown format names its in-memory file object)
        what = "not a format PIL recognises" if isinstance(err, UnidentifiedImageError) else str(err)
        path, row, field = where()
        raise DataError(
            f"cannot read the image ({what})",
            path=path,
            row=row,
            field=field,
            fix="give a PNG/JPEG/WebP image",
        ) from None


def _image_size(record: ImageRecord, index: int, path: str) -> str:
    """ "W×H" of a record's image, decoded as training decodes it."""
    width, height = open_image(record.images[index], lambda: (path, record.row, record.fields[index])).size
    return f"{width}×{height}"
