"""LM-head log-probs, forward + backward: the hand-written backward against chunk checkpointing.

    .venv/bin/python benchmarks/head_logps.py [--tokens 1100] [--hidden 256] [--reps 7] [--threads 2]

`lse`: `preftune.models.head_logps.HeadLogps` with no probabilities kept: forward keeps each token's
log-sum-exp, backward recomputes each chunk's logits once and turns them into their gradient in
place. `lse_logsumexp`: `lse` as it was before forward formed the log-sum-exp in the logits buffer (torch's
`logsumexp`, a second `[chunk, V]` buffer). `keep`: the same function keeping every chunk's softmax from forward (`keep_bytes` large
enough), so backward recomputes nothing: 3 head matmuls per token instead of 4, for 4·vocab bytes per
token held from forward to backward. `checkpoint`: the previous path, `log_softmax +
gather` per chunk under `torch.utils.checkpoint` (backward re-runs the chunk, then autograd's
gather and log_softmax backward). Same data, same chunks; the paths are timed interleaved in one
process (median of `--reps`), CPU time beside wall time, and their values and gradients compared.
The defaults are a balanced DPO step of the 19.5M benchmark model: 2 pairs × 2 responses of ~270
tokens through a 32k × 256 head.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_utils as bu  # noqa: E402


def _paths(hidden: Any, targets: Any, head: Any, transform: Any, size: int) -> dict[str, Callable[[], Any]]:
    """The three LM-head log-prob paths compared: log-sum-exp recompute, kept softmax, checkpointed chunks."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from preftune.models.head_logps import HeadLogps
    from preftune.models.logprobs import _chunk_logps

    def lse() -> torch.Tensor:
        out: torch.Tensor = HeadLogps.apply(hidden, targets, head.weight, 1.0, size, 0)
        return out

    def lse_logsumexp() -> torch.Tensor:  # `lse` before its log-sum-exp was formed in the logits buffer
        import preftune.models.head_logps as hl

        hl._LSE_IN_PLACE = False
        try:
            out: torch.Tensor = HeadLogps.apply(hidden, targets, head.weight, 1.0, size, 0)
        finally:
            hl._LSE_IN_PLACE = True
        return out

    def keep() -> torch.Tensor:
        out: torch.Tensor = HeadLogps.apply(hidden, targets, head.weight, 1.0, size, 1 << 62)
        return out

    def ckpt() -> torch.Tensor:
        outs = [
            checkpoint(
                _chunk_logps,
                hidden[s : s + size],
                targets[s : s + size],
                head,
                transform,
                use_reentrant=False,
            )
            for s in range(0, len(targets), size)
        ]
        return torch.cat(outs)

    return {"lse": lse, "lse_logsumexp": lse_logsumexp, "keep": keep, "checkpoint": ckpt}


def main(argv: list[str] | None = None) -> int:
    import torch

    from preftune.models.logprobs import LogitTransform

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1100, help="response tokens through the head")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--name", default="head_logps", help="results file stem under benchmarks/results/")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    head = torch.nn.Linear(a.hidden, a.vocab, bias=False)
    transform = LogitTransform(head)  # no scaling attributes: identity
    hidden = torch.randn(a.tokens, a.hidden, requires_grad=True)
    targets = torch.randint(0, a.vocab, (a.tokens,))
    size = max(16, (1 << 22) // a.vocab)

    paths = _paths(hidden, targets, head, transform, size)
    grads: dict[str, list[torch.Tensor]] = {}
    for name, fn in paths.items():  # warm-up, and the numbers compared
        out = fn()
        grads[name] = [out.detach(), *torch.autograd.grad(out.sum() * 0.5, [hidden, head.weight])]
    diff = max(
        float((x - y).abs().max())
        for n in ("lse", "lse_logsumexp", "keep")
        for x, y in zip(grads[n], grads["checkpoint"])
    )
    times: dict[str, list[tuple[float, float]]] = {n: [] for n in paths}
    load0 = bu.load_average()
    for rep in range(a.reps):
        for name in list(paths)[rep % len(paths) :] + list(paths)[: rep % len(paths)]:  # each first in turn
            t0, c0 = time.perf_counter(), time.process_time()
            out = paths[name]()
            torch.autograd.grad(out.sum(), [hidden, head.weight])
            times[name].append((time.perf_counter() - t0, time.process_time() - c0))
    med = {n: (bu.median([t[0] for t in ts]), bu.median([t[1] for t in ts])) for n, ts in times.items()}
    res: dict[str, Any] = {
        "command": "python benchmarks/head_logps.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": bu.machine_info(),
        "load_average": [load0, bu.load_average()],
        "args": vars(a),
        "times": times,
        "median_wall_s": {n: m[0] for n, m in med.items()},
        "median_cpu_s": {n: m[1] for n, m in med.items()},
        "speedup_wall": med["checkpoint"][0] / med["lse"][0],
        "speedup_cpu": med["checkpoint"][1] / med["lse"][1],
        "keep_vs_lse_wall": med["lse"][0] / med["keep"][0],
        "keep_vs_lse_cpu": med["lse"][1] / med["keep"][1],
        "lse_in_place_vs_logsumexp_cpu": med["lse_logsumexp"][1] / med["lse"][1],
        "kept_bytes": a.tokens * a.vocab * 4,
        "max_abs_diff": diff,
    }
    rows = [
        [n, med[n][0], med[n][1], med["checkpoint"][1] / med[n][1]]
        for n in ("checkpoint", "lse_logsumexp", "lse", "keep")
    ]
    table = (
        f"{bu.md_table(['LM-head path', 'wall s (median)', 'CPU s (median)', 'speedup (CPU time)'], rows)}\n\n"
        f"Command: `{res['command']}`; {a.tokens} tokens × {a.vocab} vocab × {a.hidden} hidden, chunks of "
        f"{size}; {a.reps} interleaved repetitions; load average {load0} → {res['load_average'][1]}; "
        f"largest difference of values and gradients {diff:.1e}; `keep` holds "
        f"{res['kept_bytes'] / 2**20:.0f} MiB of probabilities from forward to backward.\n"
    )
    bu.save_results(a.name, res, table)
    print(table)
    print(json.dumps({k: res[k] for k in ("speedup_wall", "speedup_cpu", "keep_vs_lse_cpu", "max_abs_diff")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
