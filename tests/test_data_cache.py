"""The tokenized-data cache: hit on a second run, invalidated by any change, corrupt files rebuilt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import preftune.data.pipeline as pipeline
from preftune.data.char_tokenizer import CHAT_TEMPLATE
from preftune.data.pipeline import prepare_examples
from test_train_fixtures import write_jsonl

ROWS = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(20)]


def test_second_run_is_a_hit_that_skips_reading_and_tokenizing(tmp_path, tok_dir, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    first = prepare_examples(data, tokenizer=tok_dir, cache_dir=tmp_path / "c", max_length=64)
    assert first.summary["cache"] == "miss" and len(first.examples) == 20

    def fail(*a, **k):
        raise AssertionError("a cache hit must not read or tokenize the data")

    monkeypatch.setattr(pipeline, "tokenize_records", fail)
    monkeypatch.setattr(pipeline, "read_source", fail)
    second = prepare_examples(data, tokenizer=tok_dir, cache_dir=tmp_path / "c", max_length=64)
    assert second.summary["cache"] == "hit"
    assert second.examples == first.examples and second.fingerprint == first.fingerprint
    assert second.summary["rows"] == 20 and second.summary["tokens"] == first.summary["tokens"]
    assert [p.name for p in (tmp_path / "c").iterdir()] == [f"{first.fingerprint}.ptok"]  # no temp files left


def test_any_change_gives_a_new_fingerprint(tmp_path, tok_dir):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    kw = {"tokenizer": tok_dir, "cache_dir": tmp_path / "c"}
    base = prepare_examples(data, **kw).fingerprint
    other_tok = AutoTokenizer.from_pretrained(tok_dir)
    other_tok.chat_template = CHAT_TEMPLATE.replace("<|", "<<")
    variants = {
        "max_length": prepare_examples(data, max_length=50, **kw),
        "max_prompt_length": prepare_examples(data, max_prompt_length=3, **kw),
        "max_completion_length": prepare_examples(data, max_completion_length=2, **kw),
        "truncation": prepare_examples(data, truncation="drop", **kw),
        "split": prepare_examples(data, split="train[:50%]", **kw),
        "template": prepare_examples(data, tokenizer=other_tok, cache_dir=tmp_path / "c"),
        "use_chat_template": prepare_examples(data, use_chat_template=True, **kw),
    }
    write_jsonl(data, ROWS[:-1] + [{"prompt": "x", "chosen": "y", "rejected": "z"}])
    variants["data"] = prepare_examples(data, **kw)
    prints = {name: v.fingerprint for name, v in variants.items()}
    assert all(v.summary["cache"] == "miss" for v in variants.values()), prints
    assert len(set(prints.values()) | {base}) == len(prints) + 1
    assert (
        variants["data"].examples[-1].prompt_ids == AutoTokenizer.from_pretrained(tok_dir)("x")["input_ids"]
    )


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "garbage"])
def test_corrupt_cache_is_detected_and_rebuilt(tmp_path, tok_dir, damage):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    first = prepare_examples(data, tokenizer=tok_dir, cache_dir=tmp_path / "c")
    path = Path(first.summary["cache_file"])
    raw = bytearray(path.read_bytes())
    if damage == "flip_byte":
        raw[-40] ^= 0xFF  # inside the token ids
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw = bytearray(b"not a cache file")
    path.write_bytes(bytes(raw))
    again = prepare_examples(data, tokenizer=tok_dir, cache_dir=tmp_path / "c")
    assert again.summary["cache"] == "rebuilt" and again.examples == first.examples
    third = prepare_examples(data, tokenizer=tok_dir, cache_dir=tmp_path / "c")
    assert third.summary["cache"] == "hit" and third.examples == first.examples


def test_drop_summary_is_kept_in_the_cache(tmp_path, tok_dir):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS + [{"prompt": "p", "chosen": "a", "rejected": "a"}])
    kw = {"tokenizer": tok_dir, "cache_dir": tmp_path / "c", "on_invalid": "drop"}
    first = prepare_examples(data, **kw)
    second = prepare_examples(data, **kw)
    assert second.summary["cache"] == "hit"
    for s in (first.summary, second.summary):
        assert (s["rows"], s["examples"], s["dropped"]) == (21, 20, 1)
        assert s["reasons"] == {"chosen identical to rejected": 1}


def test_unwritable_cache_dir_does_not_stop_preparation(tmp_path, tok_dir):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should go")
    out = prepare_examples(ROWS, tokenizer=tok_dir, cache_dir=blocker / "c")
    assert out.summary["cache"].startswith("not written") and len(out.examples) == 20


def test_dropped_rows_are_announced_on_every_run(tmp_path, tok_dir, caplog):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS + [{"prompt": "p", "chosen": "", "rejected": "a"}])
    for expected in ("miss", "hit"):
        caplog.clear()
        with caplog.at_level("WARNING", logger="preftune.data"):
            out = prepare_examples(data, tokenizer=tok_dir, cache_dir=tmp_path / "c", on_invalid="drop")
        assert out.summary["cache"] == expected
        assert f"{data}: 21 rows, kind pairwise → 20 examples" in caplog.text
        assert "dropped 1 row (chosen: empty text: 1)" in caplog.text


def test_cli_prepare_fills_the_cache_that_training_then_hits(tmp_path, tok_dir, capsys):
    from preftune.cli import main

    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    args = [
        "data",
        "prepare",
        str(data),
        "--tokenizer",
        str(tok_dir),
        "--cache-dir",
        str(tmp_path / "c"),
        "--max-length",
        "9",
    ]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{data}: 20 rows, kind pairwise → 20 examples") and "cache miss" in lines[0]
    fingerprint = json.loads(lines[-1])["fingerprint"]
    again = prepare_examples(data, tokenizer=tok_dir, cache_dir=tmp_path / "c", max_length=9)
    assert again.summary["cache"] == "hit" and again.fingerprint == fingerprint
    assert main(["data", "prepare", str(data)]) == 2  # no tokenizer: a ConfigError, exit 2
