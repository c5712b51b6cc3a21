"""Per-process memory of data parallel vs FSDP2 (`fsdp: true`), same run, 2 processes on CPU (gloo).

    .venv/bin/python benchmarks/fsdp_memory.py [--model-size 45m] [--steps 4] [--reps 1]

Each mode runs `torchrun --nproc_per_node 2` of this file in worker mode, which calls
`preftune.train.api.train` (DPO, the shared benchmark settings of `bench_utils.preftune_config`) and
records, per process:

- `state_mib`: bytes of the tensors training keeps — parameters, gradients and optimizer state, this
  process's part only (the local shard of a sharded tensor) — counted after the first optimizer step;
- `rss_first_step_mib`, `rss_last_step_mib`: resident memory at the first and last optimizer step;
- `peak_rss_mib`: the process's peak resident memory (ru_maxrss), which also counts the interpreter,
  activations, the whole model each process loads before sharding it, and the whole weights rank 0
  gathers to write the final checkpoint (the allocator need not return freed memory to the system);
- `s_per_step`: wall time per optimizer step after the first (a noisy figure on a shared machine).

On a GPU the same comparison is torch.cuda.max_memory_allocated; this CPU run measures what sharding
saves of the training state, which is the part that grows with the model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_utils as bu  # noqa: E402


def local_bytes(t: Any) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return int(local.numel() * local.element_size())


def worker(a: argparse.Namespace) -> None:
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from preftune.train.api import train

    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    state: dict[str, float] = {}

    def measure(optimizer: Any, *_: Any) -> None:
        state["rss_last_step_mib"] = bu.rss_mb()
        if "params_mib" in state:
            return
        state["rss_first_step_mib"] = state["rss_last_step_mib"]
        params = [p for g in optimizer.param_groups for p in g["params"]]
        state["params_mib"] = sum(local_bytes(p) for p in params) / 2**20
        state["grads_mib"] = sum(local_bytes(p.grad) for p in params if p.grad is not None) / 2**20
        state["optimizer_mib"] = (
            sum(local_bytes(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
            / 2**20
        )

    register_optimizer_step_post_hook(measure)
    stamps = bu.install_step_clock()
    config = bu.preftune_config(
        model=a.model,
        data=a.data,
        out=a.out,
        steps=a.steps,
        batch=a.batch,
        micro_batch_size=a.micro,
        fsdp=a.mode == "fsdp",
        cache_dir=a.cache,
    )
    train(config)
    wall, _cpu, _n = bu.steps_rate([list(s) for s in stamps], skip=1)
    result = {
        "rank": rank,
        **state,
        "state_mib": state["params_mib"] + state["grads_mib"] + state["optimizer_mib"],
        "peak_rss_mib": bu.peak_rss_self_mb(),
        "s_per_step": wall,
    }
    Path(a.report).with_suffix(f".rank{rank}.json").write_text(json.dumps(result))


def run_mode(mode: str, a: argparse.Namespace, work: Path, rep: int) -> list[dict[str, Any]]:
    report = work / f"{mode}-{rep}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(29600 + rep * 2 + (mode == "fsdp")), __file__, "--worker", "--mode", mode]
    cmd += ["--model", str(a.model), "--data", str(a.data), "--out", str(work / f"run-{mode}-{rep}")]
    cmd += ["--cache", str(work / "cache"), "--report", str(report), "--steps", str(a.steps)]
    cmd += ["--batch", str(a.batch), "--micro", str(a.micro)]
    env = bu.child_env(OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return [json.loads(report.with_suffix(f".rank{r}.json").read_text()) for r in range(2)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["ddp", "fsdp"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    p.add_argument(
        "--model-size", default="45m", choices=sorted(bu.MODELS), help="model (bench_utils.MODELS)"
    )
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per run")
    p.add_argument("--batch", type=int, default=8, help="global batch (pairs)")
    p.add_argument("--micro", type=int, default=2, help="pairs per forward per process")
    p.add_argument("--pairs", type=int, default=32, help="training pairs")
    p.add_argument("--reps", type=int, default=1, help="repetitions of each mode (interleaved)")
    p.add_argument("--name", default="fsdp_memory", help="results file name under benchmarks/results/")
    a = p.parse_args()
    if a.worker:
        worker(a)
        return
    spec = bu.MODELS[a.model_size]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        a.model = bu.save_model(spec, work / "model")
        shape = bu.BALANCED.scaled(0.5)
        a.data = bu.write_jsonl(bu.synth_pairs(shape, a.pairs, seed=0), work / "pairs.jsonl")
        runs: dict[str, list[list[dict[str, Any]]]] = {"ddp": [], "fsdp": []}
        t0 = time.perf_counter()
        for rep in range(a.reps):
            for mode in ("ddp", "fsdp"):
                runs[mode].append(run_mode(mode, a, work, rep))
                print(f"rep {rep} {mode}: {runs[mode][-1]}", flush=True)
    keys = ["params_mib", "grads_mib", "optimizer_mib", "state_mib"]
    keys += ["rss_first_step_mib", "rss_last_step_mib", "peak_rss_mib", "s_per_step"]
    med = {
        mode: {k: bu.median([r[k] for rep in reps for r in rep]) for k in keys} for mode, reps in runs.items()
    }
    rows = [
        [k, f"{med['ddp'][k]:.1f}", f"{med['fsdp'][k]:.1f}", f"{med['fsdp'][k] / med['ddp'][k]:.2f}×"]
        for k in keys
    ]
    counts = bu.param_counts(spec)
    table = (
        f"# Data parallel vs FSDP2, 2 processes on CPU (gloo)\n\n"
        f"`python benchmarks/fsdp_memory.py --model-size {a.model_size} --steps {a.steps} --reps {a.reps}`; "
        f"Llama {counts['total'] / 1e6:.1f}M parameters (float32, AdamW), DPO, batch {a.batch}, micro-batch "
        f"{a.micro}, {a.steps} steps, sequences ~{shape.prompt[1] + shape.response[1]} tokens. Per process, "
        f"median over both ranks and {a.reps} repetition(s); {time.perf_counter() - t0:.0f} s in all.\n\n"
        + bu.md_table(["per process", "data parallel", "fsdp", "fsdp / dp"], rows)
    )
    data = {
        "machine": bu.machine_info(),
        "args": vars(a) | {"model": None, "data": None},
        "runs": runs,
        "median": med,
    }
    jp, mp = bu.save_results(a.name, data, table)
    print(table)
    print(f"wrote {jp} and {mp}")


if __name__ == "__main__":
    main()
