"""`preftune data show`: one example as the model sees it — rendered text, tokens with their ids,
and the loss mask (prompt: context, responses: trained)."""

from __future__ import annotations

from transformers import AutoTokenizer

from preftune.cli import main
from test_train_fixtures import write_jsonl


def test_text_example_tokens_ids_and_mask(tmp_path, tok_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "2+2=", "chosen": "4", "rejected": "5"}])
    assert main(["data", "show", str(data), "--tokenizer", str(tok_dir)]) == 0
    tok = AutoTokenizer.from_pretrained(tok_dir)
    p = [tok.convert_tokens_to_ids(c) for c in "2+2="]
    four, five, eos = tok.convert_tokens_to_ids("4"), tok.convert_tokens_to_ids("5"), tok.eos_token_id
    assert capsys.readouterr().out.splitlines() == [
        f"{data}:1 (index 0): pairwise, text; tokenizer {tok_dir}",
        "prompt: 4 tokens (mask 0: context, not trained)",
        '  text   "2+2="',
        "  tokens [2][+][2][=]",
        "  ids    " + " ".join(map(str, p)),
        "chosen: 2 tokens (mask 1: trained)",
        '  text   "4"',
        "  tokens [4][</s>]",
        f"  ids    {four} {eos}",
        "  sequence prompt + chosen: 6 tokens, loss mask 000011",
        "rejected: 2 tokens (mask 1: trained)",
        '  text   "5"',
        "  tokens [5][</s>]",
        f"  ids    {five} {eos}",
        "  sequence prompt + rejected: 6 tokens, loss mask 000011",
    ]


def test_chat_template_text_and_truncation_as_in_training(tmp_path, tok_dir, capsys):
    row = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        "label": True,
    }
    data = write_jsonl(tmp_path / "kto.jsonl", [row])
    assert main(["data", "show", str(data), "--tokenizer", str(tok_dir), "--max-length", "30"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{data}:1 (index 0): unpaired, messages, messages layout; tokenizer {tok_dir}"
    assert out[1] == "truncated: response (as in training)"
    assert out[3] == '  text   "<|user|>\\nhi\\n<|assistant|>\\n"'  # the template's render, newlines visible
    assert out[4].startswith("  tokens [<][|][u][s][e][r][|][>][\\n][h][i][\\n]")
    # 26 prompt tokens leave 4 of the completion's 7 ("hello</s>\n") within max_length 30.
    assert out[6] == "completion (label desirable): 4 tokens (mask 1: trained)"
    assert out[8] == "  tokens [h][e][l][l]"
    mask = "0" * 26 + "1111"
    assert out[10] == f"  sequence prompt + completion (label desirable): 30 tokens, loss mask {mask}"


def test_without_tokenizer_bad_row_and_index_out_of_range(tmp_path, capsys):
    data = write_jsonl(
        tmp_path / "d.jsonl",
        [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a", "rejected": "a"}],
    )
    assert main(["data", "show", str(data)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{data}:1 (index 0): pairwise, text",
        'prompt: "q"',
        'chosen: "a"',
        'rejected: "b"',
        "(give --tokenizer DIR to see the rendered text, the tokens and the loss mask)",
    ]
    assert main(["data", "show", str(data), "--index", "1"]) == 1
    assert capsys.readouterr().out.strip() == (
        f"{data}:2: field 'rejected': identical to chosen — a pair needs two different responses; fix or drop the row"
    )
    assert main(["data", "show", str(data), "--index", "2"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"preftune: error: {data}: --index 2 is out of range: the data has 2 rows — give --index from 0 to 1"
    )
