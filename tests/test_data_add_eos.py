"""`add_eos`: responses cut mid-answer (step-level or first-error pairs) can go without EOS."""

from preftune.data.char_tokenizer import build_char_tokenizer
from preftune.data.pipeline import prepare_examples


def test_add_eos_false_keeps_responses_as_written_and_changes_the_fingerprint(tmp_path):
    tok = build_char_tokenizer()
    rows = [{"prompt": "1+2=", "chosen": "3", "rejected": "4"}]
    with_eos = prepare_examples(rows, tokenizer=tok, cache_dir=tmp_path)
    without = prepare_examples(rows, tokenizer=tok, cache_dir=tmp_path, add_eos=False)
    eos = tok.eos_token_id
    three, four = tok.convert_tokens_to_ids(["3", "4"])
    assert with_eos.examples[0].response_ids == [[three, eos], [four, eos]]
    assert without.examples[0].response_ids == [[three], [four]]
    assert with_eos.examples[0].prompt_ids == without.examples[0].prompt_ids
    assert with_eos.fingerprint != without.fingerprint  # no stale cache hit across the option


def test_a_tokenizer_without_eos_needs_one_only_when_eos_is_added(tmp_path):
    import pytest

    from preftune.errors import ConfigError

    tok = build_char_tokenizer()
    tok.eos_token = None
    rows = [{"prompt": "1+2=", "chosen": "3", "rejected": "4"}]
    three, four = tok.convert_tokens_to_ids(["3", "4"])
    without = prepare_examples(rows, tokenizer=tok, cache_dir=tmp_path, add_eos=False)
    assert without.examples[0].response_ids == [[three], [four]]
    with pytest.raises(ConfigError, match=r"has no eos_token.*or train without EOS: --no-add-eos \(YAML"):
        prepare_examples(rows, tokenizer=tok, cache_dir=tmp_path)
