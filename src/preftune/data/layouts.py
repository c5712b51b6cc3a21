"""Record layouts: the field names preftune reads, the user's column mapping, and the kind a record is.

Sits between the readers (which give plain dicts) and validation (`schema.validate`).
"""

from __future__ import annotations

from typing import Any

from preftune.errors import ConfigError
from preftune.types import Kind

ALL_FIELDS = (
    "prompt",
    "chosen",
    "rejected",
    "completion",
    "label",
    "responses",
    "scores",
    "margins",
    "score_chosen",
    "score_rejected",
)


def parse_columns(spec: str | dict[str, str] | None) -> dict[str, str]:
    """Parse `chosen=response_a,rejected=response_b` into {"chosen": "response_a", ...}.

    Keys are preftune's field names, values the column names in the user's data.
    """
    if spec is None:
        return {}
    if isinstance(spec, dict):
        pairs = dict(spec)
    else:
        pairs = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            if "=" not in part:
                raise ConfigError(
                    f"--columns entry '{part}' is not NAME=COLUMN — write e.g. "
                    "--columns chosen=response_a,rejected=response_b"
                )
            name, col = (s.strip() for s in part.split("=", 1))
            pairs[name] = col
    for name in pairs:
        if name not in ALL_FIELDS:
            raise ConfigError(
                f"--columns names unknown field '{name}' — known fields: "
                f"{', '.join(ALL_FIELDS)} (write FIELD=YOUR_COLUMN)"
            )
    return pairs


def detect_kind(record: dict[str, Any]) -> Kind | None:
    """Guess the kind from the fields present: responses → ranked, completion → unpaired,
    chosen/rejected → pairwise."""
    if "responses" in record:
        return "ranked"
    if "completion" in record:
        return "unpaired"
    if "chosen" in record or "rejected" in record:
        return "pairwise"
    return None


def apply_columns(record: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """Rename the user's columns to preftune's field names (columns maps field → column)."""
    if not columns:
        return record
    out = dict(record)
    for name, col in columns.items():
        if name != col:
            out.pop(name, None)
            if col in record:
                out[name] = record[col]
    return out
