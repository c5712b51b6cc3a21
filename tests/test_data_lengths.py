"""Length limits: max_length (default 1024), max_completion_length, truncate-or-drop, and the check
against the model's position limit (a warning, or an error naming the row with no max_length)."""

from __future__ import annotations

import logging

import pytest
from transformers import AutoTokenizer

import preftune.data.validate as data_validate
from preftune.cli import main
from preftune.config import TrainConfig
from preftune.data.char_tokenizer import build_char_tokenizer
from preftune.data.pipeline import prepare_examples
from preftune.data.tokenize import Truncation, truncate
from preftune.errors import ConfigError, DataError
from preftune.models.tiny import save_tiny_model
from test_train_fixtures import ALPHABET, pair_rows, write_jsonl

EOS = 2


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("plain")
    build_char_tokenizer().save_pretrained(d)
    return AutoTokenizer.from_pretrained(d)


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def prep(rows, tok, tmp_path, **kw):
    return prepare_examples(rows, tokenizer=tok, cache_dir=tmp_path / "cache", **kw)


def test_defaults_match_trl_and_zero_means_no_limit(tok, tmp_path):
    c = TrainConfig()
    assert (c.max_length, c.max_completion_length, c.truncation) == (1024, None, "truncate")
    row = [{"prompt": "ab", "chosen": "1234567", "rejected": "1"}]
    assert prep(row, tok, tmp_path, max_length=0).examples[0].response_ids[0] == ids(tok, "1234567") + [EOS]


def test_max_completion_length_keeps_each_response_start(tok, tmp_path):
    rows = [
        {"prompt": "ab", "chosen": "123456", "rejected": "1"},
        {"prompt": "ab", "chosen": "1", "rejected": "2"},
    ]
    out = prep(rows, tok, tmp_path, max_completion_length=3)
    a, b = out.examples
    assert a.prompt_ids == ids(tok, "ab")
    assert a.response_ids == [ids(tok, "123"), ids(tok, "1") + [EOS]]
    assert b.response_ids == [ids(tok, "1") + [EOS], ids(tok, "2") + [EOS]]
    s = out.summary
    assert (s["truncated"], s["truncated_prompt"], s["truncated_response"], s["dropped"]) == (1, 0, 1, 0)
    out = prep(rows, tok, tmp_path, max_completion_length=3, truncation="drop")
    assert [e.source_row for e in out.examples] == [2]
    assert out.summary["reasons"] == {"longer than max_completion_length": 1}


def test_truncate_keeps_prompt_end_and_response_start_with_bos():
    # 10-token prompt with BOS 1, max_length 8: the prompt keeps BOS + its last 3 tokens (8 // 2 = 4),
    # the responses their first 8 - 4 = 4 tokens.
    prompt = [1, *range(10, 19)]
    responses = [[20, 21, 22, 23, 24, 2], [30, 2]]
    out = truncate(prompt, responses, Truncation(max_length=8), bos=1)
    assert out == ([1, 16, 17, 18], [[20, 21, 22, 23], [30, 2]], True, True)
    # A prompt that fits leaves the rest to the responses (TRL's keep_start for the completion).
    assert truncate([1, 10], responses, Truncation(max_length=5), bos=1) == (
        [1, 10],
        [[20, 21, 22], [30, 2]],
        False,
        True,
    )
    assert truncate(prompt, responses, Truncation(max_length=8, mode="drop"), bos=1) is None
    assert truncate([1, 10], [[30, 2]], Truncation(max_length=8, mode="drop")) == (
        [1, 10],
        [[30, 2]],
        False,
        False,
    )
    with pytest.raises(ConfigError, match="truncation='cut'"):
        Truncation(mode="cut")


def test_data_check_reports_truncated_and_dropped_counts(tok, tmp_path):
    rows = [
        {"prompt": "abcdefgh", "chosen": "x", "rejected": "y"},
        {"prompt": "ab", "chosen": "1", "rejected": "2"},
    ]
    res = data_validate.check_data(rows, tokenizer=tok, max_length=6)
    assert (res.summary["truncated"], res.summary["dropped_by_length"]) == (1, 0)
    res = data_validate.check_data(rows, tokenizer=tok, max_length=6, truncation="drop")
    assert (res.summary["truncated"], res.summary["dropped_by_length"]) == (0, 1)
    assert "with these limits: 0 rows truncated, 1 dropped" in data_validate.format_check(res)


def test_sequences_over_the_model_positions_are_a_warning(tok, tmp_path, caplog):
    rows = [
        {"prompt": "ab", "chosen": "1", "rejected": "2"},
        {"prompt": "abcdef", "chosen": "123456", "rejected": "1"},  # 6 + 7 = 13 tokens
        {"prompt": "abcdef", "chosen": "1", "rejected": "1234"},  # 6 + 5 = 11 tokens
    ]
    with caplog.at_level(logging.WARNING, logger="preftune.data"):
        out = prep(rows, tok, tmp_path, max_length=64, max_positions=10)
    assert len(out.examples) == 3
    assert (
        "<records>: 2 sequence(s) longer than the model's max_position_embeddings=10 "
        "(longest: 13 tokens, row 2) — lower max_length to 10" in caplog.text
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="preftune.data"):  # said again on a cache hit
        assert prep(rows, tok, tmp_path, max_length=64, max_positions=10).summary["cache"] == "hit"
    assert "longest: 13 tokens, row 2" in caplog.text


def test_giant_row_without_max_length_names_row_and_option(tok, tmp_path, monkeypatch):
    rows = [
        {"prompt": "ab", "chosen": "1", "rejected": "2"},
        {"prompt": "abcdef", "chosen": "123456", "rejected": "1"},
    ]
    with pytest.raises(DataError) as err:
        prep(rows, tok, tmp_path, max_length=None, max_positions=10)
    assert str(err.value) == (
        "<records>:2: prompt + response has 13 tokens, over the model's max_position_embeddings=10, "
        "and max_length is unset — set max_length (CLI --max-length 10) to truncate long rows, with "
        "truncation='drop' to skip them instead"
    )
    monkeypatch.setattr(data_validate, "GIANT_ROW", 12)  # the model's limit unknown: a fixed sane limit
    with pytest.raises(DataError, match=r"<records>:2: prompt \+ response has 13 tokens, over 12 tokens"):
        prep(rows, tok, tmp_path, max_length=0)
    assert len(prep(rows, tok, tmp_path, max_length=13).examples) == 2


def test_model_max_positions_read_from_the_model_config(tmp_path):
    from preftune.train.setup import model_max_positions

    folder = save_tiny_model(
        "llama", tmp_path / "m", vocab_size=64, config_overrides={"max_position_embeddings": 77}
    )
    assert model_max_positions(str(folder)) == 77
    gpt2 = save_tiny_model("gpt2", tmp_path / "g", vocab_size=64, config_overrides={"n_positions": 33})
    assert model_max_positions(str(gpt2)) == 33
    assert model_max_positions(str(tmp_path / "nothing")) is None


def test_training_reads_the_model_limit(tmp_path, caplog, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tok = build_char_tokenizer(ALPHABET)
    save_tiny_model(
        "llama",
        tmp_path / "m",
        vocab_size=48,
        hidden_size=16,
        num_layers=1,
        tokenizer=tok,
        config_overrides={"max_position_embeddings": 8},
    )
    write_jsonl(tmp_path / "p.jsonl", pair_rows(4))  # 8-9 tokens per sequence
    argv = ["train", "dpo", "--model", "m", "--data", "p.jsonl", "--max-steps", "1", "--batch-size", "4"]
    argv += ["--no-progress", "--cache-dir", "c"]
    with caplog.at_level(logging.WARNING, logger="preftune.data"):
        assert main([*argv, "--out", "r"]) == 0
    assert "longer than the model's max_position_embeddings=8 (longest: 9 tokens" in caplog.text
    assert main([*argv, "--out", "r0", "--max-length", "0"]) == 2  # no limit: the row is an error
