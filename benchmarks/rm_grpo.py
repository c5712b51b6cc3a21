"""GRPO with a trained reward model as its reward instead of the verifier: does verifier accuracy rise?

    python benchmarks/rm_grpo.py --work /tmp/rmgrpo --trunk W/trunk

The quickstart's GRPO setting (`preftune quickstart --method grpo`, seed 0): `prepare` trains the SFT
model (800 training prompts, 1000 held-out prompts, never trained on). The SFT model samples
`--samples` completions of each training prompt at temperature 0.7 (GRPO's rollout temperature);
correct ≻ wrong pairs of its own samples (whole samples, up to 4 per prompt, as
benchmarks/rm_best_of_n.py; the pairs of every tenth prompt held out for the RM's pairwise accuracy)
train `preftune train rm` (bt, `--rm-steps` steps of 32 pairs at `--rm-lr`) from `--trunk` (default:
the SFT model itself; benchmarks/verifier_trunk.py builds the verifier trunk); `--rm FOLDER` uses a
reward model trained elsewhere instead (benchmarks/rm_best_of_n.py's, on 4000 other training prompts). GRPO then runs with the
quickstart's online settings (16 prompts × 8 completions at 0.7, lr 2.5e-5, 200 steps) with
`--reward`: the RM folder (`rm`, the default), a process reward model (`prm` with `--prm FOLDER`, its
step values aggregated by `--prm-aggregate`, default min; benchmarks/prm_processbench.py trains one on
exact step labels) or the verifier (`arithmetic`, for comparison).
The SFT model is trained once per WORK (`WORK/qs/artifacts.pkl`); samples and RMs are reused too.

Against reward hacking (docs/reward_models.md, "GRPO with a reward model as its reward"):
`--kl C` adds DeepSeekMath's k3 KL term to the SFT model to GRPO's loss (objective `ppo_clip:1,kl:C`);
`--head implicit --beta B` trains the implicit RM β log π_θ/π_ref instead of the scalar head;
`--heads M --aggregate min|uwo|mean|median` an ensemble of M scalar heads on one trunk;
`--grpo-steps`, `--grpo-lr` the schedule; `--eval-every N` keeps a checkpoint every N steps and
reports the curve: greedy held-out verifier accuracy at each, with the mean logged reward (the RM's
score of the rollouts), KL and completion length of the steps since the previous point.

Prints one JSON line: greedy verifier accuracy on the held-out prompts before and after GRPO, the
paired difference and its standard error over prompts, the RM's held-out pairwise accuracy, and the
process CPU seconds (user + sys) of each stage with the load average. One thread.

`--quick` (the test suite's smoke run, a few seconds): a 4-step SFT model, 8 training and 8 held-out
prompts, 4 samples each with the first replaced by the task's reference solution (so the barely
trained model still yields pairs), 2 RM steps and 2 GRPO steps of 2 prompts × 2 completions; only
WORK is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
from pathlib import Path
from typing import Any


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _config(quick: bool) -> Any:
    from preftune.tasks.quickstart import QuickstartConfig
    from preftune.tasks.sft import SFTConfig

    if not quick:
        return QuickstartConfig()
    return QuickstartConfig(sft=SFTConfig(steps=4, batch_size=8, target_accuracy=None), train_prompts=8,
                            heldout_prompts=8, eval_samples=1, online_steps=2, online_batch_size=2,
                            num_generations=2)  # fmt: skip


def prepared(out: Path, seed: int, config: Any) -> Any:
    """The quickstart's `prepare` into `out`, once: its artifacts are kept in OUT/artifacts.pkl and
    read back by later runs with the same WORK (the SFT model is trained once for all settings)."""
    import pickle

    from preftune.tasks.quickstart import prepare

    path = out / "artifacts.pkl"
    if path.is_file():
        return pickle.loads(path.read_bytes())
    art = prepare(out, seed=seed, config=config, log=lambda _m: None, with_pairs=False)
    path.write_bytes(pickle.dumps(art))
    return art


def greedy_right(folder: Path, task: Any, prompts: list[str]) -> list[float]:
    """Per prompt, the verifier's reward (1 fully right, else 0) of the greedy completion."""
    from preftune.tasks.quickstart import sample_responses

    out = sample_responses(folder, task, prompts, num_samples=1, temperature=0.0, seed=0)
    return [task.reward(p, r[0]) for p, r in zip(prompts, out)]


def rm_pairs(args: argparse.Namespace, art: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training, held-out) correct ≻ wrong pairs of the SFT model's own samples of the training prompts."""
    from preftune.tasks.arithmetic import parse_prompt
    from preftune.tasks.quickstart import sample_responses
    from rm_best_of_n import own_pairs

    prompts = [json.loads(x)["prompt"] for x in Path(art.prompts_path).read_text().splitlines()]
    path = Path(args.work) / f"samples{args.samples}.json"
    if not path.is_file():
        got = sample_responses(
            art.sft_dir, art.task, prompts, num_samples=args.samples, temperature=0.7, seed=1
        )
        path.write_text(json.dumps(got), encoding="utf-8")
    samples = json.loads(path.read_text(encoding="utf-8"))
    if args.quick:
        samples = [[art.task.solution(parse_prompt(p)), *ss[1:]] for p, ss in zip(prompts, samples)]
    pairs = own_pairs(art.task, prompts, samples, 4)
    held = set(prompts[::10])
    return [r for r in pairs if r["prompt"] not in held], [r for r in pairs if r["prompt"] in held]


def train_rm(args: argparse.Namespace, art: Any) -> tuple[Path, float, int]:
    """(the RM's final folder, its held-out pairwise accuracy, training pairs)."""
    from preftune.cli import main as cli
    from rm_best_of_n import write_jsonl

    work = Path(args.work)
    train, held = rm_pairs(args, art)
    out = work / (f"rm-s{args.rm_steps}-lr{args.rm_lr:g}" + ("-trunk" if args.trunk else "") + _rm_tag(args))
    if not (out / "final" / "config.json").is_file():
        run = ["train", "rm", "--model", args.trunk or str(art.sft_dir), "--out", str(out),
               "--data", str(write_jsonl(work / "rm_train.jsonl", train)), "--max-steps", str(args.rm_steps),
               "--batch-size", "4" if args.quick else "32", "--lr", str(args.rm_lr), "--save-every", "0"]  # fmt: skip
        if args.head == "implicit":
            run += ["--head", "implicit", "--beta", str(args.beta)]
        if args.heads > 1:
            run += ["--heads", str(args.heads), "--aggregate", args.aggregate]
        assert cli(run) == 0
    assert cli(["eval", str(out), "--data", str(write_jsonl(work / "rm_held.jsonl", held))]) == 0
    return out / "final", json.loads((out / "eval.json").read_text())["metrics"]["accuracy"], len(train)


def _rm_tag(args: argparse.Namespace) -> str:
    """The RM folder's suffix for non-default heads (empty for the scalar head, so old folders are reused)."""
    tag = f"-implicit{args.beta:g}" if args.head == "implicit" else ""
    return tag + (f"-heads{args.heads}{args.aggregate}" if args.heads > 1 else "")


def _grpo_dir(args: argparse.Namespace) -> str:
    """The GRPO run's folder name: grpo-REWARD[-trunk][RM tag][-klC][-sSTEPS][-lrLR] (defaults omitted)."""
    name = f"grpo-{args.reward}" + ("-trunk" if args.trunk and args.reward == "rm" else "")
    name += _rm_tag(args) if args.reward == "rm" and not args.rm else ""
    name += f"-{Path(args.rm).parent.name}" if args.reward == "rm" and args.rm else ""
    name += f"-{args.prm_aggregate}-{Path(args.prm).parent.name}" if args.reward == "prm" else ""
    name += f"-kl{args.kl:g}" if args.kl else ""
    name += f"-s{args.grpo_steps}" if args.grpo_steps is not None else ""
    return name + (f"-lr{args.grpo_lr:g}" if args.grpo_lr is not None else "")


def grpo_config(args: argparse.Namespace, art: Any, cfg: Any, reward: str) -> Any:
    """The quickstart's GRPO run with `reward`, `--kl` (DeepSeekMath's k3 term in the loss, weight β),
    `--grpo-steps`, `--grpo-lr`, and a checkpoint every `--eval-every` steps (all kept)."""
    from preftune.tasks.quickstart import _online_config

    run = dataclasses.replace(art, out_dir=Path(args.work) / _grpo_dir(args))
    config = _online_config("grpo", run, cfg, args.seed, False)
    extra: dict[str, Any] = {"reward": reward}
    if args.kl:
        extra["objective"] = f"ppo_clip:1,kl:{args.kl:g}"
    if args.grpo_steps is not None:
        extra["max_steps"] = args.grpo_steps
    if args.grpo_lr is not None:
        extra["lr"] = args.grpo_lr
    if args.eval_every:
        extra.update(save_every=args.eval_every, keep_last=10_000)
    return dataclasses.replace(config, **extra)


def curve(args: argparse.Namespace, art: Any, out: Path, before: list[float]) -> list[dict[str, Any]]:
    """Per checkpoint (every `--eval-every` steps): greedy held-out verifier accuracy and the mean
    logged reward (the RM's score of the rollouts), KL to the reference and completion length of the
    steps since the previous point."""
    from preftune.models.load import load_causal_lm
    from preftune.train.checkpoint import list_checkpoints, load_weights

    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "reward" in r and "step" in r]
    points, last = [{"step": 0, "greedy": sum(before) / len(before)}], 0
    for folder in list_checkpoints(out / "checkpoints"):
        step = int(folder.name.split("-")[1])
        model = load_causal_lm(str(art.sft_dir))
        load_weights(model, folder)
        right = greedy_right(model, art.task, art.heldout_prompts)
        window = [r for r in rows if last < r["step"] <= step]
        point = {"step": step, "greedy": sum(right) / len(right)}
        for key in ("reward", "kl", "completion_length"):
            vals = [r[key] for r in window if key in r]
            if vals:
                point[key] = round(sum(vals) / len(vals), 4)
        points.append(point)
        last = step
    return points


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--work", required=True, help="folder for the SFT model, the samples, the RM and the runs"
    )
    ap.add_argument(
        "--trunk", default=None, help="the RM's starting causal-LM folder (default: the SFT model)"
    )
    ap.add_argument("--reward", default="rm", choices=["rm", "prm", "arithmetic"], help="GRPO's reward")
    ap.add_argument(
        "--prm",
        default=None,
        help="--reward prm: a process reward model folder (benchmarks/prm_processbench.py builds one)",
    )
    ap.add_argument("--prm-aggregate", default="min", choices=["min", "last", "sum", "mean", "prod"],
                    help="--reward prm: how the PRM's step values make the completion's reward")  # fmt: skip
    ap.add_argument("--rm", default=None,
                    help="--reward rm: a trained RM folder to use instead of training one "
                    "(e.g. benchmarks/rm_best_of_n.py's OUT/final)")  # fmt: skip
    ap.add_argument("--samples", type=int, default=8, help="SFT samples per training prompt for the RM")
    ap.add_argument("--rm-steps", type=int, default=400)
    ap.add_argument("--rm-lr", type=float, default=3e-4)
    ap.add_argument("--head", default="scalar", choices=["scalar", "implicit"], help="the RM's head")
    ap.add_argument("--beta", type=float, default=0.05, help="β of the implicit RM (--head implicit)")
    ap.add_argument("--heads", type=int, default=1, help="M scalar heads on one trunk (an ensemble)")
    ap.add_argument("--aggregate", default="min", choices=["mean", "min", "uwo", "median"],
                    help="the ensemble's aggregator (--heads M > 1)")  # fmt: skip
    ap.add_argument("--kl", type=float, default=0.0, help="weight of GRPO's k3 KL term to the SFT model")
    ap.add_argument("--grpo-steps", type=int, default=None, help="GRPO steps (default: the quickstart's)")
    ap.add_argument("--grpo-lr", type=float, default=None, help="GRPO lr (default: the quickstart's)")
    ap.add_argument("--eval-every", type=int, default=0,
                    help="checkpoint every N GRPO steps and report held-out greedy accuracy at each")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="toy sizes, a smoke run of a few seconds")
    args = ap.parse_args(argv)
    if args.quick:
        args.samples, args.rm_steps = 4, 2
    if (args.reward == "prm") != (args.prm is not None):
        ap.error("--prm FOLDER goes with --reward prm, and --reward prm needs it")
    if args.rm and args.reward != "rm":
        ap.error("--rm FOLDER is the reward of --reward rm")
    return args


def main() -> None:
    import sys

    import torch

    from preftune.train.api import train

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    args = parse()
    torch.set_num_threads(1)
    work, cfg, cpu = Path(args.work), _config(args.quick), {}
    start = _cpu()
    art = prepared(work / "qs", args.seed, cfg)
    before = greedy_right(art.sft_dir, art.task, art.heldout_prompts)
    cpu["prepare"], start = round(_cpu() - start, 1), _cpu()
    rm_accuracy, rm_pairs_n, reward = None, 0, "arithmetic"
    if args.reward == "rm" and args.rm:
        reward = args.rm
    elif args.reward == "rm":
        folder, rm_accuracy, rm_pairs_n = train_rm(args, art)
        reward = str(folder)
        cpu["rm"], start = round(_cpu() - start, 1), _cpu()
    if args.reward == "prm":
        reward = f"prm:{args.prm_aggregate}:{args.prm}"
    config = grpo_config(args, art, cfg, reward)
    result = train(config)
    cpu["grpo"], start = round(_cpu() - start, 1), _cpu()
    after = greedy_right(result.final_dir, art.task, art.heldout_prompts)
    points = curve(args, art, Path(config.out), before) if args.eval_every else None
    cpu["eval"] = round(_cpu() - start, 1)
    d = torch.tensor(after, dtype=torch.float64) - torch.tensor(before, dtype=torch.float64)
    print(json.dumps({"reward": args.reward, "trunk": args.trunk, "head": args.head, "heads": args.heads,
                      "kl": args.kl, "run": Path(config.out).name, "heldout_prompts": len(before),
                      "greedy_before": sum(before) / len(before), "greedy_after": sum(after) / len(after),
                      "gain": float(d.mean()), "gain_se": float(d.std() / len(d) ** 0.5),
                      "prompts_gained": int((d > 0).sum()), "prompts_lost": int((d < 0).sum()),
                      "prepare_greedy": art.stats["accuracy_before"]["greedy"], "rm_heldout_accuracy": rm_accuracy,
                      "rm_train_pairs": rm_pairs_n, "grpo_steps": result.steps, "curve": points, "cpu_s": cpu,
                      "load_average": open("/proc/loadavg").read().split()[:3]}))  # fmt: skip


if __name__ == "__main__":
    main()
