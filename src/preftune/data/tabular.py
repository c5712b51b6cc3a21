"""Readers of tabular sources: Parquet, CSV/TSV, `datasets` folders and hub datasets.

Each returns a `SourceData` like the JSON readers in `sources.py` (which dispatches to these); ROW is the 1-based row (CSV: the
1-based line where the record ends).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from preftune.data.rows import Problem, SourceData, _empty, _from_dicts, read_text
from preftune.errors import ConfigError, DataError

# Fields whose CSV cells hold JSON (message lists, lists of responses or numbers).
_JSON_CELL_FIELDS = ("prompt", "chosen", "rejected", "completion", "responses", "scores", "margins")
_NUMBER_CELL_FIELDS = ("score_chosen", "score_rejected", "margin")


def read_parquet(path: Path) -> SourceData:
    """A Parquet table; ROW is the 1-based row index."""
    import pyarrow.parquet as pq

    label = str(path)
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for unreadable files
        return SourceData(
            label,
            problems=[
                Problem(
                    f"not a readable Parquet file ({err})",
                    path=label,
                    fix="re-write it with pandas.to_parquet or pyarrow",
                )
            ],
        )
    data = _from_dicts(label, table.to_pylist(), start_row=1)
    if not data.rows:
        data.problems.append(_empty(label))
    return data


def _coerce_cell(name: str, cell: str) -> Any:
    """CSV has only text: read JSON lists, booleans and numbers back from the fields that hold them."""
    stripped = cell.strip()
    if name == "label":
        low = stripped.lower()
        if low in ("true", "false"):
            return low == "true"
        try:
            return float(stripped)
        except ValueError:
            return cell
    if name in _NUMBER_CELL_FIELDS:
        try:
            return float(stripped)
        except ValueError:
            return cell
    if name in _JSON_CELL_FIELDS and stripped[:1] in ("[", "{"):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError:
            return cell
    return cell


def read_csv(path: Path) -> SourceData:
    """A CSV (or TSV) file with a header row; ROW is the 1-based line number where the record ends.

    Message lists, `responses`, `scores` and `margins` are JSON in their cells; `label` is
    true/false (or a number for soft pairwise labels). Empty cells of optional fields are absent.
    """
    label = str(path)
    text = read_text(path)
    if isinstance(text, SourceData):
        return text
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    data = SourceData(label)
    for record in reader:
        row = reader.line_num
        if None in record:
            data.problems.append(
                Problem(
                    "row has more cells than the header",
                    row=row,
                    path=label,
                    fix="quote cells that contain the delimiter",
                )
            )
            data.rows.append((row, None))
            continue
        out: dict[str, Any] = {}
        for key, cell in record.items():
            if cell is None or (cell == "" and key in ("label", "scores", "margins", *_NUMBER_CELL_FIELDS)):
                continue
            out[key] = _coerce_cell(key, cell)
        data.rows.append((row, out))
    if not data.rows:
        data.problems.append(_empty(label))
    return data


def _pick_split(dd: Any, name: str | None, label: str) -> Any:
    splits = list(dd.keys())
    if name is None:
        name = "train" if "train" in splits or len(splits) != 1 else splits[0]
    if name not in splits:
        raise DataError(f"no split '{name}'", path=label, fix=f"use --split with one of: {', '.join(splits)}")
    return dd[name]


def read_saved_dataset(path: Path, name: str | None) -> SourceData:
    """A folder written by `datasets.Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    import datasets

    label = str(path)
    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise DataError(
            f"folder is not a saved datasets dataset ({err})",
            path=label,
            fix="point at a folder written by Dataset.save_to_disk, or at a data file",
        ) from err
    if isinstance(ds, datasets.DatasetDict):
        ds = _pick_split(ds, name, label)
    elif name not in (None, "train"):
        raise ConfigError(f"{label} holds a single split; use --split train (optionally sliced)")
    data = _from_dicts(label, ds.to_list(), start_row=1)
    if not data.rows:
        data.problems.append(_empty(label))
    return data


def load_hub(repo_id: str, name: str | None) -> Any:
    """`datasets.load_dataset(repo_id, split=name or "train")`, its failures as one DataError."""
    import datasets

    try:
        return datasets.load_dataset(repo_id, split=name or "train")
    except (ConnectionError, FileNotFoundError) as err:  # no such dataset, or none reachable/cached
        raise not_found(repo_id, err) from None
    except Exception as err:  # a missing split, a dataset the library cannot read...
        raise DataError(
            f"cannot load hub dataset ({type(err).__name__}: {err})",
            path=repo_id,
            fix="check the dataset id and split, and that you are online",
        ) from err


def not_found(text: str, err: BaseException) -> DataError:
    """`text` is neither a local file nor a hub dataset that could be loaded: one line naming both
    readings, the local path first when `text` looks like one (a typo'd file name)."""
    from preftune.paths import looks_like_file, offline

    hub = f"{type(err).__name__}: {err}".splitlines()[0]
    if looks_like_file(text):
        return DataError(
            f"no such file or folder (and no hub dataset of that name could be loaded: {hub})",
            path=text,
            fix="check the path (a JSONL/JSON/Parquet/CSV file or a datasets save_to_disk folder)",
        )
    return DataError(
        f"neither a local file nor a reachable hub dataset ({hub})",
        path=text,
        fix="check the path (a local file without extension: ./NAME) or the dataset id"
        + (
            " (offline mode reads only datasets downloaded before)"
            if offline()
            else ", and that you are online"
        ),
    )


def read_hub(repo_id: str, name: str | None) -> SourceData:
    """A dataset on the Hugging Face hub, through `datasets.load_dataset` (needs the network)."""
    ds = load_hub(repo_id, name)
    data = _from_dicts(repo_id, ds.to_list(), start_row=1)
    if not data.rows:
        data.problems.append(_empty(repo_id))
    return data
