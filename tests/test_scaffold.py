from preftune.errors import DataError, format_problem


def test_problem_message_names_path_row_field_and_fix():
    err = DataError("must be a string", path="d.jsonl", row=3, field="chosen", fix="quote the text")
    assert str(err) == "d.jsonl:3: field 'chosen': must be a string — quote the text"
    assert format_problem("empty file", path="d.jsonl") == "d.jsonl: empty file"


def test_char_tokenizer_round_trips_newlines_and_reloads(tmp_path):
    from transformers import AutoTokenizer

    from preftune.data.char_tokenizer import build_char_tokenizer

    build_char_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "Human: hi\n\nAssistant: 12 + 3\t= 15"
    ids = tok(text).input_ids
    assert len(ids) == len(text)  # one token per character, newlines included
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
