"""Where a DPO step spends its time, per side: torch.profiler op table over a short run.

    .bench-venv/bin/python benchmarks/profile_step.py --side preftune --shape balanced --scale 0.25
    .bench-venv/bin/python benchmarks/profile_step.py --side trl --shape balanced --scale 0.25

Runs the same child as dpo_vs_trl.py (same model, data and settings) under `torch.profiler` and
prints the ops with the most self CPU time, plus the share of matmul-like ops (aten::mm / addmm /
bmm / linear backward) and of attention. The profile covers the whole train() call (loading is
cheap in op time). Results: benchmarks/results/profile_SIDE_SHAPE.txt (or under
$PREFTUNE_BENCH_RESULTS). The profile runs in this process: start it with OMP_WAIT_POLICY=PASSIVE
on a shared machine (the setting must be in place before torch loads).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_utils as bu  # noqa: E402
import dpo_children  # noqa: E402
import dpo_vs_trl  # noqa: E402

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")
ATTENTION = ("scaled_dot_product", "flash_attention", "_efficient_attention", "aten::_softmax")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", choices=["trl", "preftune"], required=True)
    ap.add_argument("--shape", choices=sorted(dpo_vs_trl.SHAPES), default="balanced")
    ap.add_argument("--model-size", choices=sorted(bu.MODELS), default="quick")
    ap.add_argument("--scale", type=float, default=0.25)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument(
        "--trl-variant", choices=dpo_children.VARIANTS, default="best", help="as in dpo_vs_trl.py"
    )
    ap.add_argument(
        "--optimizer", choices=["unfused", "fused"], default="unfused", help="as in dpo_vs_trl.py"
    )
    a = ap.parse_args(argv)
    from torch.profiler import ProfilerActivity, profile

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = bu.save_model(bu.MODELS[a.model_size], work / "model")
        rows = bu.synth_pairs(dpo_vs_trl.SHAPES[a.shape].scaled(a.scale), a.batch, seed=1)
        data = bu.write_jsonl(rows, work / "d.jsonl")
        ns = dpo_children.child_namespace(
            model=str(model),
            data=str(data),
            batch=a.batch,
            steps=a.steps,
            optimizer=a.optimizer,
            trl_variant=a.trl_variant,
        )
        fn = dpo_children.child_trl if a.side == "trl" else dpo_children.child_preftune
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn(ns)
    avg = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in avg)
    share = {
        "matmul": sum(e.self_cpu_time_total for e in avg if e.key in MATMUL) / total,
        "attention": sum(e.self_cpu_time_total for e in avg if any(k in e.key for k in ATTENTION)) / total,
    }
    table = avg.table(sort_by="self_cpu_time_total", row_limit=a.top)
    text = (
        f"side={a.side} variant={a.trl_variant} shape={a.shape} scale={a.scale} model={a.model_size} "
        f"batch={a.batch} steps={a.steps} load average {bu.load_average()}\nself-CPU share: matmul {share['matmul']:.1%}, attention {share['attention']:.1%}, "
        f"total self CPU {total / 1e6:.1f}s\n\n{table}\n"
    )
    bu.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (bu.RESULTS_DIR / f"profile_{a.side}_{a.shape}.txt").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
