"""How long `prepare_examples` takes on 100k preference pairs of ~300 tokens, cold and from the cache.

    python benchmarks/tokenize_speed.py                       # char tokenizer, text pairs
    python benchmarks/tokenize_speed.py --tokenizer bpe       # a 2k-merge BPE trained here
    python benchmarks/tokenize_speed.py --conversational      # message lists through the chat template

Data: synthetic pairs (random words) written as JSONL; each pair's prompt + chosen + rejected is
~300 tokens under the chosen tokenizer (prompt ≈ 1/2, each response ≈ 1/4). "cold" is a first run
into an empty cache folder (read, validate, format, tokenize, write the cache); "cache" is the
second run, which only hashes the file and loads the cache. Prints one JSON object, with wall and
CPU seconds (the CPU figure is the honest one on a shared machine) and the load average at start.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

WORDS = [
    "the",
    "model",
    "prefers",
    "answer",
    "which",
    "explains",
    "reason",
    "step",
    "by",
    "clear",
    "short",
    "because",
    "data",
    "sum",
    "of",
    "two",
    "numbers",
    "is",
    "correct",
    "wrong",
    "please",
    "write",
    "a",
    "function",
    "that",
    "returns",
    "list",
    "python",
    "why",
    "how",
    "does",
    "this",
    "work",
    "example",
]


def _text(rng: random.Random, n_chars: int) -> str:
    out: list[str] = []
    size = 0
    while size < n_chars:
        w = rng.choice(WORDS)
        out.append(w)
        size += len(w) + 1
    return " ".join(out)[:n_chars].strip()


def make_rows(n: int, chars_per_pair: int, conversational: bool, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = f"{i}: " + _text(rng, chars_per_pair // 2)
        chosen, rejected = _text(rng, chars_per_pair // 4), _text(rng, chars_per_pair // 4)
        if conversational:
            rows.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                }
            )
        else:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def build_tokenizer(kind: str, out: Path, corpus: list[str]) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from preftune.data.char_tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, build_char_tokenizer

    if kind == "char":
        fast = build_char_tokenizer(chat_template=CHAT_TEMPLATE)
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=2000,
            special_tokens=list(SPECIAL_TOKENS.values()),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(corpus, trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return out


def _cpu_s() -> float:
    """User + system CPU seconds of this process and its finished children (the tokenizer workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--tokens-per-pair", type=int, default=300)
    ap.add_argument("--tokenizer", choices=("char", "bpe"), default="char")
    ap.add_argument("--conversational", action="store_true")
    ap.add_argument(
        "--num-proc", type=int, default=None, help="default: preftune's choice (2 above 20k rows)"
    )
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from preftune.data.pipeline import prepare_examples

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # Calibrate characters per token on a sample, so a pair is ~tokens_per_pair tokens.
        sample = make_rows(200, 1200, False, seed=1)
        corpus = [r["prompt"] + " " + r["chosen"] for r in sample]
        tok_dir = build_tokenizer(args.tokenizer, root / "tok", corpus)
        tok = AutoTokenizer.from_pretrained(tok_dir)
        n_chars = sum(len(t) for t in corpus)
        n_tok = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in corpus)
        chars_per_pair = int(args.tokens_per_pair * n_chars / n_tok)
        rows = make_rows(args.rows, chars_per_pair, args.conversational)
        data = root / "pairs.jsonl"
        with data.open("w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        del rows
        kw = {"tokenizer": tok, "cache_dir": root / "cache", "num_proc": args.num_proc}
        load = os.getloadavg()[0]
        t0, c0 = time.perf_counter(), _cpu_s()
        cold = prepare_examples(data, **kw)
        t_cold, c_cold = time.perf_counter() - t0, _cpu_s() - c0
        t0, c0 = time.perf_counter(), _cpu_s()
        warm = prepare_examples(data, **kw)
        t_warm, c_warm = time.perf_counter() - t0, _cpu_s() - c0
        if warm.summary["cache"] != "hit" or warm.examples != cold.examples:
            print("cache run did not reproduce the cold run", file=sys.stderr)
            return 1
        n_pairs = len(cold.examples)
        tokens = sum(e.num_tokens for e in cold.examples)
        result = {
            "rows": n_pairs,
            "tokenizer": args.tokenizer,
            "conversational": args.conversational,
            "tokens_per_pair": round(tokens / n_pairs, 1),
            "file_mb": round(data.stat().st_size / 2**20, 1),
            "num_proc": cold.summary["num_proc"],
            "cold_s": round(t_cold, 2),
            "cold_cpu_s": round(c_cold, 2),
            "cold_tokenize_s": cold.summary["tokenize_seconds"],
            "cache_s": round(t_warm, 2),
            "cache_cpu_s": round(c_warm, 2),
            "load_avg_1min": round(load, 1),
            "cpus": os.cpu_count(),
            "cache_mb": round(Path(cold.summary["cache_file"]).stat().st_size / 2**20, 1),
        }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
