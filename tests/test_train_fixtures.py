"""Shared helpers of the training tests: a tiny model, a char tokenizer and small data files.

Everything is built locally (no download) and loaded back through the real `from_pretrained` path.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from preftune.data.char_tokenizer import build_char_tokenizer

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 =+?:."


def tiny_model(folder: Path, *, arch: str = "llama", seed: int = 0, hidden_size: int = 32) -> Path:
    """A 2-layer `arch` model with a 48-token char vocabulary, saved with its tokenizer."""
    from preftune.models.tiny import save_tiny_model

    if (folder / "config.json").is_file():
        return folder
    tok = build_char_tokenizer(ALPHABET)
    return save_tiny_model(
        arch, folder, vocab_size=48, hidden_size=hidden_size, num_layers=2, tokenizer=tok, seed=seed
    )


def pair_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Learnable pairs: the chosen answer is the sum, the rejected one a wrong digit string."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        wrong = (a + b + rng.randint(1, 5)) % 19
        rows.append({"prompt": f"{a}+{b}=", "chosen": f"{a + b}.", "rejected": f"{wrong}x."})
    return rows


def unpaired_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rows = []
    for i, r in enumerate(pair_rows(n, seed)):
        good = i % 2 == 0
        rows.append(
            {"prompt": r["prompt"], "completion": r["chosen"] if good else r["rejected"], "label": good}
        )
    return rows


def ranked_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rows = []
    for r in pair_rows(n, seed):
        rows.append(
            {
                "prompt": r["prompt"],
                "responses": [r["chosen"], r["rejected"] + "a", r["rejected"]],
                "scores": [3.0, 2.0, 1.0],
            }
        )
    return rows


def write_jsonl(path: Path, rows: Sequence[object]) -> Path:
    """`rows` as a JSONL file (one JSON value a line); returns `path`."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def one_line(err: str) -> str:
    """The one `preftune: error:` line of a CLI's stderr, without its prefix (and no traceback)."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("preftune: error:")]
    assert len(lines) == 1, err
    return lines[0].removeprefix("preftune: error: ")


def stopped_before_final(signal_name: str, step: int, out: Path) -> tuple[str, str]:
    """The last stderr line of a run stopped by `signal_name` after its last step `step` (of `step`)
    and before final/ was written, and the resume command it prints."""
    command = f"preftune train --config {out / 'config.yaml'} --resume"
    return (
        f"preftune: error: stopped by {signal_name} after training finished (step {step} of {step}), while "
        f"the run wrote its results: final/ was not written; the newest checkpoint is "
        f"{out / 'checkpoints' / f'step-{step}'} — write final/ and summary.json from it with: {command}"
    ), command


def assert_resume_refuses_data(
    main: Callable[[list[str]], int],
    capsys: Any,
    argv: list[str],
    out: Path,
    what: str,
    path: Path,
    checkpoint: Path,
) -> None:
    """`argv --resume` after `path` was rewritten: exit 2, one line naming the file (`what`: "data",
    "prompts") and `checkpoint`, and nothing under `out` written or removed."""
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"resume: {what} '{path}' now gives other examples than the run was trained on"), (
        line
    )
    assert str(checkpoint) in line and "put the data back as it was" in line, line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_pair_rows_are_learnable_and_seeded() -> None:
    rows = pair_rows(20, seed=3)
    assert rows == pair_rows(20, seed=3)
    for r in rows:
        a, b = (int(c) for c in r["prompt"][:-1].split("+"))
        assert r["chosen"] == f"{a + b}."
        assert r["rejected"] != r["chosen"]
