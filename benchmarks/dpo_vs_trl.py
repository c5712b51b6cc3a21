"""DPO training throughput and peak memory: preftune against TRL, side by side in one run.

    bash benchmarks/setup_bench_env.sh                       # once: .bench-venv with trl==1.16.*
    .bench-venv/bin/python benchmarks/dpo_vs_trl.py --quick  # a few minutes on 2 CPU cores
    .bench-venv/bin/python benchmarks/dpo_vs_trl.py          # the full measurement (docs/performance.md)

Same conditions on both sides: one Llama model (~19.5M parameters by default, vocab 32k, built
from a config and saved), the same tokenizer and text, float32, no gradient checkpointing,
`loss_type="sigmoid"` (= preftune `dpo`), the same β, lr (constant, no warmup), AdamW without
weight decay, gradient clipping at 1.0, batch and number of steps.

Sides (`--sides`): `trl` runs TRL with the settings of `--trl-variant` (default `best`: fused AdamW,
precomputed reference log-probs, `torch_compile=True`, one pair per forward with gradient
accumulation; `plain`: the settings of the first published tables, online reference model, unfused
AdamW, no compilation), `trl_gpu` runs TRL `best` with its GPU scoring path (the LM head on
completion tokens only; see dpo_children.py for how and why), `preftune` runs preftune with the
matching reference and optimizer (`best`: its reference cache and fused AdamW; `plain`: an online
reference model and the unfused AdamW), and `preftune_base` (not in the default sides) runs the same
with the speed levers of `--base-levers-off` switched off (dpo_children.levers_off): their
before/after in one run. `--base-levers-off` also takes the LM head's two settings, `keep=C` (the
kept-softmax budget in head-weight copies) and `chunk=N` (tokens per head chunk), so a candidate
setting runs side by side with the default.
The first step of every run (compilation for TRL `best`, the reference pass for preftune's cache) is
reported apart and never in the step time.

MFU counts executed FLOPs (flops.py): the matmuls each side actually runs, LM head included only on
the positions it scores, divided by the measured float32 matmul peak of the machine: "MFU
(executed)" in wall time (FLOP/s over the peak FLOP/s), "MFU (CPU time)" in process CPU time (FLOP
per CPU second of the step over the peak's FLOP per CPU second; other load on a shared machine moves
it far less). Data order is identical by construction: the training set holds exactly one batch
of pairs, so every optimizer step (= one epoch) sees the same pairs on both sides whatever either
sampler does (TRL additionally runs `train_sampling_strategy="sequential"`).

Every child runs with `OMP_WAIT_POLICY=PASSIVE` (bench_utils.child_env); the load average of the
machine is recorded before and after each child. Each side runs in its own fresh process; the order alternates between repetitions; the median over
repetitions is reported. Step time comes from one global torch optimizer post-step hook installed
identically in both processes: the mean interval between step ends after the first (warm-up) step,
so model loading and tokenization are never timed. Peak RSS is the child's ru_maxrss (wait4).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_utils as bu  # noqa: E402
import flops  # noqa: E402
from dpo_children import LEVERS, VARIANTS, child_peak, child_preftune, child_trl  # noqa: E402

SHAPES = {s.name: s for s in (bu.PROMPT_HEAVY, bu.BALANCED)}


# ---------------------------------------------------------------- parent


SIDES = ("trl", "trl_gpu", "preftune", "preftune_base")
DEFAULT_SIDES = ("trl", "trl_gpu", "preftune")


def summarise_run(
    res: dict[str, Any], batch: int, tokens_per_pair: float, step_flops: float
) -> dict[str, Any]:
    s_per_step, cpu_per_step, n = bu.steps_rate(res["stamps"], skip=1)
    pairs_s = batch / s_per_step
    return {
        "pairs_s": pairs_s,
        "tokens_s": pairs_s * tokens_per_pair,
        "s_per_step": s_per_step,
        "first_step_s": res["stamps"][0][0] - res["train_start"][0],
        "pairs_per_cpu_s": batch / cpu_per_step,
        "cpu_s_per_step": cpu_per_step,
        "timed_steps": n,
        "executed_flops_s": step_flops / s_per_step,
        "peak_rss_mb": res["peak_rss_mb"],
        "losses": res["losses"],
        "wall_s": res["wall_s"],
        "load_average": res["load_average"],
    }


def side_plan(
    side: str, a: argparse.Namespace, spec: bu.ModelSpec, pairs: list[list[int]]
) -> tuple[str, float]:
    """(child variant, executed FLOPs of one step) of a side."""
    if side.startswith("preftune"):
        variant = "plain" if a.trl_variant == "plain" else "best"
        off = a.base_levers_off.split(",") if side == "preftune_base" else []
        micro = next((int(x.split("=")[1]) for x in off if x.startswith("micro=")), None)
        micro = micro or (a.batch if variant == "plain" else 1)
        plain = variant == "plain"
        step = flops.preftune_step(
            spec, pairs, online_reference=plain, tree="tree" not in off, micro_pairs=micro
        )
        return variant, step
    variant = "gpu" if side == "trl_gpu" else a.trl_variant
    plain = variant == "plain"
    step = flops.trl_step(
        spec,
        pairs,
        micro_pairs=a.batch if plain else 1,
        online_reference=plain,
        response_only=variant == "gpu",
    )
    return variant, step


def measure_shape(
    shape: bu.Shape, a: argparse.Namespace, model_dir: Path, work: Path, spec: bu.ModelSpec
) -> dict[str, Any]:
    rows = bu.synth_pairs(shape.scaled(a.scale), a.batch, seed=a.seed + 1)
    data = bu.write_jsonl(rows, work / f"{shape.name}.jsonl")
    expected = [[p, c + 1, r + 1] for p, c, r in (row["_lengths"] for row in rows)]  # +1: EOS
    unique_tokens = sum(sum(x) for x in expected) / len(expected)  # prompt once + both responses
    longest = max(p + max(c, r) for p, c, r in expected)
    common = [
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--batch",
        str(a.batch),
        "--steps",
        str(a.steps),
    ]
    common += ["--lr", str(a.lr), "--beta", str(a.beta), "--seed", str(a.seed), "--optimizer", a.optimizer]
    plans = {side: side_plan(side, a, spec, expected) for side in a.sides}
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in a.sides}
    for rep in range(a.reps):
        order = list(a.sides) if rep % 2 == 0 else list(reversed(a.sides))
        for side in order:
            variant, step_flops = plans[side]
            child = "preftune" if side.startswith("preftune") else "trl"
            levers = ["--levers-off", a.base_levers_off] if side == "preftune_base" else []
            load0 = bu.load_average()
            res = bu.run_child(
                [__file__, "--child", child, "--trl-variant", variant, *levers, *common],
                timeout=a.child_timeout,
            )
            res["load_average"] = [load0, bu.load_average()]
            if res["lengths"] != expected:
                raise RuntimeError(
                    f"{side} tokenized {shape.name} differently from the data spec: "
                    f"{res['lengths'][:2]} vs {expected[:2]} (token-level control failed)"
                )
            runs[side].append(summarise_run(res, a.batch, unique_tokens, step_flops))
            print(
                f"  {shape.name} rep {rep + 1}/{a.reps} {side:8s} {runs[side][-1]['pairs_s']:.3f} pairs/s "
                f"peak {runs[side][-1]['peak_rss_mb']:.0f} MiB load {load0[0]}",
                file=sys.stderr,
                flush=True,
            )
    keys = ("pairs_s", "tokens_s", "pairs_per_cpu_s", "peak_rss_mb", "first_step_s", "executed_flops_s")
    med = {side: {k: bu.median([r[k] for r in rs]) for k in keys} for side, rs in runs.items()}
    out: dict[str, Any] = {
        "shape": asdict(shape),
        "tokens_per_pair": unique_tokens,
        "trl_tokens_run_per_pair": 2 * longest,
        "variants": {side: plans[side][0] for side in a.sides},
        "executed_flops_per_step": {side: plans[side][1] for side in a.sides},
        "runs": runs,
        "median": med,
        "ratios": {},
    }
    k = min([a.compare_steps] + [len(rs[0]["losses"]) for rs in runs.values()])
    out["first_losses"] = {side: rs[0]["losses"][:k] for side, rs in runs.items()}
    if "preftune" in runs:
        for other in (s for s in runs if s != "preftune"):
            paired = [p["pairs_s"] / t["pairs_s"] for p, t in zip(runs["preftune"], runs[other])]
            mp, mo = med["preftune"], med[other]
            out["ratios"][other] = {
                "speedup": mp["pairs_s"] / mo["pairs_s"],
                "speedup_paired_median": bu.median(paired),
                "speedup_cpu_time": mp["pairs_per_cpu_s"] / mo["pairs_per_cpu_s"],
                "speedup_best_of_reps": best_of(runs["preftune"], runs[other]),
                "memory_ratio": mp["peak_rss_mb"] / mo["peak_rss_mb"],
                "max_abs_loss_diff": max(
                    (abs(x - y) for x, y in zip(out["first_losses"][other], out["first_losses"]["preftune"])),
                    default=float("nan"),
                ),
            }
    return out


def best_of(mine: list[dict[str, Any]], other: list[dict[str, Any]]) -> float:
    """Speedup from each side's fastest repetition. Other load on a shared machine only ever slows
    a run down, so the least-disturbed repetition is the best estimate of the undisturbed speed."""
    return max(x["pairs_s"] for x in mine) / max(x["pairs_s"] for x in other)


LABELS = {
    "trl": "TRL {variant}",
    "trl_gpu": "TRL GPU path",
    "preftune": "preftune {variant}",
    "preftune_base": "preftune {variant}, base: {levers}",  # the results' base_levers_off
}


def render_table(res: dict[str, Any]) -> str:
    peak, levers = res["matmul_peak_flops"], res.get("base_levers_off") or "levers off"
    rows = []
    for name, r in res["shapes"].items():
        for side, m in r["median"].items():
            rows.append(
                [
                    name,
                    LABELS[side].format(variant=r["variants"][side], levers=levers),
                    m["pairs_s"],
                    m["tokens_s"],
                    m["pairs_per_cpu_s"],
                    m["first_step_s"],
                    round(m["peak_rss_mb"]),
                    m["executed_flops_s"] / 1e9,
                    m["executed_flops_s"] / peak,
                    mfu_cpu(r, side, res["batch"], res.get("matmul_peak_cpu_flops")),
                    ", ".join(f"{x:.4f}" for x in r["first_losses"][side]),
                ]
            )
    head = ["shape", "side", "pairs/s", "tokens/s", "pairs/CPU-s", "first step s", "peak RSS MiB"]
    head += ["executed GFLOP/s", "MFU (executed)", "MFU (CPU time)", "first losses"]
    ratios = [
        [
            n,
            LABELS[o].format(variant=r["variants"][o], levers=levers),
            x["speedup"],
            x["speedup_paired_median"],
        ]
        + [x["speedup_cpu_time"], x["speedup_best_of_reps"], x["memory_ratio"], x["max_abs_loss_diff"]]
        for n, r in res["shapes"].items()
        for o, x in r["ratios"].items()
    ]
    rhead = ["shape", "preftune vs", "speedup (median pairs/s)", "speedup (paired median)"]
    rhead += ["speedup (CPU time)", "speedup (best of reps)", "memory ratio", "max abs loss diff"]
    loads = [
        lv[0]
        for r in res["shapes"].values()
        for rs in r["runs"].values()
        for x in rs
        for lv in x["load_average"]
    ]
    return (
        f"{bu.md_table(head, rows)}\n\n{bu.md_table(rhead, ratios)}\n\n"
        f"Command: `{res['command']}`; {res['reps']} repetitions × {res['steps']} steps of {res['batch']} pairs, "
        f"model {res['params']['total'] / 1e6:.1f}M params; matmul peak {peak / 1e9:.1f} GFLOP/s "
        f"({res.get('matmul_peak_cpu_flops', float('nan')) / 1e9:.1f} GFLOP per CPU-s), "
        f"{res['machine'].get('torch_threads')} thread(s) per child; "
        f"1-min load average {min(loads, default=0):.2f}–{max(loads, default=0):.2f} "
        f"(OMP_WAIT_POLICY={res['machine'].get('omp_wait_policy')}). First step: compilation (TRL best), "
        f"reference pass (preftune cache), never timed.\n"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", choices=["trl", "preftune", "peak"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--levers-off", default="", help=argparse.SUPPRESS)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="8M model, lengths x0.25, 2 reps x 3 steps x 2 pairs: a few minutes",
    )
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="2M model, tiny lengths, one shape, 1 rep x 2 steps: seconds, code paths only",
    )
    ap.add_argument("--model-size", choices=sorted(bu.MODELS), default="20m")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every sequence length (quick: 0.25)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per run (the first is not timed)")
    ap.add_argument("--batch", type=int, default=2, help="pairs per optimizer step")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--trl-variant",
        choices=VARIANTS,
        default="best",
        help="TRL settings: best (fused AdamW, precomputed reference, torch_compile, accumulation) or plain "
        "(the first published tables); preftune runs the matching reference and optimizer",
    )
    ap.add_argument(
        "--optimizer",
        choices=["unfused", "fused"],
        default="unfused",
        help="AdamW of the plain variant on both sides: unfused (torch foreach) or fused",
    )
    ap.add_argument(
        "--sides", default=",".join(DEFAULT_SIDES), help=f"comma-separated subset of {','.join(SIDES)}"
    )
    ap.add_argument("--shapes", default="prompt_heavy,balanced")
    ap.add_argument(
        "--base-levers-off",
        default=",".join(LEVERS),
        help=f"levers the preftune_base side switches off (comma-separated: {','.join(LEVERS)}), or sets: "
        "keep=C (kept softmax within C head-weight copies), chunk=N (LM head N tokens at a time), "
        "micro=N (pairs per forward), mmap=M (glibc mmap threshold, MiB)",
    )
    ap.add_argument("--compare-steps", type=int, default=3, help="first losses compared between sides")
    ap.add_argument("--peak-seconds", type=float, default=3.0)
    ap.add_argument("--child-timeout", type=float, default=1800.0)
    ap.add_argument("--name", default=None, help="results file stem (default dpo_vs_trl[_quick|_smoke])")
    ap.add_argument(
        "--render", metavar="JSON", help="only re-render the markdown table of a saved results file"
    )
    a = ap.parse_args(argv)
    if not a.child:
        a.sides = [s for s in a.sides.split(",") if s]
        if not a.sides or set(a.sides) - set(SIDES):
            ap.error(f"--sides {','.join(a.sides)}: choose from {','.join(SIDES)}")
    if a.quick:
        a.reps, a.steps, a.batch, a.scale, a.model_size = 2, 3, 2, 0.25, "quick"
    if a.smoke:
        a.reps, a.steps, a.batch, a.scale, a.model_size, a.peak_seconds = 1, 2, 2, 0.05, "tiny", 0.2
        a.shapes = "prompt_heavy"
    return a


def _peak_pair(res: dict[str, Any]) -> tuple[float, float]:
    return float(res["flops"]), float(res["cpu_flops"])


def mfu_cpu(r: dict[str, Any], side: str, batch: int, cpu_peak: float | None) -> float:
    """Executed FLOPs per process CPU second over the matmul peak per CPU second (NaN without it)."""
    if not cpu_peak:
        return float("nan")
    return r["executed_flops_per_step"][side] * r["median"][side]["pairs_per_cpu_s"] / batch / cpu_peak


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.render:
        path = Path(a.render)
        res = json.loads(path.read_text())
        bu.save_results(path.stem, res, render_table(res))
        return 0
    if a.child:
        fn = {"trl": child_trl, "preftune": child_preftune, "peak": child_peak}[a.child]
        out = fn(a)
        out["peak_rss_self_mb"] = bu.peak_rss_self_mb()
        print(json.dumps(out))
        return 0
    spec = bu.MODELS[a.model_size]
    params = bu.param_counts(spec)
    t0 = time.time()
    bu.RESULTS_DIR.joinpath("tmp").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=bu.RESULTS_DIR / "tmp") as tmp:
        work = Path(tmp)
        model_dir = bu.save_model(spec, work / "model", seed=a.seed)
        peak_cmd = [__file__, "--child", "peak", "--peak-seconds", str(a.peak_seconds)]
        measure_peak = (lambda: bu.matmul_peak(seconds=a.peak_seconds)) if a.smoke else None
        peak0 = measure_peak() if measure_peak else _peak_pair(bu.run_child(peak_cmd))
        shapes = {}
        for name in a.shapes.split(","):
            print(f"[dpo_vs_trl] {name}", file=sys.stderr, flush=True)
            shapes[name] = measure_shape(SHAPES[name], a, model_dir, work, spec)
        peak1 = measure_peak() if measure_peak else _peak_pair(bu.run_child(peak_cmd))
    res = {
        "command": "python benchmarks/dpo_vs_trl.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": bu.machine_info(),
        "model": asdict(spec),
        "params": params,
        "reps": a.reps,
        "steps": a.steps,
        "batch": a.batch,
        "lr": a.lr,
        "beta": a.beta,
        "trl_variant": a.trl_variant,
        "base_levers_off": a.base_levers_off if "preftune_base" in a.sides else "",
        "matmul_peak_flops": max(peak0[0], peak1[0]),
        "matmul_peak_flops_each": [peak0[0], peak1[0]],
        "matmul_peak_cpu_flops": max(peak0[1], peak1[1]),
        "shapes": shapes,
        "elapsed_s": time.time() - t0,
    }
    stem = a.name or ("dpo_vs_trl_smoke" if a.smoke else "dpo_vs_trl_quick" if a.quick else "dpo_vs_trl")
    jp, _ = bu.save_results(stem, res, render_table(res), quick=a.quick or a.smoke)
    print(render_table(res), file=sys.stderr)
    print(f"[dpo_vs_trl] results: {jp}", file=sys.stderr)
    headline: dict[str, Any] = {}
    for n, r in shapes.items():
        for other, x in r["ratios"].items():
            for key in ("speedup", "speedup_best_of_reps", "memory_ratio", "max_abs_loss_diff"):
                headline[f"{key}_{n}_vs_{other}"] = round(x[key], 4)
        headline.update(
            {
                f"mfu_{n}_{s}": round(m["executed_flops_s"] / res["matmul_peak_flops"], 3)
                for s, m in r["median"].items()
            }
        )
    headline["elapsed_s"] = round(res["elapsed_s"], 1)
    print(json.dumps(headline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
