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


def test_top_level_api_forwards_to_the_trainer(monkeypatch):
    import preftune
    import preftune.train.api as api

    seen = []
    monkeypatch.setattr(api, "train", lambda config: seen.append(config) or "result")
    assert preftune.train("cfg") == "result" and seen == ["cfg"]
    # the package stays a package: its submodules import as usual
    assert preftune.train.api is api
    assert preftune.losses.get("dpo").name == "dpo"
    assert preftune.sequence_logps.__module__ == "preftune.models.logprobs"
