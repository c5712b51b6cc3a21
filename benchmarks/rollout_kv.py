"""Rollout decoding with the KV cache written into reserved room (`preftune.generation.reserve_kv`)
against transformers' concatenating dynamic cache, on a random Llama (float32, CPU).

    .venv/bin/python benchmarks/rollout_kv.py [--quick] [--model-size 20m] [--prompts 4] [--samples 8]
        [--prompt-len 250] [--new-tokens 64] [--reps 3] [--threads 1] [--name NAME]

Both modes run `preftune.rl.RolloutEngine.generate` (one prefill per prompt, its cache repeated for
the samples) on the same prompts with the same seed, in interleaved repetitions; reported are the
medians of each call's CPU seconds (with one thread, what the call costs whatever else runs on the
machine) and wall seconds, their ratio, and whether both modes sampled the same tokens with the same
log-probs (bit for bit). EOS is an id the model never picks, so every completion has `--new-tokens`
tokens. `--quick` (16 new tokens, one repetition) prints a JSON line and writes nothing; full runs
write benchmarks/results/NAME.* (default rollout_kv).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_utils as bu  # noqa: E402
from rollout_prefill import setup  # noqa: E402


def timed(
    engine: object, prompts: list[list[int]], n: int, sampling: object, reserve: bool
) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process, rollouts) of one call in the given mode."""
    import preftune.generation as generation

    generation._RESERVE_KV = reserve
    t0, c0 = time.perf_counter(), time.process_time()
    out = engine.generate(prompts, n, sampling)  # type: ignore[attr-defined]
    return time.perf_counter() - t0, time.process_time() - c0, out


def main(argv: list[str] | None = None) -> int:
    import preftune.generation as generation

    try:
        return _main(argv)
    finally:
        generation._RESERVE_KV = True


def _main(argv: list[str] | None) -> int:
    import torch

    from preftune.rl import Sampling

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="16 new tokens, 1 repetition, JSON line, no files")
    p.add_argument("--model-size", default="20m", choices=sorted(bu.MODELS))
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=250, help="prompt lengths drawn from ±10%% of this")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="rollout_kv", help="results file stem")
    a = p.parse_args(argv)
    if a.quick:
        a.new_tokens, a.reps = 16, 1
    torch.set_num_threads(a.threads)
    model, prompts, engine = setup(a.model_size, a.prompts, a.samples, a.prompt_len)
    lengths = [len(p) for p in prompts]
    sampling = Sampling(max_new_tokens=a.new_tokens, temperature=1.0, seed=0)
    load = [bu.load_average()[0]]
    timed(engine, prompts[:1], 2, Sampling(max_new_tokens=4, temperature=1.0, seed=0), True)  # warm-up
    times: dict[str, list[float]] = {}
    same = True
    for rep in range(a.reps):
        outs = {}
        for reserve in (True, False) if rep % 2 == 0 else (False, True):
            key = "reserved" if reserve else "concatenated"
            wall, cpu, outs[key] = timed(engine, prompts, a.samples, sampling, reserve)
            times.setdefault(f"wall_{key}", []).append(wall)
            times.setdefault(f"cpu_{key}", []).append(cpu)
        r, c = outs["reserved"], outs["concatenated"]
        same = same and torch.equal(r.completion_ids, c.completion_ids) and torch.equal(r.logps, c.logps)  # type: ignore[attr-defined]
        load.append(bu.load_average()[0])
    med = {k: bu.median(v) for k, v in times.items()}
    result = {
        "model": a.model_size,
        "params": sum(x.numel() for x in model.parameters()),  # type: ignore[attr-defined]
        "prompts": a.prompts,
        "samples": a.samples,
        "prompt_tokens_mean": sum(lengths) / len(lengths),
        "new_tokens": a.new_tokens,
        "reps": a.reps,
        "threads": a.threads,
        **{f"{k}_seconds": v for k, v in med.items()},
        "speedup": med["cpu_concatenated"] / med["cpu_reserved"],
        "speedup_wall": med["wall_concatenated"] / med["wall_reserved"],
        "same_tokens_and_logps": same,
        "load_average": [min(load), max(load)],
        "machine": bu.machine_info(),
    }
    rows = [
        ["reserved (preftune)", med["cpu_reserved"], med["wall_reserved"]],
        ["concatenated (transformers' DynamicCache)", med["cpu_concatenated"], med["wall_concatenated"]],
    ]
    table = bu.md_table(["KV cache", "generate CPU s (median)", "generate wall s (median)"], rows)
    command = "python benchmarks/rollout_kv.py " + " ".join(argv if argv is not None else sys.argv[1:])
    note = (
        f"\n\n{a.prompts} prompts × {a.samples} samples, prompt {result['prompt_tokens_mean']:.0f} tokens "
        f"(mean), {a.new_tokens} new tokens, model {result['params'] / 1e6:.1f}M params, {a.threads} "
        f"thread(s), {a.reps} interleaved repetitions; speedup {result['speedup']:.2f}× CPU time "
        f"({result['speedup_wall']:.2f}× wall); same tokens and log-probs: {same}; 1-min load "
        f"{min(load):.2f}–{max(load):.2f}. Command: `{command.strip()}`."
    )
    print(table + note)
    if not a.quick:
        bu.save_results(a.name, result, table + note)
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
