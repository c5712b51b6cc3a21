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

`--ensemble M` trains an ensemble of M seeds (`train rm --ensemble M`, members seeded --seed + i, all
on the same pairs) and reports the best-of-n curve of every member on its own (`member0` … — single
RMs of the same data) and of every aggregator over them, each point with its standard error over
prompts, and at n = `--n-max` the paired difference (with its standard error) of each aggregator
against member 0 and against the members' mean. `--held-prompts P` uses the first P of the 1000
held-out prompts (best-of-64 on 1000 prompts is 64 000 samples); the policy and the training
prompts avoid all 1000 whatever P is.

`--quick` (the test suite's smoke run, a few seconds): a 10-step policy, 8 training and 8 held-out
prompts with 4 samples each, the first sample of every prompt replaced by the task's reference
solution (so the barely trained policy still yields correct ≻ wrong pairs), 2 RM steps of 4 pairs;
only WORK is written.
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


def with_se(scores: Any, gold: Any, ns: list[int]) -> dict[str, Any]:
    """`best_of_n_curve` plus, per n, the standard error over prompts of the mean gold of the picks
    (each prompt's N // n groups averaged first: prompts are the independent units) and the picks'
    per-prompt means at the largest n (`per_prompt`, for paired differences)."""
    from preftune.reward.best_of_n import best_of_n_curve

    curve: dict[str, Any] = best_of_n_curve(scores, gold, ns)
    curve["se"] = []
    for n in ns:
        per_prompt = _picks(scores, gold, n)
        curve["se"].append(float(per_prompt.std() / len(per_prompt) ** 0.5) if len(per_prompt) > 1 else 0.0)
    curve["per_prompt"] = per_prompt
    return curve


def _picks(scores: Any, gold: Any, n: int) -> Any:
    """[P] per prompt: the mean gold reward of the RM's pick over the prompt's N // n groups of n."""
    p, g = scores.shape[0], scores.shape[1] // n
    s, y = scores[:, : g * n].reshape(p, g, n), gold[:, : g * n].reshape(p, g, n)
    return y.gather(-1, s.argmax(-1, keepdim=True)).squeeze(-1).mean(-1)


def paired(a: Any, b: Any) -> list[float]:
    """[mean(a − b), its standard error] of per-prompt values (the same prompts on both sides)."""
    d = a - b
    return [round(float(d.mean()), 4), round(float(d.std() / len(d) ** 0.5), 4)]


def best_of_n(folder: Path, held: list[str], held_samples: list[list[str]], heads: int) -> dict[str, Any]:
    """Best-of-n curves of the RM in `folder` on the held-out samples: one curve for a single RM; for an
    ensemble (M heads or M seeds) every member's own and every aggregator's, with `paired` differences
    at the largest n of each aggregator against member 0 and against the members' mean."""
    import torch

    from preftune.reward.best_of_n import curve_points
    from preftune.reward.ensemble import AGGREGATORS, aggregate
    from preftune.reward.ensemble_run import EnsembleRewardFn, is_ensemble
    from preftune.reward.implicit import is_implicit
    from preftune.reward.model_reward import RewardModelFn
    from preftune.tasks.arithmetic import ArithmeticTask

    task, n = ArithmeticTask(level=2), len(held_samples[0])
    ns = curve_points(n)
    gold = torch.tensor(
        [[task.reward(p, s) for s in ss] for p, ss in zip(held, held_samples)], dtype=torch.float64
    )
    flat = [p for p, ss in zip(held, held_samples) for _ in ss]
    texts = [s for ss in held_samples for s in ss]
    keep = [i for i, t in enumerate(texts) if t.strip()]  # an empty sample (EOS first) has no score:
    if is_implicit(folder):  # --head implicit: r = β log π_θ/π_ref
        from preftune.reward.implicit_reward import ImplicitRewardFn

        scorer = ImplicitRewardFn(folder).outcome
    elif is_ensemble(folder):
        scorer = lambda p, t: EnsembleRewardFn(folder).member_scores(p, t).T  # noqa: E731
    else:
        scorer = RewardModelFn(folder, heads=heads).scores
    got = scorer([flat[i] for i in keep], [texts[i] for i in keep]).double()
    members = torch.full((len(texts), *got.shape[1:]), -1e9, dtype=torch.float64)  # ranked last
    members[keep] = got
    if not is_ensemble(folder):
        curve = with_se(members.view(len(held), n), gold, ns)
        del curve["per_prompt"]
        return curve
    members = members.T  # [M, P·N]
    curves = {f"member{i}": with_se(m.view(len(held), n), gold, ns) for i, m in enumerate(members)}
    curves |= {how: with_se(aggregate(members, how).view(len(held), n), gold, ns) for how in AGGREGATORS}
    singles = torch.stack([curves[f"member{i}"]["per_prompt"] for i in range(len(members))]).mean(0)
    diffs = {how: {"vs_member0": paired(curves[how]["per_prompt"], curves["member0"]["per_prompt"]),
                   "vs_members_mean": paired(curves[how]["per_prompt"], singles)} for how in AGGREGATORS}  # fmt: skip
    for curve in curves.values():
        del curve["per_prompt"]
    return {**curves, "paired": diffs}


def _quick(args: argparse.Namespace) -> None:
    """The `--quick` sizes (a smoke run)."""
    args.train_prompts, args.held_prompts, args.n_max, args.steps, args.batch_size = 8, 8, 4, 2, 4


def _with_reference(task: Any, prompts: list[str], samples: list[list[str]]) -> list[list[str]]:
    """`samples` with each prompt's first sample replaced by the task's reference solution (`--quick`)."""
    from preftune.tasks.arithmetic import parse_prompt

    return [[task.solution(parse_prompt(p)), *ss[1:]] for p, ss in zip(prompts, samples)]


def prompt_sets(train_prompts: int) -> tuple[list[str], list[str]]:
    """(the 1000 held-out prompts, the `train_prompts` training prompts). The policy and the training
    prompts avoid all 1000 whatever `--held-prompts` scores, so the policy and the cached training
    samples (WORK/trainN.json) stay those of their prompts."""
    from preftune.tasks.arithmetic import ArithmeticTask

    task = ArithmeticTask(level=2)
    held = [p.prompt for p in task.problems(1000, seed=777)]
    return held, [p.prompt for p in task.problems(train_prompts, seed=1, exclude=set(held))]


def data(args: argparse.Namespace, work: Path) -> tuple[list[dict[str, Any]], list[str], list[list[str]]]:
    """(training pairs, held-out prompts, their samples): the policy trained once into WORK/policy,
    its samples cached in WORK."""
    from preftune.tasks.arithmetic import ArithmeticTask
    from preftune.tasks.sft import SFTConfig, train_sft

    task = ArithmeticTask(level=2)
    all_held, prompts = prompt_sets(args.train_prompts)
    held = all_held[: args.held_prompts]
    if not (work / "policy" / "config.json").is_file():
        size = {"steps": 10, "batch_size": 8, "target_accuracy": None} if args.quick else {}
        train_sft(task, work / "policy", SFTConfig(seed=0, **size), exclude_prompts=set(all_held))
    k = 4 if args.quick else 8
    train_samples = samples(work, f"train{args.train_prompts}", prompts, k, 1)
    held_name = f"held{args.n_max}" + (f"-p{args.held_prompts}" if args.held_prompts != 1000 else "")
    held_samples = samples(work, held_name, held, args.n_max, 0)
    if args.quick:
        train_samples = _with_reference(task, prompts, train_samples)
        held_samples = _with_reference(task, held, held_samples)
    return own_pairs(task, prompts, train_samples, args.pairs_per_prompt), held, held_samples


def run_name(args: argparse.Namespace) -> str:
    name = f"rm-s{args.steps}-b{args.batch_size}-lr{args.lr:g}-p{args.train_prompts}x{args.pairs_per_prompt}"
    name += (f"-flip{args.flip:g}" if args.flip else "") + (f"-h{args.heads}" if args.heads > 1 else "")
    name += f"-e{args.ensemble}" if args.ensemble > 1 else ""
    name += f"-{args.label}" if args.trunk else ""
    name += f"-implicit{args.beta:g}" if args.head == "implicit" else ""
    return name + (
        f"-w{args.warmup_steps}-{args.scheduler}" if args.warmup_steps or args.scheduler != "linear" else ""
    )


def parse(argv: list[str] | None = None) -> argparse.Namespace:
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
    ap.add_argument("--ensemble", type=int, default=1, help="M seeds (train rm --ensemble M)")
    ap.add_argument("--n-max", type=int, default=8, help="samples per held-out prompt (best-of-n up to it)")
    ap.add_argument("--head", default="scalar", help="scalar, or implicit: r = β log π_θ/π_ref (with --beta)")
    ap.add_argument("--beta", type=float, default=0.05, help="β of --head implicit")
    ap.add_argument("--held-prompts", type=int, default=1000, help="the first P of the 1000 held-out prompts")
    ap.add_argument("--quick", action="store_true", help="toy sizes, a smoke run of a few seconds")
    args = ap.parse_args(argv)
    if args.quick:
        _quick(args)
    return args


def main() -> None:
    import torch

    from preftune.cli import main as cli
    from preftune.tasks.arithmetic import ArithmeticTask

    args = parse()
    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    train, held, held_samples = data(args, work)
    held_pairs = own_pairs(ArithmeticTask(level=2), held, [ss[:8] for ss in held_samples], 2)
    name = run_name(args)
    data_path = write_jsonl(work / f"{name}.jsonl", flipped(train, args.flip) if args.flip else train)
    run = ["train", "rm", "--model", args.trunk or str(work / "policy"), "--data", str(data_path), "--out",
           str(work / name), "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr",
           str(args.lr), "--log-every", "1" if args.quick else "50", "--save-every", "0"]  # fmt: skip
    run += ["--heads", str(args.heads), "--aggregate", "mean"] if args.heads > 1 else []
    run += ["--ensemble", str(args.ensemble), "--aggregate", "mean"] if args.ensemble > 1 else []
    run += ["--head", "implicit", "--beta", str(args.beta)] if args.head == "implicit" else []
    schedule = args.warmup_steps or args.scheduler != "linear"
    run += ["--warmup-steps", str(args.warmup_steps), "--scheduler", args.scheduler] if schedule else []
    start = _cpu()
    assert cli(run) == 0
    cpu = _cpu() - start
    assert cli(["eval", str(work / name), "--data", str(write_jsonl(work / "held.jsonl", held_pairs))]) == 0
    accuracy = json.loads((work / name / "eval.json").read_text())["metrics"]["accuracy"]
    curve = best_of_n(work / name / "final", held, held_samples, args.heads)
    print(json.dumps({"run": name, "train_pairs": len(train), "held_pairs": len(held_pairs),
                      "held_prompts": len(held), "accuracy": accuracy, "best_of_n": curve,
                      "train_cpu_s": round(cpu, 1), "load_average": open("/proc/loadavg").read().split()[:3]}))  # fmt: skip


if __name__ == "__main__":
    main()
