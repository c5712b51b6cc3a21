"""Rollout generation with one prefill per prompt (KV cache repeated for its samples) against one
prefill per sample, on a tiny random Llama (float32, CPU).

    .venv/bin/python benchmarks/rollout_prefill.py [--quick] [--prompts 16] [--samples 8]
        [--prompt-len 250] [--new-tokens 64] [--reps 3] [--threads 1]

Both modes run `preftune.rl.RolloutEngine.generate` on the same prompts with the same seed
(interleaved repetitions, medians). EOS is an id the model never picks, so every completion has
`--new-tokens` tokens. Reported: CPU seconds per call of each mode (with one thread, robust to other
jobs on the machine; wall seconds too), their ratio (`speedup`), the prefill alone (`--new-tokens 1`)
and its share of the repeated-prefill call, and whether both modes sampled the same tokens. `--quick` uses fewer new tokens
and one repetition and prints a last JSON line; full runs write benchmarks/results/rollout_prefill.*.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_utils as bu  # noqa: E402


def build(spec: bu.ModelSpec) -> object:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=spec.tie_word_embeddings,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(torch.float32).eval()


def setup(size: str, prompts: int, samples: int, prompt_len: int) -> tuple[Any, list[list[int]], Any]:
    """(model, prompts, engine) of a rollout benchmark: the random Llama of `size`, `prompts` random
    prompts with lengths drawn from ±10 % of `prompt_len` (seed 1), and an engine whose batch holds
    every sample; EOS is the last vocabulary id, which the model does not pick."""
    import torch

    from preftune.rl import RolloutEngine

    spec = bu.MODELS[size]
    model = build(spec)
    g = torch.Generator().manual_seed(1)
    lo, hi = int(prompt_len * 0.9), int(prompt_len * 1.1)
    lengths = torch.randint(lo, hi + 1, (prompts,), generator=g).tolist()
    rows = [torch.randint(3, spec.vocab_size - 1, (n,), generator=g).tolist() for n in lengths]
    return model, rows, RolloutEngine(model, spec.vocab_size - 1, batch_rows=prompts * samples)


def timed(
    engine: object, prompts: list[list[int]], n: int, sampling: object, share: bool
) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process, rollouts); with one thread, CPU time is what the
    call costs whatever else runs on the machine."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = engine.generate(prompts, n, sampling, share_prefill=share)  # type: ignore[attr-defined]
    return time.perf_counter() - t0, time.process_time() - c0, out


def main() -> None:
    import torch

    from preftune.rl import Sampling

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="16 new tokens, 1 repetition, JSON line")
    p.add_argument("--model-size", default="quick", choices=sorted(bu.MODELS))
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=250, help="prompt lengths drawn from ±10%% of this")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    if a.quick:
        a.new_tokens, a.reps = 16, 1
    torch.set_num_threads(a.threads)
    model, prompts, engine = setup(a.model_size, a.prompts, a.samples, a.prompt_len)
    lengths = [len(p) for p in prompts]
    full = Sampling(max_new_tokens=a.new_tokens, temperature=1.0, seed=0)
    prefill = Sampling(max_new_tokens=1, temperature=1.0, seed=0)
    timed(engine, prompts[:2], a.samples, prefill, True)  # warm-up
    times: dict[str, list[float]] = {}
    same = True
    for rep in range(a.reps):
        order = (True, False) if rep % 2 == 0 else (False, True)
        outs = {}
        for share in order:
            key = "shared" if share else "repeated"
            wall, cpu, outs[key] = timed(engine, prompts, a.samples, full, share)
            p_cpu = timed(engine, prompts, a.samples, prefill, share)[1]
            for name, value in ((key, wall), (f"cpu_{key}", cpu), (f"prefill_{key}", p_cpu)):
                times.setdefault(name, []).append(value)
        same = same and outs["shared"].completions() == outs["repeated"].completions()  # type: ignore[attr-defined]
    med = {k: bu.median(v) for k, v in times.items()}
    result = {
        "model": a.model_size,
        "prompts": a.prompts,
        "samples": a.samples,
        "prompt_tokens_mean": sum(lengths) / len(lengths),
        "new_tokens": a.new_tokens,
        "reps": a.reps,
        "wall_seconds_shared": med["shared"],
        "wall_seconds_repeated": med["repeated"],
        "cpu_seconds_shared": med["cpu_shared"],
        "cpu_seconds_repeated": med["cpu_repeated"],
        "speedup": med["cpu_repeated"] / med["cpu_shared"],
        "speedup_wall": med["repeated"] / med["shared"],
        "prefill_cpu_seconds_shared": med["prefill_shared"],
        "prefill_cpu_seconds_repeated": med["prefill_repeated"],
        "prefill_share_of_repeated": med["prefill_repeated"] / med["cpu_repeated"],
        "same_tokens": same,
        "machine": bu.machine_info(),
    }
    rows = [
        ["one prefill per prompt", med["cpu_shared"], med["shared"], med["prefill_shared"]],
        ["one prefill per sample", med["cpu_repeated"], med["repeated"], med["prefill_repeated"]],
    ]
    table = bu.md_table(["mode", "generate CPU s", "generate wall s", "prefill alone CPU s"], rows)
    print(table)
    print(
        f"speedup {result['speedup']:.2f}x (CPU time; wall {result['speedup_wall']:.2f}x), same tokens: {same}"
    )
    if not a.quick:
        bu.save_results("rollout_prefill", result, table)
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}))


if __name__ == "__main__":
    main()
