from preftune.errors import DataError, format_problem


def test_problem_message_names_path_row_field_and_fix():
    err = DataError("must be a string", path="d.jsonl", row=3, field="chosen", fix="quote the text")
    assert str(err) == "d.jsonl:3: field 'chosen': must be a string — quote the text"
    assert format_problem("empty file", path="d.jsonl") == "d.jsonl: empty file"
