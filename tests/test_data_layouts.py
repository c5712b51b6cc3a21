"""Data layouts people have: ShareGPT (LLaMA-Factory), KTO `messages` + `label`, UltraFeedback's
rated `completions`; and a --columns mapping that names a column the data lacks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from preftune.data.pipeline import prepare_examples
from preftune.data.schema import validate
from preftune.data.sources import read_source
from preftune.data.validate import check_data


def write_json(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return path


def records(path: Path, **kw):
    recs, problems, kind = validate(read_source(path), **kw)
    assert problems == [], [p.render() for p in problems]
    return recs, kind


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def test_sharegpt_pairwise_as_llama_factory_ships_it(tmp_path):
    rows = [
        {
            "conversations": [{"from": "human", "value": "hi"}],
            "chosen": {"from": "gpt", "value": "hello"},
            "rejected": {"from": "gpt", "value": "go away"},
        },
        {
            "conversations": [
                {"from": "system", "value": "be brief"},
                {"from": "human", "value": "2+2?"},
                {"from": "gpt", "value": "4"},
                {"from": "human", "value": "and 3+3?"},
            ],
            "chosen": {"from": "gpt", "value": "6"},
            "rejected": {"from": "gpt", "value": "7"},
        },
        {  # LLaMA-Factory's optional `system` column
            "conversations": [{"from": "human", "value": "hi"}],
            "system": "be kind",
            "chosen": {"from": "gpt", "value": "hello"},
            "rejected": {"from": "gpt", "value": "no"},
        },
    ]
    (a, b, c), kind = records(write_json(tmp_path / "dpo_en_demo.json", rows))
    assert kind == "pairwise" and a.conversational
    assert a.prompt == [msg("user", "hi")]
    assert a.responses == [[msg("assistant", "hello")], [msg("assistant", "go away")]]
    assert b.prompt == [
        msg("system", "be brief"),
        msg("user", "2+2?"),
        msg("assistant", "4"),
        msg("user", "and 3+3?"),
    ]
    assert b.responses == [[msg("assistant", "6")], [msg("assistant", "7")]]
    assert c.prompt == [msg("system", "be kind"), msg("user", "hi")]


def test_sharegpt_kto_tag_and_messages_label_are_unpaired(tmp_path):
    sharegpt = [
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "kto_tag": True},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "b"}], "kto_tag": False},
    ]
    (a, b), kind = records(write_json(tmp_path / "kto_sharegpt.json", sharegpt))
    assert kind == "unpaired"
    assert (a.prompt, a.responses, a.label) == ([msg("user", "q")], [[msg("assistant", "a")]], 1.0)
    assert (b.responses, b.label) == ([[msg("assistant", "b")]], 0.0)
    # LLaMA-Factory's kto_en_demo.json: multi-turn `messages` + `label`; the last message is the completion.
    kto = [
        {
            "messages": [
                msg("user", "hi"),
                msg("assistant", "hello"),
                msg("user", "more?"),
                msg("assistant", "sure"),
            ],
            "label": True,
        },
        {"messages": [msg("user", "hi"), msg("assistant", "bye")], "label": False},
    ]
    (a, b), kind = records(write_json(tmp_path / "kto_en_demo.json", kto))
    assert kind == "unpaired"
    assert a.prompt == [msg("user", "hi"), msg("assistant", "hello"), msg("user", "more?")]
    assert (a.responses, a.label, b.label) == ([[msg("assistant", "sure")]], 1.0, 0.0)


def test_ultrafeedback_completions_become_ranked_records(tmp_path):
    def comp(text, fine, overall):
        return {
            "model": "m",
            "principle": "helpfulness",
            "response": text,
            "annotations": {"helpfulness": {"Rating": "4", "Rationale": "ok"}},
            "fine-grained_score": fine,
            "overall_score": overall,
            "critique": "...",
        }

    rows = [
        {
            "source": "evol_instruct",
            "instruction": "Name a colour.",
            "models": ["a", "b", "c", "d"],
            "completions": [
                comp("red", 3.5, 7.0),
                comp("blue", 4.75, 6.0),
                comp("?", float("nan"), 2.0),
                comp("green", 1.25, 8.5),
            ],
            "correct_answers": ["None"],
            "incorrect_answers": ["None"],
        },
        {  # completions without a fine-grained score are ranked by overall_score
            "source": "sharegpt",
            "instruction": "Say hi.",
            "completions": [
                {"response": "hi", "overall_score": 2.0},
                {"response": "hello", "overall_score": 9.0},
            ],
        },
    ]
    path = tmp_path / "ultrafeedback.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")  # NaN as JSON's NaN
    (a, b), kind = records(path)
    assert kind == "ranked" and a.prompt == "Name a colour."
    assert a.responses == ["blue", "red", "green"] and a.scores == [4.75, 3.5, 1.25]  # NaN left out
    assert b.responses == ["hello", "hi"] and b.scores == [9.0, 2.0]


def test_layout_problems_name_the_users_column(tmp_path):
    rows = [
        {
            "conversations": [{"from": "human", "value": "hi"}],
            "chosen": {"from": "gpt", "value": "a"},
            "rejected": {"from": "gpt", "value": "b"},
        },
        {
            "conversations": [{"from": "bot", "value": "hi"}],
            "chosen": {"from": "gpt", "value": "a"},
            "rejected": {"from": "gpt", "value": "b"},
        },
    ]
    res = check_data(write_json(tmp_path / "d.json", rows))
    assert [p.render() for p in res.problems] == [
        f"{tmp_path / 'd.json'}:2: field 'conversations[0].role': unknown role 'bot' — use one of system, user, assistant, tool"
    ]


def test_columns_naming_a_missing_column_says_so(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "q", "good": "a", "bad": "b"}) + "\n", encoding="utf-8")
    res = check_data(path, columns="prompt=question,chosen=good,rejected=worse")
    assert [p.render() for p in res.problems] == [
        f"{path}: --columns rejected=worse: the data has no column 'worse' (its columns: bad, good, question) "
        "— name a column the data has, e.g. --columns chosen=response_a"
    ]
    assert check_data(path, columns="prompt=question,chosen=good,rejected=bad").ok


@pytest.fixture(scope="module")
def tok(tok_dir):
    return AutoTokenizer.from_pretrained(tok_dir)


def test_sharegpt_tokenizes_exactly_as_the_standard_layout(tok, tmp_path):
    sharegpt = [
        {
            "conversations": [{"from": "human", "value": "2+2?"}],
            "chosen": {"from": "gpt", "value": "4"},
            "rejected": {"from": "gpt", "value": "5"},
        }
    ]
    standard = [
        {
            "prompt": [msg("user", "2+2?")],
            "chosen": [msg("assistant", "4")],
            "rejected": [msg("assistant", "5")],
        }
    ]
    a = prepare_examples(write_json(tmp_path / "s.json", sharegpt), tokenizer=tok, use_cache=False)
    b = prepare_examples(standard, tokenizer=tok, use_cache=False)
    assert a.examples[0].prompt_ids == b.examples[0].prompt_ids
    assert a.examples[0].response_ids == b.examples[0].response_ids
