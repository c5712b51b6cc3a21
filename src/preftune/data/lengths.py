"""Length limits in tokens and what happens to a row over one.

`Truncation` holds the limits; the counts of cut and dropped rows go to the summary. With
`mode="truncate"` (the default, which keeps every row):
- each response keeps its first `max_completion_length` tokens (right truncation);
- the prompt keeps its last `max_prompt_length` tokens (left truncation; a leading BOS is kept);
- a prompt that leaves no room for a response within `max_length` keeps its last `max_length // 2`
  tokens (the 512-of-1024 split of TRL's former DPO defaults);
- each response keeps its first `max_length − len(prompt)` tokens (right truncation).
So the prompt's end and the responses' start are kept, as TRL's `truncation_mode="keep_end"` did for
the prompt. With `mode="drop"` a row that any limit would cut is dropped instead, and counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from preftune.data.rows import Problem
from preftune.errors import ConfigError

TRUNCATION_MODES = ("truncate", "drop")


@dataclass(frozen=True)
class Truncation:
    """Length limits in tokens (None: no limit) and what to do with a row over one of them."""

    max_length: int | None = None
    max_prompt_length: int | None = None
    max_completion_length: int | None = None
    mode: str = "truncate"

    def __post_init__(self) -> None:
        for name in ("max_length", "max_prompt_length", "max_completion_length"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name}={v} must be a positive number of tokens")
        if self.max_length and self.max_prompt_length and self.max_prompt_length >= self.max_length:
            raise ConfigError(
                f"max_prompt_length={self.max_prompt_length} must be below max_length="
                f"{self.max_length}, to leave room for the response"
            )
        if self.mode not in TRUNCATION_MODES:
            raise ConfigError(f"truncation='{self.mode}' — use 'truncate' (keep the row, cut it) or 'drop'")

    def fingerprint(self) -> dict[str, Any]:
        return {
            "max_length": self.max_length,
            "max_prompt_length": self.max_prompt_length,
            "max_completion_length": self.max_completion_length,
            "truncation": self.mode,
        }


def _keep_end(prompt: list[int], keep: int, bos: int | None) -> list[int]:
    """The last `keep` tokens of `prompt`, with a leading BOS kept in front."""
    if bos is not None and prompt[:1] == [bos] and keep > 1:
        return [bos] + prompt[len(prompt) - keep + 1 :]
    return prompt[len(prompt) - keep :]


def over_limit(prompt: list[int], responses: list[list[int]], trunc: Truncation) -> str | None:
    """Which limit the row exceeds (as the message naming it), or None when it fits all of them."""
    longest = max(len(r) for r in responses)
    if trunc.max_prompt_length is not None and len(prompt) > trunc.max_prompt_length:
        return f"prompt has {len(prompt)} tokens, over max_prompt_length={trunc.max_prompt_length}"
    if trunc.max_completion_length is not None and longest > trunc.max_completion_length:
        return f"a response has {longest} tokens, over max_completion_length={trunc.max_completion_length}"
    if trunc.max_length is not None and len(prompt) + longest > trunc.max_length:
        return f"prompt + response has {len(prompt) + longest} tokens, over max_length={trunc.max_length}"
    return None


def truncate(
    prompt: list[int], responses: list[list[int]], trunc: Truncation, bos: int | None = None
) -> tuple[list[int], list[list[int]], bool, bool] | None:
    """Apply the truncation rules (module docstring) to one example; None when the row cannot fit
    max_length at all (max_length 1), or in mode "drop" when it exceeds a limit.

    Returns (prompt, responses, prompt_was_truncated, a_response_was_truncated).
    """
    if trunc.mode == "drop":
        return None if over_limit(prompt, responses, trunc) else (prompt, responses, False, False)
    cut_p = cut_r = False
    if trunc.max_completion_length is not None and any(
        len(r) > trunc.max_completion_length for r in responses
    ):
        responses = [r[: trunc.max_completion_length] for r in responses]
        cut_r = True
    if trunc.max_prompt_length is not None and len(prompt) > trunc.max_prompt_length:
        prompt, cut_p = _keep_end(prompt, trunc.max_prompt_length, bos), True
    if trunc.max_length is not None:
        if len(prompt) >= trunc.max_length and trunc.max_length > 1:
            prompt, cut_p = _keep_end(prompt, trunc.max_length // 2, bos), True
        room = trunc.max_length - len(prompt)
        if room < 1:
            return None
        if any(len(r) > room for r in responses):
            responses = [r[:room] for r in responses]
            cut_r = True
    return prompt, responses, cut_p, cut_r


def length_problem(
    row: int, prompt: list[int], responses: list[list[int]], trunc: Truncation, path: str
) -> Problem:
    if trunc.mode == "drop":
        what = over_limit(prompt, responses, trunc) or ""
        return Problem(
            what,
            row=row,
            field="prompt" if what.startswith("prompt has") else "response",
            path=path,
            reason=f"longer than {what.split(', over ')[-1].split('=')[0]}",
            fix="raise the limit, or keep the row cut to the limit with truncation='truncate'",
        )
    return Problem(
        f"max_length={trunc.max_length} leaves no room for a prompt and a response",
        row=row,
        field="prompt",
        path=path,
        reason="prompt does not fit max_length",
        fix="raise max_length",
    )
