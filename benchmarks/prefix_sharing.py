"""Prefix-shared packed rows vs two padded rows per pair: forward + backward throughput.

A prompt-heavy preference batch (prompts ~512 tokens, chosen/rejected ~96 tokens each) through a small
Llama. Both layouts use the same chunked log-prob head (`preftune.models.logprobs.example_stats`), so
the only difference is the row layout:

- shared: one prompt per pair, both responses as branches (custom 4-D mask, positions continue from the
  prompt), examples packed into rows up to the longest example's length;
- padded: the layout TRL uses for DPO — chosen and rejected as two rows that both carry the prompt,
  right-padded to the longest row;
- padded_full (context, not part of the comparison above): padded rows with full `[rows, T, vocab]`
  logits and log_softmax, the way TRL computes DPO log-probs.

Throughput counts the same logical tokens for both (Σ over pairs of 2·|prompt| + |chosen| + |rejected|,
what the padded layout processes without its padding), so tokens/s compare like for like. Layouts run
alternately (ABAB… then BABA…), after one warm-up each; the median of `--reps` is reported.

    python benchmarks/prefix_sharing.py --reps 5
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from typing import Any

import torch


def make_batch(n: int, prompt_len: int, response_len: int, vocab: int, seed: int) -> list[Any]:
    """`n` pairs with lengths drawn within ±12.5% (prompts) and ±33% (responses) of the targets."""
    from preftune.types import Example

    rng = random.Random(seed)

    def tokens(mean: int, spread: float) -> list[int]:
        length = rng.randint(int(mean * (1 - spread)), int(mean * (1 + spread)))
        return [rng.randrange(3, vocab) for _ in range(length)]

    return [
        Example(
            prompt_ids=[1] + tokens(prompt_len, 0.125),
            response_ids=[tokens(response_len, 0.33) + [2], tokens(response_len, 0.33) + [2]],
        )
        for _ in range(n)
    ]


def build_model(args: argparse.Namespace) -> Any:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 4,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 64),
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    return AutoModelForCausalLM.from_config(config, dtype=dtype).to(args.device).train()


def full_logits_logps(model: Any, examples: list[Any]) -> torch.Tensor:
    """Summed response log-probs from padded rows and full-vocabulary logits (TRL's computation)."""
    rows = [(e.prompt_ids, r) for e in examples for r in e.response_ids]
    width = max(len(p) + len(r) for p, r in rows)
    device = next(model.parameters()).device
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for i, (p, r) in enumerate(rows):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        mask[i, : len(p) + len(r)] = 1
        labels[i, len(p) : len(p) + len(r)] = torch.tensor(r)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()
    labels = labels[:, 1:].to(device)
    logp = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return (logp * (labels >= 0)).sum(-1)


def step(model: Any, examples: list[Any], layout: str, device: str) -> tuple[float, float]:
    """One forward + backward; returns (wall seconds, process CPU seconds)."""
    from preftune.models.logprobs import example_stats

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    if layout == "padded_full":
        logps = full_logits_logps(model, examples)
    else:
        logps = example_stats(model, examples, pack=layout == "shared").logps
    logps.sum().backward()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    model.zero_grad(set_to_none=True)
    return elapsed, cpu


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=4, help="preference pairs per batch")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--response-len", type=int, default=96)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full-logits", action="store_true", help="also time padded_full (TRL-style)")
    return parser


def main() -> int:
    args = _parser().parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from preftune.models.packing import build_packed, build_padded

    model = build_model(args)
    examples = make_batch(args.pairs, args.prompt_len, args.response_len, args.vocab, args.seed)
    prompts = [e.prompt_ids for e in examples]
    branches = [e.response_ids for e in examples]
    logical = sum(2 * len(e.prompt_ids) + sum(len(r) for r in e.response_ids) for e in examples)
    padded_slots = int(build_padded(prompts, branches).input_ids.numel())
    slots = {
        "shared": int(build_packed(prompts, branches).input_ids.numel()),
        "padded": padded_slots,
        "padded_full": padded_slots,
    }
    layouts = list(slots) if args.full_logits else ["shared", "padded"]
    wall: dict[str, list[float]] = {name: [] for name in layouts}
    cpu: dict[str, list[float]] = {name: [] for name in layouts}
    from preftune.models.logprobs import example_stats

    with torch.no_grad():  # the layouts compute the same numbers (float32: to ~1e-4 relative)
        values = [
            example_stats(model, examples, pack=True).logps,
            example_stats(model, examples, pack=False).logps,
        ]
        values.append(full_logits_logps(model, examples))
        for v in values[1:]:
            torch.testing.assert_close(v.float(), values[0].float(), rtol=1e-3, atol=1e-2)
    for name in layouts:  # warm-up: allocator, kernels, lazy init
        step(model, examples, name, args.device)
    for rep in range(args.reps):
        order = list(layouts) if rep % 2 == 0 else list(reversed(layouts))
        for name in order:
            w, c = step(model, examples, name, args.device)
            wall[name].append(w)
            cpu[name].append(c)

    keys = ("pairs", "prompt_len", "response_len", "hidden", "layers", "vocab", "reps", "dtype", "seed")
    result: dict[str, Any] = {
        "benchmark": "prefix_sharing",
        "device": args.device if args.device != "cpu" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "config": {k: getattr(args, k) for k in keys},
        "logical_tokens": logical,
    }
    # On a shared CPU, wall time includes waiting for a core; process CPU time (one thread) does not.
    print(f"{'layout':<12} {'row slots':>10} {'median s':>10} {'tokens/s':>10} {'pairs/s':>8} {'cpu s':>8}")
    for name in layouts:
        med, med_cpu = statistics.median(wall[name]), statistics.median(cpu[name])
        result[name] = {
            "row_slots": slots[name],
            "median_s": med,
            "times_s": wall[name],
            "cpu_median_s": med_cpu,
            "cpu_times_s": cpu[name],
            "tokens_per_s": logical / med,
            "pairs_per_s": args.pairs / med,
        }
        print(
            f"{name:<12} {slots[name]:>10} {med:>10.3f} {logical / med:>10.0f} {args.pairs / med:>8.2f} {med_cpu:>8.3f}"
        )
    result["speedup"] = result["shared"]["tokens_per_s"] / result["padded"]["tokens_per_s"]
    result["cpu_speedup"] = result["padded"]["cpu_median_s"] / result["shared"]["cpu_median_s"]
    print(f"prefix-shared speed-up: {result['speedup']:.2f}x wall, {result['cpu_speedup']:.2f}x CPU time")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
