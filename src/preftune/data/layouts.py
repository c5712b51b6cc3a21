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
    "margin",
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


# --- other layouts, converted to preftune's fields before validation ------------------------------

# ShareGPT speaker names (LLaMA-Factory's defaults: human, gpt, observation, function_call, system).
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
    "system": "system",
}


def _message(m: Any) -> Any:
    """A ShareGPT turn {"from", "value"} as {"role", "content"}; anything else unchanged."""
    if not isinstance(m, dict) or "from" not in m:
        return m
    out = {k: v for k, v in m.items() if k not in ("from", "value")}
    out["role"] = SHAREGPT_ROLES.get(str(m["from"]), m["from"])
    out["content"] = m.get("value")
    return out


def _messages(value: Any) -> Any:
    if isinstance(value, list):
        return [_message(m) for m in value]
    return [_message(value)] if isinstance(value, dict) else value


def _with_system(record: dict[str, Any], turns: Any) -> Any:
    system = record.get("system")
    if isinstance(system, str) and system.strip() and isinstance(turns, list):
        return [{"role": "system", "content": system}, *turns]
    return turns


def _sharegpt(record: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str], str]:
    """LLaMA-Factory's ShareGPT: `conversations` (+ optional `system`), and either `chosen` /
    `rejected` single messages (pairwise) or `kto_tag` / `label` (unpaired: the last turn is the
    completion)."""
    rest = {k: v for k, v in record.items() if k not in ("conversations", "system", "kto_tag")}
    turns = _with_system(record, _messages(record["conversations"]))
    if "chosen" in record or "rejected" in record:
        for f in ("chosen", "rejected"):
            if f in record:
                rest[f] = _messages(record[f])
        return {**rest, "prompt": turns}, {"prompt": "conversations"}, "sharegpt"
    label = record.get("kto_tag", record.get("label"))
    out, names = _split_last(turns, "conversations")
    return {**rest, **out, "label": label}, names, "sharegpt"


def _split_last(turns: Any, column: str) -> tuple[dict[str, Any], dict[str, str]]:
    names = {"prompt": column, "completion": column}
    if isinstance(turns, list) and len(turns) >= 2:
        return {"prompt": turns[:-1], "completion": turns[-1:]}, names
    return {"prompt": turns, "completion": None}, names


def _ultrafeedback(record: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str], str]:
    """openbmb/UltraFeedback: `instruction` and `completions`, each with a `response` and GPT-4
    ratings. The score is `fine-grained_score` (the mean of the four aspect ratings), or
    `overall_score` in rows whose completions carry no fine-grained score; completions without a
    finite score are left out of the ranking."""
    comps = [c for c in record["completions"] if isinstance(c, dict)]
    key = "fine-grained_score" if any("fine-grained_score" in c for c in comps) else "overall_score"
    rated = [c for c in comps if _finite(c.get(key))]
    prompt_col = "instruction" if "instruction" in record else "prompt"
    rest = {k: v for k, v in record.items() if k not in ("instruction", "completions", "models")}
    out = {
        **rest,
        "prompt": record.get(prompt_col),
        "responses": [c.get("response") for c in rated],
        "scores": [float(c[key]) for c in rated],
    }
    names = {"prompt": prompt_col, "responses": "completions", "scores": f"completions[].{key}"}
    return out, names, "ultrafeedback"


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def normalize(record: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str], str]:
    """`record` in preftune's fields, the user's column behind each converted field (for messages),
    and the layout's name: "standard", "sharegpt" (`conversations` of `from`/`value` turns),
    "messages" (KTO rows: `messages` + `label`, the last message is the completion) or
    "ultrafeedback" (`instruction` + `completions` with ratings → ranked)."""
    if isinstance(record.get("conversations"), list) and "prompt" not in record:
        return _sharegpt(record)
    if (
        isinstance(record.get("messages"), list)
        and "label" in record
        and not any(f in record for f in ("prompt", "completion", "chosen", "rejected"))
    ):
        rest = {k: v for k, v in record.items() if k != "messages"}
        out, names = _split_last(record["messages"], "messages")
        return {**rest, **out}, names, "messages"
    comps = record.get("completions")
    if (
        isinstance(comps, list)
        and "responses" not in record
        and any(isinstance(c, dict) and "response" in c for c in comps)
    ):
        return _ultrafeedback(record)
    return record, {}, "standard"
