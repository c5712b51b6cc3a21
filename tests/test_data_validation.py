"""`preftune data check` and `schema.validate`: each format is accepted, each listed problem is
reported with its row and field, and the exit status says which happened."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from preftune.cli import main
from preftune.data.validate import check_data
from test_train_fixtures import write_jsonl


def msgs(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in pairs]


GOOD = {"prompt": "2+2=", "chosen": "4", "rejected": "5"}


def only_problem(path: Path, rows: list[object], **kw: object) -> tuple[int | None, str | None, str]:
    """Write GOOD then `rows`; check; return (row, field, rendered) of the single problem."""
    res = check_data(write_jsonl(path, [GOOD, *rows]), **kw)  # type: ignore[arg-type]
    assert len(res.problems) == 1, [p.render() for p in res.problems]
    p = res.problems[0]
    return p.row, p.field, p.render()


# --- every listed rejection, one test each ------------------------------------------------------


def test_missing_field(tmp_path):
    row, field, text = only_problem(tmp_path / "d.jsonl", [{"prompt": "x", "chosen": "a"}])
    assert (row, field) == (2, "rejected")
    assert text.startswith(f"{tmp_path / 'd.jsonl'}:2: field 'rejected': missing — add 'rejected'")


def test_misspelled_field_is_named_not_silently_ignored(tmp_path):
    """`promt`: without a prompt a pair's prompt would be the shared prefix of its responses, so the
    row is refused naming the column and the field it likely means; extra columns that are no near
    miss of a field the kind reads (`source`, `score` on pairs) and mapped columns stay allowed."""

    def typo(name: str, rows: list[dict[str, object]], first: object = GOOD, **kw: object) -> str:
        res = check_data(write_jsonl(tmp_path / name, [first, *rows]), **kw)  # type: ignore[arg-type]
        found = [p for p in res.problems if "unknown column" in p.message]
        assert len(found) == 1 and found[0].row == 2 and res.summary["valid"] == 1, res.problems
        return found[0].render()

    shared = {  # a shared prefix: trained with it as the prompt without the check
        "promt": "Human: 7+1?",
        "chosen": "Human: 7+1? Assistant: 8",
        "rejected": "Human: 7+1? Assistant: 9",
    }
    text = typo("d.jsonl", [shared])
    assert "field 'promt': unknown column — did you mean 'prompt'? (this row has no 'prompt')" in text
    assert text.endswith("--columns prompt=promt")
    assert "did you mean 'rejected'" in typo("e.jsonl", [{"prompt": "x", "chosen": "a", "rejeted": "b"}])
    assert "did you mean 'label'" in typo(
        "g.jsonl",
        [{"prompt": "x", "completion": "a", "lable": True}],
        {"prompt": "x", "completion": "b", "label": False},
    )
    assert "did you mean 'chosen'" in typo("i.jsonl", [{"prompt": "x", "Chosen": "a", "rejected": "b"}])
    extra = {**GOOD, "source": "web", "score": 3, "id": 7, "chosen_rating": 5, "rejected_score": 1}
    implicit = {
        "prompt_id": "p7",
        "chosen": "Human: 7+1? Assistant: 8",
        "rejected": "Human: 7+1? Assistant: 9",
    }
    assert not check_data(write_jsonl(tmp_path / "j.jsonl", [GOOD, implicit])).problems
    assert not check_data(write_jsonl(tmp_path / "f.jsonl", [GOOD, extra])).problems
    mapped = [{"promt": "7+1=", "chosen": "8", "rejected": "9"}]
    assert not check_data(write_jsonl(tmp_path / "h.jsonl", mapped), columns={"prompt": "promt"}).problems


def test_wrong_type(tmp_path):
    row, field, text = only_problem(tmp_path / "d.jsonl", [{"prompt": "x", "chosen": 7, "rejected": "b"}])
    assert (row, field) == (2, "chosen") and "is an int, expected text or a list of messages" in text


def test_empty_text(tmp_path):
    row, field, _ = only_problem(tmp_path / "d.jsonl", [{"prompt": "x", "chosen": "  ", "rejected": "b"}])
    assert (row, field) == (2, "chosen")


def test_chosen_identical_to_rejected(tmp_path):
    row, field, text = only_problem(
        tmp_path / "d.jsonl", [{"prompt": "x", "chosen": "same", "rejected": "same"}]
    )
    assert (row, field) == (2, "rejected") and "identical to chosen" in text


def test_malformed_json_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(GOOD) + "\n" + '{"prompt": "x", "chosen": \n' + json.dumps(GOOD) + "\n")
    res = check_data(p)
    assert [(q.row, q.field) for q in res.problems] == [(2, None)]
    assert res.problems[0].render().startswith(f"{p}:2: malformed JSON")
    assert res.summary["valid"] == 2


def test_non_utf8_bytes(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(json.dumps(GOOD).encode() + b'\n{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    res = check_data(p)
    assert [q.row for q in res.problems] == [2] and "not valid UTF-8 (0xe9" in res.problems[0].render()


def test_empty_file(tmp_path, capsys):
    p = tmp_path / "d.jsonl"
    p.write_text("\n  \n")
    res = check_data(p)
    assert [q.render() for q in res.problems] == [f"{p}: file is empty — write at least one record"]
    assert main(["data", "check", str(p)]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == f"{p}: 1 problem(s) — fix the file"


def test_line_not_an_object(tmp_path):
    row, field, text = only_problem(tmp_path / "d.jsonl", [["prompt", "chosen"]])
    assert (row, field) == (2, None) and "line is a JSON list, not an object" in text


def test_unknown_message_role(tmp_path):
    conv = {
        "chosen": msgs(("human", "hi"), ("assistant", "a")),
        "rejected": msgs(("user", "hi"), ("assistant", "b")),
    }
    row, field, text = only_problem(tmp_path / "d.jsonl", [conv])
    assert (row, field) == (2, "chosen[0].role") and "unknown role 'human'" in text


def test_missing_message_role(tmp_path):
    bad = [{"content": "hi"}, {"role": "assistant", "content": "a"}]
    row, field, _ = only_problem(tmp_path / "d.jsonl", [{"prompt": "q", "chosen": bad, "rejected": "b"}])
    assert (row, field) == (2, "chosen[0].role")


def test_last_message_not_assistant(tmp_path):
    conv = {
        "prompt": msgs(("user", "hi")),
        "chosen": msgs(("assistant", "a")),
        "rejected": msgs(("assistant", "b"), ("user", "more?")),
    }
    row, field, text = only_problem(tmp_path / "d.jsonl", [conv])
    assert (row, field) == (2, "rejected[1].role") and "last message is from 'user', not 'assistant'" in text


def test_implicit_prompt_without_common_prefix(tmp_path):
    row, field, text = only_problem(tmp_path / "d.jsonl", [{"chosen": "Yes indeed", "rejected": "No way"}])
    assert (row, field) == (2, "prompt") and "share no prefix" in text


def test_implicit_message_prompt_without_common_prefix(tmp_path):
    conv = {
        "chosen": msgs(("user", "hi"), ("assistant", "a")),
        "rejected": msgs(("user", "yo"), ("assistant", "b")),
    }
    row, field, _ = only_problem(tmp_path / "d.jsonl", [conv])
    assert (row, field) == (2, "prompt")


def test_non_boolean_label(tmp_path):
    rows = [
        {"prompt": "p", "completion": "c", "label": True},
        {"prompt": "p", "completion": "c", "label": "yes"},
        {"prompt": "p", "completion": "c", "label": 1},
    ]
    res = check_data(write_jsonl(tmp_path / "u.jsonl", rows))
    assert res.summary["kind"] == "unpaired"
    assert [(q.row, q.field) for q in res.problems] == [(2, "label"), (3, "label")]
    assert "'yes' is not a boolean — write true (desirable) or false" in res.problems[0].render()


def test_scores_wrong_length(tmp_path):
    rows = [
        {"prompt": "p", "responses": ["a", "b"], "scores": [1, 0]},
        {"prompt": "p", "responses": ["a", "b", "c"], "scores": [1, 0]},
    ]
    res = check_data(write_jsonl(tmp_path / "r.jsonl", rows))
    assert [(q.row, q.field) for q in res.problems] == [(2, "scores")]
    assert "has 2 values for 3 responses" in res.problems[0].render()


def test_scores_not_finite(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text(
        '{"prompt": "p", "responses": ["a", "b"], "scores": [1.0, NaN]}\n'
        '{"prompt": "p", "responses": ["a", "b"], "scores": [Infinity, 0]}\n'
    )
    res = check_data(p, kind="ranked")
    assert [(q.row, q.field) for q in res.problems] == [(1, "scores[1]"), (2, "scores[0]")]


def test_fewer_than_two_responses(tmp_path):
    res = check_data(write_jsonl(tmp_path / "r.jsonl", [{"prompt": "p", "responses": ["a"], "scores": [1]}]))
    assert [(q.row, q.field) for q in res.problems] == [(1, "responses")]
    assert "ranking needs at least 2" in res.problems[0].render()


def test_soft_label_and_margins_checked(tmp_path):
    rows = [
        {**GOOD, "label": 1.5},
        {**GOOD, "margins": [[0.1, 0.2], [0.3]]},
        {**GOOD, "margins": [[0.1], [math.inf]]},
    ]
    p = tmp_path / "d.jsonl"
    res = check_data(write_jsonl(p, rows))  # json writes inf as Infinity, which json reads back
    assert [(q.row, q.field) for q in res.problems] == [(1, "label"), (2, "margins[1]"), (3, "margins[1][0]")]


def test_all_problems_listed_and_capped_in_cli(tmp_path, capsys):
    rows = [{"prompt": "x", "chosen": "", "rejected": ""} for _ in range(30)]
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    assert len(check_data(p).problems) == 60
    assert main(["data", "check", str(p)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len([line for line in out if "field 'chosen'" in line or "field 'rejected'" in line]) == 20
    assert "... and 40 more problems (60 in total)" in out
    assert out[-1].startswith(f"{p}: 60 problem(s) in 30 of 30 rows")


def test_undetectable_kind(tmp_path):
    res = check_data(write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}]))
    assert len(res.problems) == 1 and "pass --kind" in res.problems[0].render()


# --- every accepted format ----------------------------------------------------------------------

PAIRS = [
    {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
    {"prompt": "1+2=", "chosen": "3", "rejected": "4"},
]


def test_json_array_parquet_csv_and_saved_dataset_are_read_alike(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d.json").write_text(json.dumps(PAIRS))
    pq.write_table(pa.Table.from_pylist(PAIRS), tmp_path / "d.parquet")
    (tmp_path / "d.csv").write_text("prompt,chosen,rejected\n2+2=,4,5\n1+2=,3,4\n")
    datasets.Dataset.from_list(PAIRS).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(PAIRS[:1]), "test": datasets.Dataset.from_list(PAIRS[1:])}
    ).save_to_disk(str(tmp_path / "dd"))
    for name in ("d.json", "d.parquet", "d.csv", "saved"):
        res = check_data(tmp_path / name)
        assert res.ok and res.summary["valid"] == 2 and res.summary["kind"] == "pairwise", name
    assert check_data(tmp_path / "dd", split="test").summary["valid"] == 1


def test_csv_rows_are_file_lines_and_cells_hold_json(tmp_path):
    p = tmp_path / "r.csv"
    p.write_text('prompt,responses,scores\nq,"[""a"", ""b""]","[2, 1]"\nq,"[""a""]","[2]"\n')
    res = check_data(p)
    assert res.summary["kind"] == "ranked"
    assert [(q.row, q.field) for q in res.problems] == [(3, "responses")]


def test_column_mapping_and_error_names_user_column(tmp_path):
    rows = [{"question": "q", "response_a": "a", "response_b": "b"}, {"question": "q", "response_a": "a"}]
    res = check_data(
        write_jsonl(tmp_path / "d.jsonl", rows),
        columns="prompt=question,chosen=response_a,rejected=response_b",
    )
    assert res.summary["kind"] == "pairwise" and res.summary["valid"] == 1
    assert [(q.row, q.field) for q in res.problems] == [(2, "response_b")]
    assert "missing (mapped from column 'response_b')" in res.problems[0].render()


def test_split_slices_and_single_file_split_name(tmp_path):
    from preftune.errors import ConfigError

    p = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 10)
    assert check_data(p, split="train[:80%]").summary["rows"] == 8
    assert check_data(p, split="train[80%:]").summary["rows"] == 2
    with pytest.raises(ConfigError, match="single file"):
        check_data(p, split="eval")


def test_cli_ok_summary_with_token_percentiles(tmp_path, capsys):
    from preftune.data.char_tokenizer import build_char_tokenizer

    build_char_tokenizer().save_pretrained(tmp_path / "tok")
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "abcd", "chosen": "ab", "rejected": "abcdef"}] * 3)
    assert main(["data", "check", str(p), "--tokenizer", str(tmp_path / "tok")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{p}: OK — 3 rows, kind pairwise (text)"
    # char tokenizer without BOS: prompt 4 tokens; responses 2+EOS and 6+EOS; totals 7 and 11.
    assert out[1].split() == ["tokens", "p50", "p90", "p99", "max"]
    assert out[2].split() == ["prompt", "4", "4", "4", "4"]
    assert out[3].split() == ["response", "3", "7", "7", "7"]
    assert out[4].split() == ["total", "7", "11", "11", "11"]


def test_utf8_bom_and_crlf_lines_are_read(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\r\n" + json.dumps(GOOD).encode() + b"\r\n")
    res = check_data(p)
    assert res.ok and res.summary["valid"] == 2


def test_missing_path_is_named(tmp_path):
    from preftune.errors import DataError

    for missing in (tmp_path / "nope.jsonl", "./nope"):
        with pytest.raises(DataError, match="no such file or folder"):
            check_data(missing)


def test_cli_reports_template_problem_with_tokenizer(tmp_path, capsys):
    from preftune.data.char_tokenizer import build_char_tokenizer

    odd = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant:\n' }}{% endif %}"
    )
    build_char_tokenizer(chat_template=odd).save_pretrained(tmp_path / "tok")
    p = write_jsonl(
        tmp_path / "d.jsonl",
        [{"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"}],
    )
    assert main(["data", "check", str(p), "--tokenizer", str(tmp_path / "tok")]) == 1
    assert (
        f"{p}:1: field 'chosen': the chat template renders the prompt differently" in capsys.readouterr().out
    )


def test_format_summary_says_what_was_dropped_and_truncated():
    from preftune.data.validate import format_summary

    text = format_summary(
        {
            "source": "d.jsonl",
            "rows": 10,
            "kind": "pairwise",
            "examples": 7,
            "tokens": 99,
            "cache": "miss",
            "dropped": 3,
            "reasons": {"chosen: empty text": 1, "chosen identical to rejected": 2},
            "truncated": 2,
            "truncated_prompt": 1,
            "truncated_response": 1,
        }
    )
    assert text.splitlines() == [
        "d.jsonl: 10 rows, kind pairwise → 7 examples (99 tokens; cache miss)",
        "dropped 3 rows (chosen identical to rejected: 2, chosen: empty text: 1)",
        "truncated 2 rows (prompt: 1, response: 1)",
    ]


def test_parquet_message_lists_with_merged_schema_nulls(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {
            "prompt": [{"role": "user", "content": "hi", "name": "ann"}],
            "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}],
        },
        {
            "prompt": [{"role": "user", "content": "yo"}],
            "chosen": [{"role": "assistant", "content": "c"}],
            "rejected": [{"role": "bot", "content": "d"}],
        },
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    assert (
        pq.read_table(tmp_path / "m.parquet").to_pylist()[1]["prompt"][0]["name"] is None
    )  # the null we drop
    res = check_data(tmp_path / "m.parquet")
    assert res.summary["conversational"] is True
    assert [(q.row, q.field) for q in res.problems] == [(2, "rejected[0].role")]


def test_pair_scores_need_both_finite(tmp_path):
    rows = [
        {**GOOD, "score_chosen": 2},
        {**GOOD, "score_chosen": 2, "score_rejected": "high"},
        {**GOOD, "score_chosen": 2.5, "score_rejected": 1},
    ]
    res = check_data(write_jsonl(tmp_path / "d.jsonl", rows))
    assert [(q.row, q.field) for q in res.problems] == [(1, "score_rejected"), (2, "score_rejected")]
    assert (
        "is null, expected a finite number — give both score_chosen and score_rejected"
        in res.problems[0].render()
    )


def test_hub_id_goes_through_datasets_load_dataset(monkeypatch, tmp_path):
    """No network: load_dataset is replaced by a local Dataset, to check the hub path around it."""
    import datasets

    from preftune.data.char_tokenizer import build_char_tokenizer
    from preftune.data.pipeline import prepare_examples

    calls = []

    def fake_load(repo_id, split=None):
        calls.append((repo_id, split))
        return datasets.Dataset.from_list(PAIRS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.setattr("preftune.paths.hub_reachable", lambda: True)
    res = check_data("org/prefs", split="test")
    assert res.ok and res.summary["valid"] == 2 and calls == [("org/prefs", "test")]
    out = prepare_examples("org/prefs", tokenizer=build_char_tokenizer(), cache_dir=tmp_path / "c")
    assert len(out.examples) == 2 and calls[-1] == ("org/prefs", "train")


def test_cli_checks_an_online_method_s_prompt_data(tmp_path, capsys):
    """A file of prompts (an online method's --prompts) is detected and checked as the online loop
    reads it; it was refused with "cannot tell the record kind from the fields ['prompt']"."""
    from preftune.data.char_tokenizer import build_char_tokenizer

    build_char_tokenizer().save_pretrained(tmp_path / "tok")
    rows = [{"prompt": "ab", "answer": 3}, {"prompt": "abcdef", "answer": 4}, {"prompt": "abcd", "answer": 5}]
    p = write_jsonl(tmp_path / "prompts.jsonl", rows)
    assert main(["data", "check", str(p), "--tokenizer", str(tmp_path / "tok")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (
        f"{p}: OK — 3 prompts (0 message lists), kind prompts (an online method's --prompts); "
        "columns passed to the reward: answer"
    )
    assert out[1].split() == ["tokens", "p50", "p90", "p99", "max"]
    assert out[2].split() == ["prompt", "4", "6", "6", "6"]  # char tokenizer, no BOS: 2, 4, 6 tokens
    bad = write_jsonl(
        tmp_path / "bad.jsonl", [{"prompt": "ab"}, {"prompt": ""}, {"question": "x"}, {"prompt": 5}]
    )
    assert main(["data", "check", str(bad)]) == 1
    text = capsys.readouterr().out
    assert f"{bad}:2: field 'prompt': empty text" in text
    assert f"{bad}:3: field 'prompt': missing" in text
    assert f"{bad}:4: field 'prompt': is an int, not text or a message list" in text
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    assert main(["data", "check", str(pairs)]) == 0  # preference data is still checked as such
    assert "kind pairwise" in capsys.readouterr().out
    assert main(["data", "check", str(pairs), "--kind", "prompts"]) == 0  # a prompt + extra columns
    assert "columns passed to the reward: chosen, rejected" in capsys.readouterr().out
