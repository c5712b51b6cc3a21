"""An outcome RM on the quickstart policy's verifier-labelled samples: held-out accuracy and best-of-n.

    python benchmarks/rm_best_of_n.py --work /tmp/rm --trunk /tmp/trunk --steps 400 --lr 3e-4

The setting of tests/test_reward_rm_slow.py with the schedule as flags. The policy is the
quickstart's SFT model (level 2, seed 0, ~50 % greedy; trained once into WORK/policy and reused); it
samples 8 completions at temperature 1 for `--train-prompts` training prompts (seed 1) and `--n-max`
for 1000 held-out prompts (seed 777), cached in WORK. Pairs: a fully correct sample ≻ a wrong one of
the same prompt, both the policy's own (`build_pairs`, whole samples; up to `--pairs-per-prompt` per
training prompt, 2 per held-out prompt); `--flip F` swaps chosen and rejected of a seeded fraction F
of the training pairs (label noise). `preftune train rm` (bt) from `--trunk` (default: the policy
itself; benchmarks/verifier_trunk.py builds the verifier trunk), `--heads M` with `--aggregate`; then
the held-out pairwise accuracy and the best-of-n curve (n = 1, 2, 4, … `--n-max`, gold = the
verifier) of the policy's held-out samples, for a heads model under every aggregator. Prints one JSON
line with the training's process CPU seconds (user + sys). One thread.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
from pathlib import Path
from typing import Any


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def own_pairs(
    task: Any, prompts: list[str], samples: list[list[str]], per_prompt: int
) -> list[dict[str, Any]]:
    """Correct ≻ wrong pairs of whole samples whose chosen side is one of the policy's own samples."""
    from preftune.tasks.quickstart import build_pairs

    pairs, _, _ = build_pairs(task, prompts, samples, pairs_per_prompt=per_prompt, seed=0, rejected="full")
    sampled = dict(zip(prompts, (set(s) for s in samples)))
    return [r for r in pairs if r["chosen"] in sampled[r["prompt"]]]  # no reference solutions


def flipped(pairs: list[dict[str, Any]], fraction: float, seed: int = 0) -> list[dict[str, Any]]:
    """`pairs` with chosen and rejected swapped on a seeded `fraction` of them."""
    rng = random.Random(f"flip:{seed}")
    out = [dict(r) for r in pairs]
    for r in rng.sample(out, round(fraction * len(out))):
        r["chosen"], r["rejected"] = r["rejected"], r["chosen"]
    return out


def samples(work: Path, name: str, prompts: list[str], n: int, seed: int) -> list[list[str]]:
    """The policy's `n` samples (temperature 1) of each prompt, cached in WORK/name.json."""
    from preftune.tasks.arithmetic import ArithmeticTask
    from preftune.tasks.quickstart import sample_responses

    path = work / f"{name}.json"
    if not path.is_file():
        out = sample_responses(
            work / "policy", ArithmeticTask(level=2), prompts, num_samples=n, temperature=1.0, seed=seed
        )
        path.write_text(json.dumps(out), encoding="utf-8")
    return json.loads(path.read_text(encoding="utf-8"))


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def best_of_n(folder: Path, held: list[str], held_samples: list[list[str]], heads: int) -> dict[str, Any]:
    """Best-of-n curves of the RM in `folder` on the held-out samples (per aggregator for M heads)."""
    import torch

    from preftune.reward.best_of_n import best_of_n_curve, curve_points
    from preftune.reward.ensemble import AGGREGATORS, aggregate
    from preftune.reward.model_reward import RewardModelFn
    from preftune.tasks.arithmetic import ArithmeticTask

    task, n = ArithmeticTask(level=2), len(held_samples[0])
    gold = torch.tensor(
        [[task.reward(p, s) for s in ss] for p, ss in zip(held, held_samples)], dtype=torch.float64
    )
    flat = [p for p, ss in zip(held, held_samples) for _ in ss]
    completions = [s for ss in held_samples for s in ss]
    if (folder / "implicit.json").is_file():  # --head implicit: r = β log π_θ/π_ref
        from preftune.reward.implicit_reward import ImplicitRewardFn

        scores = ImplicitRewardFn(folder).outcome(flat, completions).double()
    else:
        scores = RewardModelFn(folder, heads=heads).scores(flat, completions).double()
    if heads == 1:
        return best_of_n_curve(scores.view(len(held), n), gold, curve_points(n))
    return {how: best_of_n_curve(aggregate(scores.T, how).view(len(held), n), gold, curve_points(n))
            for how in AGGREGATORS}  # fmt: skip


def main() -> None:
    import torch

    from preftune.cli import main as cli
    from preftune.tasks.arithmetic import ArithmeticTask
    from preftune.tasks.sft import SFTConfig, train_sft

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="folder for the policy, the samples, the data and the runs")
    ap.add_argument("--trunk", default=None, help="the RM's starting causal-LM folder (default: the policy)")
    ap.add_argument("--label", default="trunk", help="run-name suffix naming the trunk (with --trunk)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup-steps", type=int, default=0)
    ap.add_argument("--scheduler", default="linear")
    ap.add_argument("--train-prompts", type=int, default=4000)
    ap.add_argument("--pairs-per-prompt", type=int, default=4)
    ap.add_argument("--flip", type=float, default=0.0, help="fraction of training pairs with swapped labels")
    ap.add_argument("--heads", type=int, default=1)
    ap.add_argument("--n-max", type=int, default=8, help="samples per held-out prompt (best-of-n up to it)")
    ap.add_argument("--head", default="scalar", help="scalar, or implicit: r = β log π_θ/π_ref (with --beta)")
    ap.add_argument("--beta", type=float, default=0.05, help="β of --head implicit")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work, task = Path(args.work), ArithmeticTask(level=2)
    work.mkdir(parents=True, exist_ok=True)
    held = [p.prompt for p in task.problems(1000, seed=777)]
    if not (work / "policy" / "config.json").is_file():
        train_sft(task, work / "policy", SFTConfig(seed=0), exclude_prompts=set(held))
    prompts = [p.prompt for p in task.problems(args.train_prompts, seed=1, exclude=set(held))]
    train = own_pairs(
        task, prompts, samples(work, f"train{args.train_prompts}", prompts, 8, 1), args.pairs_per_prompt
    )
    held_samples = samples(work, f"held{args.n_max}", held, args.n_max, 0)
    held_pairs = own_pairs(task, held, [ss[:8] for ss in held_samples], 2)
    name = f"rm-s{args.steps}-b{args.batch_size}-lr{args.lr:g}-p{args.train_prompts}x{args.pairs_per_prompt}"
    name += (f"-flip{args.flip:g}" if args.flip else "") + (f"-h{args.heads}" if args.heads > 1 else "")
    name += f"-{args.label}" if args.trunk else ""
    name += f"-implicit{args.beta:g}" if args.head == "implicit" else ""
    name += (
        f"-w{args.warmup_steps}-{args.scheduler}" if args.warmup_steps or args.scheduler != "linear" else ""
    )
    data = write_jsonl(work / f"{name}.jsonl", flipped(train, args.flip) if args.flip else train)
    run = ["train", "rm", "--model", args.trunk or str(work / "policy"), "--data", str(data), "--out",
           str(work / name), "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr",
           str(args.lr), "--log-every", "50", "--save-every", "0"]  # fmt: skip
    run += ["--heads", str(args.heads), "--aggregate", "mean"] if args.heads > 1 else []
    run += ["--head", "implicit", "--beta", str(args.beta)] if args.head == "implicit" else []
    schedule = args.warmup_steps or args.scheduler != "linear"
    run += ["--warmup-steps", str(args.warmup_steps), "--scheduler", args.scheduler] if schedule else []
    start = _cpu()
    assert cli(run) == 0
    cpu = _cpu() - start
    assert cli(["eval", str(work / name), "--data", str(write_jsonl(work / "held.jsonl", held_pairs))]) == 0
    accuracy = json.loads((work / name / "eval.json").read_text())["metrics"]["accuracy"]
    curve = best_of_n(work / name / "final", held, held_samples, args.heads)
    print(json.dumps({"run": name, "train_pairs": len(train), "held_pairs": len(held_pairs), "accuracy": accuracy,
                      "best_of_n": curve, "train_cpu_s": round(cpu, 1)}))  # fmt: skip


if __name__ == "__main__":
    main()
