"""ProcessBench-style metrics of an implicit reward model's process rewards on the arithmetic task.

    python benchmarks/implicit_processbench.py --folder W/rm-…-implicit0.1/final

The implicit RM (`preftune train rm --head implicit`, e.g. from benchmarks/rm_best_of_n.py --head
implicit) is read as a PRM (Yuan et al. 2024, Proposition 3.1): each line of a solution is valued
by q_θ at its end (`--step-value q`) or by its own process reward q_θ^{e_k} − q_θ^{e_{k−1}}
(`delta`), and the first line below τ is the predicted first error. Items: the 600 test items of
benchmarks/prm_processbench.py (`processbench_from_task(600, level=2, seed=2)`: reference solutions,
half with one number changed), τ on their dev third, metrics on the rest. Prints one JSON line per
step value with the process CPU seconds. One thread.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
from pathlib import Path


def main() -> None:
    import torch

    from preftune.reward.processbench import evaluate_prm_folder, processbench_from_task

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", required=True, help="OUT/final of preftune train rm/prm --head implicit")
    ap.add_argument("--step-value", default="q,delta", help="q, delta, or both comma-separated")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "test.jsonl"
        rows = processbench_from_task(600, level=2, seed=2)
        data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        for how in args.step_value.split(","):
            usage = resource.getrusage(resource.RUSAGE_SELF)
            c0 = usage.ru_utime + usage.ru_stime
            metrics = evaluate_prm_folder(args.folder, str(data), step_value=how)
            usage = resource.getrusage(resource.RUSAGE_SELF)
            cpu = usage.ru_utime + usage.ru_stime - c0
            print(json.dumps({"folder": args.folder, "step_value": how, **metrics, "cpu_s": round(cpu, 1)}))


if __name__ == "__main__":
    main()
