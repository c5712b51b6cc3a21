"""The trunk of a reward model / PRM on the arithmetic task: the quickstart's tiny Llama, SFT'd on.

    python benchmarks/verifier_trunk.py --out /tmp/trunk

The quickstart's SFT model stops at ~50 % greedy accuracy on purpose (a policy with room to improve);
a reward model that must check the column arithmetic needs a trunk that knows it. This is the same
model (96 × 3, level 2, seed 0) and the same loss on freshly drawn reference solutions, run on to
95 % greedy accuracy on its check prompts (`preftune.tasks.sft.verifier_trunk_config`), never
training on the held-out prompts of the reward-model benchmarks (benchmarks/rm_best_of_n.py: 1000
prompts of seed 777) nor the ProcessBench-style test items (benchmarks/prm_processbench.py: 600
items of seed 2). Prints one JSON line: the accuracy checks (step, greedy accuracy), the steps run,
the process CPU seconds (user + sys) and wall seconds, and the greedy accuracy on the 1000 held-out
prompts. One thread.

`--quick` (the test suite's smoke run, a few seconds): 4 steps of 8 problems with a check at steps 2
and 4 on 4 check prompts, held-out accuracy on the first 8 held-out prompts; only the `--out` folder
is written.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from dataclasses import replace
from pathlib import Path


def held_out_prompts() -> set[str]:
    """The prompts no trunk may train on: the RM benchmark's held-out prompts and the PRM's test items."""
    from preftune.reward.processbench import processbench_from_task
    from preftune.tasks.arithmetic import ArithmeticTask

    held = {p.prompt for p in ArithmeticTask(level=2).problems(1000, seed=777)}
    return held | {r["problem"] for r in processbench_from_task(600, level=2, seed=2)}


def main() -> None:
    import torch

    from preftune.tasks.arithmetic import ArithmeticTask
    from preftune.tasks.quickstart import evaluate_accuracy
    from preftune.tasks.sft import train_sft, verifier_trunk_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder of the trunk (a causal-LM folder)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="4 steps, 8 held-out prompts (a smoke run)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    task = ArithmeticTask(level=2)
    t0, c0 = time.time(), resource.getrusage(resource.RUSAGE_SELF)
    config = verifier_trunk_config(args.seed)
    if args.quick:
        config = replace(config, steps=4, batch_size=8, warmup_steps=2, check_from=2, check_every=2,
                         check_prompts=4)  # fmt: skip
    result = train_sft(task, Path(args.out), config, exclude_prompts=held_out_prompts())
    c1 = resource.getrusage(resource.RUSAGE_SELF)
    held = [p.prompt for p in task.problems(1000, seed=777)][: 8 if args.quick else None]
    accuracy = evaluate_accuracy(Path(args.out), task, held)
    print(json.dumps({"checks": result.checks, "steps": result.steps, "heldout_greedy": accuracy,
                      "heldout_prompts": len(held),
                      "cpu_s": round(c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime, 1),
                      "wall_s": round(time.time() - t0, 1)}))  # fmt: skip


if __name__ == "__main__":
    main()
