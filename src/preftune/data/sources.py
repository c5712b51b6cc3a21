"""Read preference records from where people keep them: JSONL, JSON, Parquet, CSV, `datasets`.

Every reader returns a `SourceData`: the records as plain dicts with the row a person would look up
(1-based line for JSONL and CSV, 1-based record index for JSON arrays, Parquet and `datasets`), and
the problems met while reading (a malformed line, non-UTF-8 bytes, an empty file...). Readers never
stop at the first bad row, so `preftune data check` can list them all.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from preftune.data.rows import Problem as Problem
from preftune.data.rows import SourceData as SourceData
from preftune.data.rows import _bad_utf8, _empty, _from_dicts, _not_object, read_text
from preftune.data.tabular import load_hub, read_csv, read_hub, read_parquet, read_saved_dataset
from preftune.errors import ConfigError, DataError

_SPLIT_RE = re.compile(r"^(?P<name>[\w.-]+)(\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\])?$")


def parse_split(split: str | None) -> tuple[str | None, str | None, str | None]:
    """`train[:90%]` → ("train", None, "90%"); `eval` → ("eval", None, None)."""
    if split is None:
        return None, None, None
    m = _SPLIT_RE.match(split.strip())
    if not m:
        raise ConfigError(
            f"split '{split}' is not NAME or NAME[START:STOP] — write e.g. train, train[:90%] or train[90%:]"
        )
    return m.group("name"), m.group("start"), m.group("stop")


def _bound(text: str | None, n: int) -> int | None:
    if text is None:
        return None
    if text.endswith("%"):
        return int(n * int(text[:-1]) // 100)
    return int(text)


def _apply_slice(data: SourceData, start: str | None, stop: str | None) -> SourceData:
    if start is None and stop is None:
        return data
    n = len(data.rows)
    kept = data.rows[slice(_bound(start, n), _bound(stop, n))]
    rows = {r for r, _ in kept}
    problems = [p for p in data.problems if p.row is None or p.row in rows]
    return SourceData(data.path, kept, problems)


def read_source(source: str | Path | list[dict[str, Any]], *, split: str | None = None) -> SourceData:
    """Read all records of `source`: a file, a `save_to_disk` folder, a hub id, or a list of dicts.

    `split` picks a split of a dataset folder or hub id (default "train") and may slice it:
    `train[:90%]`, `train[90%:]`, `train[10:200]`. A single file is the split "train".
    """
    name, start, stop = parse_split(split)
    if isinstance(source, list):
        data = _from_dicts("<records>", source, start_row=1)
    else:
        path = resolve_source(source)
        if isinstance(path, str):
            data = read_hub(path, name)
        elif path.is_dir():
            data = read_saved_dataset(path, name)
        else:
            if name not in (None, "train"):
                raise ConfigError(
                    f"{path} is a single file, which holds only the split 'train', not "
                    f"'{name}' — hold out part of it with e.g. --split train[90%:]"
                )
            data = _read_file(path)
    return _apply_slice(data, start, stop)


def resolve_source(source: str | Path, *, field: str | None = None) -> Path | str:
    """The existing file or folder `source` names, or the hub dataset id it may be (a str).

    A local path that does not exist is "no such file or folder" at once; a name that may be a hub id
    is only passed on when the hub can be asked (see `preftune.paths`). `field` names the config key
    in the message (e.g. eval_data)."""
    from preftune.paths import hub_unreachable, is_local_path

    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        return path
    if is_local_path(text):
        raise DataError(
            "no such file or folder",
            path=text,
            field=field,
            fix="check the path (a JSONL/JSON/Parquet/CSV file or a datasets save_to_disk folder)",
        )
    why = hub_unreachable()
    if why:
        raise DataError(
            f"no such file or folder here, and {why} to load it as a hub dataset id",
            path=text,
            field=field,
            fix="check the path (a local file: ./NAME), or connect to the network (a dataset "
            "downloaded before loads with HF_HUB_OFFLINE=1)",
        )
    return text


def _read_file(path: Path) -> SourceData:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return read_jsonl(path)
    if suffix == ".json":
        return read_json(path)
    if suffix == ".parquet":
        return read_parquet(path)
    if suffix in (".csv", ".tsv"):
        return read_csv(path)
    raise DataError(
        f"unknown file type '{suffix}'",
        path=str(path),
        fix="use .jsonl, .json, .parquet or .csv (or a datasets save_to_disk folder)",
    )


def read_jsonl(path: Path) -> SourceData:
    """One JSON object per line; ROW is the 1-based line number; blank lines are skipped."""
    label = str(path)
    raw = path.read_bytes()
    data = SourceData(label)
    if not raw.strip():
        data.problems.append(_empty(label))
        return data
    for i, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8-sig" if i == 1 else "utf-8")  # a BOM may open the file
        except UnicodeDecodeError as err:
            data.problems.append(_bad_utf8(label, i, err))
            data.rows.append((i, None))
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            data.problems.append(
                Problem(
                    f"malformed JSON: {err.msg} (column {err.colno})",
                    row=i,
                    path=label,
                    reason="malformed JSON",
                    fix="fix the JSON syntax; each line must be one complete object",
                )
            )
            data.rows.append((i, None))
            continue
        if not isinstance(value, dict):
            data.problems.append(_not_object(label, i, value))
            data.rows.append((i, None))
            continue
        data.rows.append((i, value))
    return data


def read_json(path: Path) -> SourceData:
    """A JSON array of objects; ROW is the 1-based index in the array. JSON lines in a .json file
    are read as JSONL."""
    label = str(path)
    text = read_text(path)
    if isinstance(text, SourceData):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":
            return read_jsonl(path)
        return SourceData(
            label,
            problems=[
                Problem(
                    f"malformed JSON: {err.msg} (line {err.lineno}, column {err.colno})",
                    path=label,
                    fix="fix the JSON syntax; the file must hold one array of objects",
                )
            ],
        )
    if not isinstance(value, list):
        return SourceData(
            label,
            problems=[
                Problem(
                    f"top level is a JSON {type(value).__name__}, not an array of objects",
                    path=label,
                    fix="write [{...}, {...}] or use JSONL (one object per line)",
                )
            ],
        )
    data = _from_dicts(label, value, start_row=1, what="record")
    if not data.rows:
        data.problems.append(_empty(label))
    return data


def content_hash(source: str | Path | list[dict[str, Any]], *, split: str | None = None) -> str:
    """A hash of the data a source holds (file bytes; every file of a folder; a hub dataset's
    datasets fingerprint). Cheap compared to parsing, so a cache hit skips reading the records."""
    h = hashlib.blake2b(digest_size=20)
    h.update(repr(split).encode())
    if isinstance(source, list):
        h.update(json.dumps(source, sort_keys=True, default=str).encode())
        return h.hexdigest()
    path = resolve_source(source)
    if isinstance(path, str):  # hub id: resolved by datasets, which fingerprints what it downloaded
        ds = load_hub(path, parse_split(split)[0])
        h.update(str(getattr(ds, "_fingerprint", source)).encode())
    elif path.is_file():
        _hash_file(h, path)
    else:
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(path)).encode())
            _hash_file(h, f)
    return h.hexdigest()


def _hash_file(h: Any, path: Path) -> None:
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
