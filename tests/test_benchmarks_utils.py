"""The benchmark helpers that make the TRL comparison fair (no TRL needed here).

The token-level control rests on the word tokenizer: one token per word, however the text is split
between prompt and response; the FLOP accounting rests on `param_counts` matching the real model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_utils as bu  # noqa: E402

TINY = bu.ModelSpec(
    vocab_size=200, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48
)


def test_word_tokenizer_is_one_token_per_word_and_split_invariant() -> None:
    tok = bu.build_word_tokenizer(200)
    assert len(tok) == 200
    assert tok("w4 w199")["input_ids"] == [4, 199]
    rows = bu.synth_pairs(bu.Shape("s", (5, 9), (2, 4)), 6, seed=3, vocab_size=200)
    for row in rows:
        p, c, r = row["_lengths"]
        prompt = tok(row["prompt"])["input_ids"]
        chosen = tok(row["chosen"])["input_ids"]
        assert (len(prompt), len(chosen), len(tok(row["rejected"])["input_ids"])) == (p, c, r)
        # TRL tokenizes prompt + completion (+ EOS text) together; preftune tokenizes them apart.
        joint = tok(row["prompt"] + row["chosen"] + tok.eos_token)["input_ids"]
        assert joint == prompt + chosen + [tok.eos_token_id]
        assert 5 <= p <= 9 and 2 <= c <= 4 and 2 <= r <= 4


def test_param_counts_match_the_built_model(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    bu.save_model(TINY, tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    counts = bu.param_counts(TINY)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    # untied: N excludes only the input embedding (200 × 32)
    assert counts["total"] - counts["non_embedding"] == 200 * 32


def test_default_models_are_the_documented_sizes() -> None:
    assert bu.param_counts(bu.MODELS["45m"])["total"] == 45_421_056
    assert 19e6 < bu.param_counts(bu.MODELS["20m"])["total"] < 21e6


def test_scaled_shape_and_steps_rate() -> None:
    assert bu.PROMPT_HEAVY.scaled(0.25) == bu.Shape("prompt_heavy", (120, 136), (16, 32))
    # stamps (wall, cpu): first step is warm-up; intervals 2 s and 4 s wall, 1 s and 1 s CPU
    stamps = [[10.0, 5.0], [12.0, 6.0], [16.0, 7.0]]
    assert bu.steps_rate(stamps, skip=1) == (3.0, 1.0, 2)
    with pytest.raises(ValueError, match="at least 2"):
        bu.steps_rate([[1.0, 1.0]], skip=1)


def test_md_table_formats_floats() -> None:
    assert bu.md_table(["a", "b"], [[1.23456, "x"]]) == "| a | b |\n|---|---|\n| 1.23 | x |"


def test_quick_results_never_rewrite_tracked_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bu, "RESULTS_DIR", tmp_path / "results")
    jp, mp = bu.save_results("x", {"a": 1}, "| a |", quick=True)
    assert (jp, mp) == (tmp_path / "results" / "tmp" / "x.json", tmp_path / "results" / "tmp" / "x.md")
    assert not (tmp_path / "results" / "x.json").exists()
    jp, _ = bu.save_results("x", {"a": 2}, "| a |")
    assert jp == tmp_path / "results" / "x.json" and '"a": 2' in jp.read_text()
    ignored = (Path(__file__).resolve().parents[1] / ".gitignore").read_text().split()
    assert "benchmarks/results/tmp/" in ignored
