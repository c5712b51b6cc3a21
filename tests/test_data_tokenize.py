"""Formatting and tokenization: exact boundaries, EOS, chat templates, truncation, dropping, kinds."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from preftune.data.char_tokenizer import CHAT_TEMPLATE, build_char_tokenizer
from preftune.data.pipeline import prepare_examples, ranked_to_pairs
from preftune.errors import ConfigError, DataError
from preftune.types import Example

EOS = 2


@pytest.fixture(scope="module")
def char_tok(tok_dir):
    """The char tokenizer with its chat template, loaded back through AutoTokenizer."""
    return AutoTokenizer.from_pretrained(tok_dir)


@pytest.fixture(scope="module")
def plain_tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("plain")
    build_char_tokenizer().save_pretrained(d)
    return AutoTokenizer.from_pretrained(d)


def prep(rows, tok, tmp_path: Path, **kw):
    return prepare_examples(rows, tokenizer=tok, cache_dir=tmp_path / "cache", **kw)


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_text_pair_prompt_shared_and_eos_appended(plain_tok, tmp_path):
    out = prep([{"prompt": "2+2=", "chosen": "4", "rejected": "five"}], plain_tok, tmp_path)
    (ex,) = out.examples
    assert ex.kind == "pairwise" and ex.source_row == 1
    assert ex.prompt_ids == ids(plain_tok, "2+2=")
    assert ex.response_ids == [ids(plain_tok, "4") + [EOS], ids(plain_tok, "five") + [EOS]]
    assert [len(r) for r in ex.response_ids] == [2, 5]


def _merge_tokenizer(tmp_path: Path) -> PreTrainedTokenizerFast:
    """BPE with the merge a+b → ab, so joint tokenization of 'xa' + 'b' crosses the boundary."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "x": 4, "a": 5, "b": 6, "ab": 7, "=": 8}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")], unk_token="<unk>"))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(tmp_path / "bpe")
    return AutoTokenizer.from_pretrained(tmp_path / "bpe")


def test_boundary_is_exact_when_joint_tokenization_would_merge_across_it(tmp_path):
    tok = _merge_tokenizer(tmp_path)
    assert ids(tok, "xa=xab") == [4, 5, 8, 4, 7]  # joint: 'ab' merges across prompt|response
    (ex,) = prep([{"prompt": "xa=xa", "chosen": "b", "rejected": "bab"}], tok, tmp_path).examples
    assert ex.prompt_ids == [4, 5, 8, 4, 5]
    assert ex.response_ids == [[6, EOS], [6, 7, EOS]]  # 1 and 2 tokens + EOS, never moved into the prompt


def test_chat_template_prompt_is_generation_prompt_and_response_is_remainder(char_tok, tmp_path):
    conv = {
        "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "hello"}],
        "rejected": "go",
    }
    (ex,) = prep([conv], char_tok, tmp_path).examples
    prompt_text = "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"
    assert char_tok.decode(ex.prompt_ids) == prompt_text
    assert ex.prompt_ids == ids(char_tok, prompt_text)
    # The template ends assistant turns with EOS then a newline: no second EOS is appended.
    assert ex.response_ids[0] == ids(char_tok, "hello") + [EOS] + ids(char_tok, "\n")
    assert ex.response_ids[1] == ids(char_tok, "go") + [EOS] + ids(char_tok, "\n")
    full = char_tok.apply_chat_template(conv["prompt"] + conv["chosen"], tokenize=False)
    assert char_tok.decode(ex.prompt_ids + ex.response_ids[0]) == full


def test_messages_without_template_name_the_option(plain_tok, tmp_path):
    conv = {"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"}
    with pytest.raises(
        DataError, match=r"no chat template — pass chat_template=\.\.\. \(CLI: --chat-template FILE"
    ):
        prep([conv], plain_tok, tmp_path)
    (ex,) = prep([conv], plain_tok, tmp_path, chat_template=CHAT_TEMPLATE).examples
    assert plain_tok.decode(ex.prompt_ids) == "<|user|>\nhi\n<|assistant|>\n"


def test_template_whose_prompt_is_not_a_prefix_is_an_error_or_dropped(plain_tok, tmp_path):
    odd = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant:\n' }}{% endif %}"
    )  # 'assistant: ' vs 'assistant:\n'
    rows = [{"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"}]
    with pytest.raises(
        DataError, match="1:.*field 'chosen': the chat template renders the prompt differently"
    ):
        prep(rows, plain_tok, tmp_path, chat_template=odd)
    out = prep(rows, plain_tok, tmp_path, chat_template=odd, on_invalid="drop")
    assert out.examples == [] and out.summary["dropped"] == 1


def test_text_through_template_on_request(char_tok, tmp_path):
    (ex,) = prep(
        [{"prompt": "hi", "chosen": "a", "rejected": "b"}], char_tok, tmp_path, use_chat_template=True
    ).examples
    assert char_tok.decode(ex.prompt_ids) == "<|user|>\nhi\n<|assistant|>\n"
    (ex,) = prep([{"prompt": "hi", "chosen": "a", "rejected": "b"}], char_tok, tmp_path).examples
    assert char_tok.decode(ex.prompt_ids) == "hi"


def _bos_tok(tmp_path: Path):
    """A char tokenizer that puts <s> before text by default (Llama style)."""
    fast = build_char_tokenizer()
    fast.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    fast.save_pretrained(tmp_path / "bos")
    return AutoTokenizer.from_pretrained(tmp_path / "bos")


def test_bos_prefix_and_left_truncation_keeps_it(tmp_path):
    tok = _bos_tok(tmp_path)
    (ex,) = prep([{"prompt": "abcdef", "chosen": "x", "rejected": "y"}], tok, tmp_path).examples
    assert ex.prompt_ids == [1, *ids(tok, "abcdef")]
    assert ex.response_ids == [ids(tok, "x") + [EOS], ids(tok, "y") + [EOS]]  # no BOS inside responses
    out = prep([{"prompt": "abcdef", "chosen": "x", "rejected": "y"}], tok, tmp_path, max_prompt_length=4)
    assert out.examples[0].prompt_ids == [1, *ids(tok, "def")]
    assert out.summary["truncated_prompt"] == 1


def test_truncation_counts_and_dropping(plain_tok, tmp_path):
    rows = [
        {"prompt": "abcdefgh", "chosen": "x", "rejected": "y"},  # prompt 8 → left-truncated to 4
        {"prompt": "ab", "chosen": "123456", "rejected": "1"},  # chosen 7 tokens → right-truncated to 4
        {"prompt": "ab", "chosen": "1", "rejected": "2"},
    ]  # untouched
    out = prep(rows, plain_tok, tmp_path, max_length=6, max_prompt_length=4)
    a, b, c = out.examples
    assert a.prompt_ids == ids(plain_tok, "efgh") and a.response_ids[0] == ids(plain_tok, "x") + [EOS]
    assert b.response_ids == [ids(plain_tok, "1234"), ids(plain_tok, "1") + [EOS]]
    assert c.num_tokens == 2 + 2 + 2
    s = out.summary
    assert (s["truncated"], s["truncated_prompt"], s["truncated_response"], s["dropped"]) == (2, 1, 1, 0)
    # Without max_prompt_length a prompt that leaves no room for a response keeps its last
    # max_length // 2 tokens (the default keeps the row); truncation="drop" drops every row over a limit.
    out = prep(rows, plain_tok, tmp_path, max_length=8)
    a, b, _ = out.examples
    assert a.prompt_ids == ids(plain_tok, "efgh") and a.response_ids[0] == ids(plain_tok, "x") + [EOS]
    assert b.response_ids[0] == ids(plain_tok, "123456")  # 2 + 6 = max_length; EOS cut
    out = prep(rows, plain_tok, tmp_path, max_length=8, truncation="drop")
    assert [e.source_row for e in out.examples] == [3]
    assert out.summary["dropped"] == 2 and out.summary["reasons"] == {"longer than max_length": 2}
    with pytest.raises(ConfigError, match="max_prompt_length=8 must be below max_length=8"):
        prep(rows, plain_tok, tmp_path, max_length=8, max_prompt_length=8)


def test_on_invalid_error_lists_rows_and_drop_counts_reasons(plain_tok, tmp_path):
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "a", "rejected": "a"},
        {"prompt": "p", "chosen": "", "rejected": "b"},
        {"prompt": "p", "chosen": "c", "rejected": "a"},
    ]
    with pytest.raises(DataError) as err:
        prep(rows, plain_tok, tmp_path)
    text = str(err.value)
    assert "2 problem(s) in <records> (2 of 4 rows)" in text and "<records>:2: field 'rejected'" in text
    assert "<records>:3: field 'chosen': empty text" in text and "on_invalid='drop'" in text
    out = prep(rows, plain_tok, tmp_path, on_invalid="drop")
    assert [e.source_row for e in out.examples] == [1, 4]
    assert out.summary["dropped"] == 2
    assert out.summary["reasons"] == {"chosen identical to rejected": 1, "chosen: empty text": 1}


def test_implicit_text_prompt_hh_style(plain_tok, tmp_path):
    hh = "Human: hi\nAssistant:"  # HH-RLHF uses "\n\n", which the char tokenizer maps to <unk>
    rows = [
        {"chosen": hh + " Hello there", "rejected": hh + " Go away"},
        {"chosen": "Q: pet? A: The cat", "rejected": "Q: pet? A: The dog"},
    ]
    a, b = prep(rows, plain_tok, tmp_path).examples
    assert plain_tok.decode(a.prompt_ids) == hh
    assert [plain_tok.decode(r) for r in a.response_ids] == [" Hello there</s>", " Go away</s>"]
    assert plain_tok.decode(b.prompt_ids) == "Q: pet? A: The"
    assert [plain_tok.decode(r) for r in b.response_ids] == [" cat</s>", " dog</s>"]


def test_implicit_message_prompt_ends_at_turn_boundary(char_tok, tmp_path):
    def m(role, text):
        return {"role": role, "content": text}

    shared = [m("user", "hi"), m("assistant", "hello"), m("user", "joke?")]
    # Both replies start with "Why": the shared prefix must stop at the message, not inside it.
    row = {"chosen": shared + [m("assistant", "Why not")], "rejected": shared + [m("assistant", "Why ask")]}
    (ex,) = prep([row], char_tok, tmp_path).examples
    assert char_tok.decode(ex.prompt_ids) == char_tok.apply_chat_template(
        shared, tokenize=False, add_generation_prompt=True
    )
    assert [char_tok.decode(r) for r in ex.response_ids] == ["Why not</s>\n", "Why ask</s>\n"]


def test_unpaired_and_pairwise_extras_pass_through(plain_tok, tmp_path):
    u = prep(
        [
            {"prompt": "p", "completion": "good", "label": True},
            {"prompt": "p", "completion": "bad", "label": False},
        ],
        plain_tok,
        tmp_path,
    ).examples
    assert [(e.kind, len(e.response_ids), e.label) for e in u] == [("unpaired", 1, 1.0), ("unpaired", 1, 0.0)]
    (p,) = prep(
        [
            {
                "prompt": "p",
                "chosen": "a",
                "rejected": "b",
                "label": 0.8,
                "margins": [[1, 2.5], [0, -1]],
                "score_chosen": 9,
                "score_rejected": 3,
            }
        ],
        plain_tok,
        tmp_path,
    ).examples
    assert (p.label, p.margins, p.scores) == (0.8, [[1.0, 2.5], [0.0, -1.0]], [9.0, 3.0])


def test_ranked_sorted_best_first_and_pair_builders(plain_tok, tmp_path):
    rows = [{"prompt": "p", "responses": ["mid", "low", "top"], "scores": [2, 1, 3]}]
    (ex,) = prep(rows, plain_tok, tmp_path).examples
    assert ex.kind == "ranked" and ex.scores == [3.0, 2.0, 1.0]
    assert [plain_tok.decode(r) for r in ex.response_ids] == ["top</s>", "mid</s>", "low</s>"]
    for how, expected in [
        ("best_vs_worst", [(0, 2)]),
        ("best_vs_each", [(0, 1), (0, 2)]),
        ("all_pairs", [(0, 1), (0, 2), (1, 2)]),
    ]:
        pairs = prep(rows, plain_tok, tmp_path, ranked_pairs=how).examples
        assert [p.meta["ranks"] for p in pairs] == expected
        assert all(p.kind == "pairwise" and p.prompt_ids == ex.prompt_ids for p in pairs)
        assert [p.scores for p in pairs] == [[ex.scores[i], ex.scores[j]] for i, j in expected]
        assert [p.response_ids for p in pairs] == [
            [ex.response_ids[i], ex.response_ids[j]] for i, j in expected
        ]
    tied = Example([5], [[6], [7], [8]], kind="ranked", scores=[2.0, 2.0, 1.0])
    assert [p.meta["ranks"] for p in ranked_to_pairs(tied, "all_pairs")] == [(0, 2), (1, 2)]
    with pytest.raises(ConfigError, match="needs ranked data"):
        prep([{"prompt": "p", "chosen": "a", "rejected": "b"}], plain_tok, tmp_path, ranked_pairs="all_pairs")


def test_two_processes_give_the_same_examples_as_one(plain_tok, tmp_path):
    rows = [
        {"prompt": f"q{i}", "chosen": "a" * (i % 7 + 1), "rejected": "b" * (i % 5 + 1)} for i in range(300)
    ]
    one = prepare_examples(rows, tokenizer=plain_tok, num_proc=1, use_cache=False, max_length=7)
    two = prepare_examples(rows, tokenizer=plain_tok, num_proc=2, use_cache=False, max_length=7)
    assert one.examples == two.examples and len(one.examples) == 300
    assert one.summary["truncated"] == two.summary["truncated"] > 0
    assert (one.summary["num_proc"], two.summary["num_proc"]) == (1, 2)


def test_template_that_raises_on_a_record_is_reported_for_that_row(plain_tok, tmp_path):
    strict = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
        "{% endif %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    rows = [
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"},
        {
            "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}],
            "chosen": "a",
            "rejected": "b",
        },
    ]
    with pytest.raises(
        DataError,
        match=r"<records>:2: field 'prompt': the chat template fails on this record "
        r"\(TemplateError: no system role\)",
    ):
        prep(rows, plain_tok, tmp_path, chat_template=strict)
    out = prep(rows, plain_tok, tmp_path, chat_template=strict, on_invalid="drop")
    assert [e.source_row for e in out.examples] == [1]
    assert out.summary["reasons"] == {"chat template: fails": 1}
    assert plain_tok.decode(out.examples[0].response_ids[0]) == "a\n</s>"


def test_message_extra_keys_reach_the_template_and_nulls_do_not(plain_tok, tmp_path):
    named = (
        "{% for m in messages %}{{ m['role'] }}{% if m.name is defined %}({{ m.name }}){% endif %}"
        "{{ ': ' + m['content'] + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    row = {
        "prompt": [
            {"role": "user", "content": "hi", "name": "ann"},
            {"role": "user", "content": "yo", "name": None},
        ],
        "chosen": "a",
        "rejected": "b",
    }
    (ex,) = prep([row], plain_tok, tmp_path, chat_template=named).examples
    assert plain_tok.decode(ex.prompt_ids) == "user(ann): hi\nuser: yo\nassistant: "


def test_ultrafeedback_style_replies_that_repeat_the_prompt_are_not_duplicated(char_tok, tmp_path):
    def m(role, text):
        return {"role": role, "content": text}

    row = {
        "prompt": "hi",
        "chosen": [m("user", "hi"), m("assistant", "hello")],
        "rejected": [m("user", "hi"), m("assistant", "go")],
    }
    (ex,) = prep([row], char_tok, tmp_path).examples
    assert char_tok.decode(ex.prompt_ids) == "<|user|>\nhi\n<|assistant|>\n"
    assert [char_tok.decode(r) for r in ex.response_ids] == ["hello</s>\n", "go</s>\n"]
    bad = {"prompt": "hi", "chosen": [m("user", "other"), m("assistant", "a")], "rejected": "b"}
    with pytest.raises(
        DataError, match=r"<records>:1: field 'chosen\[0\].role': response opens with a 'user' turn"
    ):
        prep([bad], char_tok, tmp_path)


def test_backend_fast_path_gives_the_ordinary_ids(tmp_path):
    from dataclasses import replace

    from preftune.data.formatting import FormatOptions, Formatter

    for tok in (_merge_tokenizer(tmp_path), _bos_tok(tmp_path)):
        fast = Formatter.create(tok, FormatOptions(), conversational=False)
        assert fast.use_backend
        slow = replace(fast, use_backend=False)
        texts = ["xab=xa", "abc def", "</s>x"]
        assert fast.encode(texts, texts, [False] * 3) == slow.encode(texts, texts, [False] * 3)
