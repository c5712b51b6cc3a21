"""One AdamW step over a model's parameters: the fused kernel (preftune's default) against `foreach`.

    .venv/bin/python benchmarks/optimizer_step.py [--model-size 45m] [--reps 7] [--threads 1]

The parameter shapes are those of a `bench_utils.MODELS` Llama (float32), each with a random gradient;
both implementations step the same tensors, interleaved, after one warm-up step each. Reported: the
median seconds per step of each over `--reps` and their ratio, and the largest difference between the
two updates of one step from the same state (they agree up to float rounding).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_utils as bu  # noqa: E402


def shapes(spec: bu.ModelSpec) -> list[tuple[int, ...]]:
    h, f, v = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    kv = h * spec.num_kv_heads // spec.num_heads
    layer = [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f), (h,), (h,)]
    head = [] if spec.tie_word_embeddings else [(v, h)]
    return [(v, h), *layer * spec.num_layers, (h,), *head]


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-size", default="45m", choices=sorted(bu.MODELS))
    p.add_argument("--reps", type=int, default=7, help="timed steps of each implementation")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--name", default="optimizer_step", help="results file name under benchmarks/results/")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    spec = bu.MODELS[a.model_size]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes(spec)]
    grads = [torch.randn_like(q) for q in params]
    optimizers = {
        kind: torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, **{kind: True})
        for kind in ("fused", "foreach")
    }
    for q, g in zip(params, grads):
        q.grad = g
    # the same step from the same state: the two updates agree up to rounding
    start = [q.detach().clone() for q in params]
    updates = {}
    for kind, opt in optimizers.items():
        for q, s0 in zip(params, start):
            q.data.copy_(s0)
        opt.step()
        updates[kind] = [q.detach() - s0 for q, s0 in zip(params, start)]
    diff = max(float((x - y).abs().max()) for x, y in zip(updates["fused"], updates["foreach"]))
    times: dict[str, list[float]] = {k: [] for k in optimizers}
    for _ in range(a.reps):
        for kind, opt in optimizers.items():
            t0 = time.perf_counter()
            opt.step()
            times[kind].append(time.perf_counter() - t0)
    fused, foreach = bu.median(times["fused"]), bu.median(times["foreach"])
    n = sum(q.numel() for q in params)
    table = (
        f"# One AdamW step: fused vs foreach\n\n`python benchmarks/optimizer_step.py --model-size {a.model_size} "
        f"--reps {a.reps} --threads {a.threads}`; {n / 1e6:.1f}M float32 parameters; median of {a.reps} "
        f"interleaved steps each; largest difference between the two updates of one step: {diff:.1e}.\n\n"
        + bu.md_table(
            ["AdamW", "s / step", "vs foreach"],
            [["foreach", f"{foreach:.4f}", "1.00×"], ["fused", f"{fused:.4f}", f"{fused / foreach:.2f}×"]],
        )
    )
    data = {"machine": bu.machine_info(), "args": vars(a), "times": times, "update_max_diff": diff}
    jp, mp = bu.save_results(a.name, data, table)
    print(table)
    print(f"wrote {jp} and {mp}")


if __name__ == "__main__":
    main()
