"""Reference cache: a sweep of 5 methods sharing one reference pass, against 5 independent runs.

    .bench-venv/bin/python benchmarks/ref_cache.py            # (or .venv/bin/python: no TRL needed)

Three ways to train the same 5 reference-based methods on the same model and data, each in its
own fresh process, total wall time (model loading included, as a user would pay it):

- `sweep_cache`:       `preftune.eval.sweep.run_sweep` with `reference="cache"` — the first method
                       computes the reference log-probs once and stores them; the other four reuse them.
- `independent_model`: 5 `train()` runs, each with a separate frozen reference model run online
                       every step (what TRL does without precomputation).
- `independent_cache`: 5 `train()` runs, each with its own empty cache (the reference pass is paid 5×).

All use the same hyper-parameters; the losses differ by method only. The figure compared is the sum
of the 5 `train()` calls (loading, reference pass, steps, final save); the process wall time, which
adds interpreter start-up and, for the sweep, one HTML report per run, is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_utils as bu  # noqa: E402

METHODS = ["dpo", "ipo", "cdpo", "hinge", "rdpo"]
MODES = ["sweep_cache", "independent_model", "independent_cache"]


def base_config(a: argparse.Namespace, out: Path) -> Any:
    return bu.preftune_config(model=a.model, data=a.data, out=out, steps=a.steps, batch=a.batch)


def child(a: argparse.Namespace) -> dict[str, Any]:
    import dataclasses

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = base_config(a, work / "runs")
        per_method: dict[str, float] = {}
        cache_use: dict[str, str] = {}
        t0 = time.perf_counter()
        if a.child == "sweep_cache":
            from preftune.eval.sweep import run_sweep

            base = dataclasses.replace(base, reference="cache", cache_dir=str(work / "cache"))
            res = run_sweep(METHODS, base, work / "runs", write=False, log=lambda _m: None)
            for r in res.results:
                if r.status != "ok":
                    raise RuntimeError(f"sweep: {r.method} failed: {r.error}")
                per_method[r.method], cache_use[r.method] = r.seconds, r.reference_cache
        else:
            from preftune.train.api import train

            for m in METHODS:
                ref: dict[str, Any] = (
                    {"reference": "model", "ref_model": a.model}
                    if a.child == "independent_model"
                    else {"reference": "cache", "cache_dir": str(work / f"cache-{m}")}
                )
                cfg = dataclasses.replace(base, method=m, out=str(work / "runs" / m), **ref)
                t1 = time.perf_counter()
                train(cfg)
                per_method[m] = time.perf_counter() - t1
        total = time.perf_counter() - t0
    # train_s: the 5 train() calls only (the sweep also writes an HTML report per run, not counted here)
    return {
        "mode": a.child,
        "train_s": sum(per_method.values()),
        "process_s": total,
        "per_method_s": per_method,
        "reference_cache": cache_use,
    }


def finish(res: dict[str, Any]) -> str:
    """Add the speedups to `res` (in place) and return the markdown table.

    `after_first`: the methods after the first one only. The first run of every mode also pays the
    process's one-off costs (lazy imports, allocator warm-up), which at these small sizes are as
    large as the reference pass itself; methods 2-5 show what the shared cache saves per method.
    """
    runs = res["runs"]
    for r in runs.values():
        r["train_s_after_first"] = sum(list(r["per_method_s"].values())[1:])
    for other in ("independent_model", "independent_cache"):
        for key, suffix in (("train_s", ""), ("train_s_after_first", "_after_first")):
            res[f"speedup_vs_{other}{suffix}"] = runs[other][key] / runs["sweep_cache"][key]
    rows = [
        [
            mode,
            r["train_s"],
            r["train_s_after_first"],
            r["wall_s"],
            round(r["peak_rss_mb"]),
            ", ".join(f"{m} {s:.1f}s" for m, s in r["per_method_s"].items()),
        ]
        for mode, r in runs.items()
    ]
    head = [
        "mode",
        "train s (5 methods)",
        "train s (methods 2-5)",
        "process wall s",
        "peak RSS MiB",
        "per method",
    ]
    return (
        bu.md_table(head, rows)
        + f"\n\nSweep speedup, all 5 methods: {res['speedup_vs_independent_model']:.2f}x over independent runs "
        f"with an online reference model, {res['speedup_vs_independent_cache']:.2f}x over independent runs each "
        f"filling its own cache; methods 2-5: {res['speedup_vs_independent_model_after_first']:.2f}x and "
        f"{res['speedup_vs_independent_cache_after_first']:.2f}x. Reference cache use in the sweep: "
        f"{runs['sweep_cache']['reference_cache']}. Command: `{res['command']}`.\n"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--model-size", choices=sorted(bu.MODELS), default="quick")
    ap.add_argument("--scale", type=float, default=0.5, help="multiply the prompt-heavy lengths")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--render", metavar="JSON", help="only re-render the table of a saved results file")
    a = ap.parse_args(argv)
    if a.render:
        res = json.loads(Path(a.render).read_text())
        bu.save_results("ref_cache", res, finish(res))
        return 0
    if a.child:
        print(json.dumps(child(a)))
        return 0
    spec = bu.MODELS[a.model_size]
    bu.RESULTS_DIR.joinpath("tmp").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=bu.RESULTS_DIR / "tmp") as tmp:
        work = Path(tmp)
        model = bu.save_model(spec, work / "model")
        data = bu.write_jsonl(
            bu.synth_pairs(bu.PROMPT_HEAVY.scaled(a.scale), a.pairs, seed=1), work / "d.jsonl"
        )
        runs = {}
        for mode in MODES:
            print(f"[ref_cache] {mode}", file=sys.stderr, flush=True)
            runs[mode] = bu.run_child(
                [
                    __file__,
                    "--child",
                    mode,
                    "--model",
                    str(model),
                    "--data",
                    str(data),
                    "--batch",
                    str(a.batch),
                    "--steps",
                    str(a.steps),
                ],
                timeout=3600,
            )
    res = {
        "command": "python benchmarks/ref_cache.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": bu.machine_info(),
        "model": spec,
        "params": bu.param_counts(spec),
        "methods": METHODS,
        "shape": bu.PROMPT_HEAVY.scaled(a.scale),
        "pairs": a.pairs,
        "batch": a.batch,
        "steps": a.steps,
        "runs": runs,
    }
    table = finish(res)
    bu.save_results("ref_cache", res, table)
    print(table, file=sys.stderr)
    print(json.dumps({k: round(v, 3) for k, v in res.items() if k.startswith("speedup")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
