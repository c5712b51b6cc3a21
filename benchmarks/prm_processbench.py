"""A PRM on exact step labels of the arithmetic task, measured on a ProcessBench-style set.

    python benchmarks/prm_processbench.py --work /tmp/prm --steps 400 --lr 1e-3 --train-items 6000

The setting of tests/test_reward_prm_slow.py with the schedule as flags: the quickstart's SFT model
(level 2, seed 0, trained once into WORK/sft and reused) → `preftune train prm` on `--train-items`
task-built ProcessBench items (seed 1; `--local P`: instead every line corrupted with probability P
and labelled on its own; `--chars`: labelled per character by `character_record`, trained with
separator "" and read at line ends) with a validation set (seed 3) as --eval-data (not with --chars) → ProcessBench metrics on
600 held-out items (seed 2, τ on their dev third). Prints one JSON line: the metrics, the validation
curve, which kinds of wrong line the PRM flags (`error_kinds`), with `--lm-probe` the SFT model's own
token probabilities as step values (`lm_probe`), and the training's process CPU seconds (user + sys)
and wall seconds. One thread.

`--quick` (the test suite's smoke run, a few seconds): a 4-step SFT model, 16 training items, 2 PRM
steps of 4 with a validation after each, 12 test and 12 validation items; only WORK is written.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import time
from pathlib import Path
from typing import Any


def _local_items(n: int, p: float, exclude: set[str]) -> list[dict[str, Any]]:
    """Reference solutions with every line corrupted independently with probability p; labels: each
    line right (1) or wrong (0) on its own."""
    from preftune.reward.processbench import _corrupt
    from preftune.tasks.arithmetic import ArithmeticTask

    rng, task, rows = random.Random(5), ArithmeticTask(level=2), []
    for problem in task.problems(n, seed=1, exclude=exclude):
        steps, labels = task.solution(problem).split("\n"), []
        for k in range(len(steps)):
            bad = rng.random() < p
            steps[k] = _corrupt(steps[k], rng) if bad else steps[k]
            labels.append(0 if bad else 1)
        rows.append({"prompt": problem.prompt, "steps": steps, "labels": labels})
    return rows


def error_kinds(folder: Path, data: Path, threshold: float) -> dict[str, list[int]]:
    """Per kind of wrong line on the erroneous items: [flagged at its own step, items]. Kinds: `answer`
    (the answer line), `value+10` (the value 10 too large), `value±1/2` (the value off by 1 or 2)."""
    import re

    from preftune.data.formatting import load_tokenizer
    from preftune.reward.prm_data import read_prm_data
    from preftune.reward.processbench import prm_step_values
    from preftune.reward.scoring import load_scorer
    from preftune.tasks.arithmetic import ArithmeticTask, parse_prompt

    items = read_prm_data(str(data))
    values = prm_step_values(load_scorer(folder), load_tokenizer(str(folder)), items)
    task, out = ArithmeticTask(level=2), {}
    for it, v in zip(items, values):
        k = it.first_error
        if k is None or k < 0:
            continue
        ref = task.solution(parse_prompt(it.prompt)).split("\n")[k]
        if it.steps[k].startswith("answer"):
            kind = "answer"
        else:
            gap = int(re.search(r"=(\d+)", it.steps[k]).group(1)) - int(re.search(r"=(\d+)", ref).group(1))  # type: ignore[union-attr]
            kind = "value+10" if gap == 10 else "value±1/2"
        hit = out.setdefault(kind, [0, 0])
        hit[0] += int(v[k] < threshold)
        hit[1] += 1
    return out


def lm_probe(sft: Path, data: Path) -> dict[str, float]:
    """ProcessBench metrics of the SFT model's own next-token probabilities as step values (the lowest
    among each step's tokens, its separator left out): what the trunk knows of the arithmetic without
    a trained head."""
    import torch

    from preftune.data.formatting import load_tokenizer
    from preftune.models.load import load_causal_lm
    from preftune.reward.prm_data import read_prm_data
    from preftune.reward.processbench import evaluate_values, first_errors

    lm, tok = load_causal_lm(str(sft)), load_tokenizer(str(sft))
    lm.eval()
    items, values = read_prm_data(str(data)), []
    with torch.no_grad():
        for it in items:
            ids = tok(it.prompt, add_special_tokens=False)["input_ids"]
            bounds = [len(ids)]
            for step in it.steps:
                ids = ids + tok(step + "\n", add_special_tokens=False)["input_ids"]
                bounds.append(len(ids))
            logp = torch.log_softmax(lm(torch.tensor([ids])).logits[0].float(), -1)
            p = logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].exp()  # p(token i + 1)
            # the step's own tokens, its separator left out: after the answer line the model expects
            # EOS, so the separator there is improbable in every item, right or wrong
            values.append([float(p[a - 1 : b - 2].min()) for a, b in zip(bounds, bounds[1:])])
    return evaluate_values(values, first_errors(items, str(data)))


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="folder for the SFT model, the data and the runs")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--train-items", type=int, default=6000)
    ap.add_argument("--local", type=float, default=0.0, help="per-line corruption probability (0: off)")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument(
        "--trunk",
        default=None,
        help="start the PRM from this causal-LM folder (e.g. benchmarks/verifier_trunk.py's) instead of "
        "the quickstart's SFT model",
    )
    ap.add_argument(
        "--chars",
        action="store_true",
        help='label the training items per character (`character_record`, separator ""), read at line ends',
    )
    ap.add_argument("--warmup-steps", type=int, default=0)
    ap.add_argument("--scheduler", default="linear")
    ap.add_argument(
        "--lm-probe", action="store_true", help="also score the SFT model's own token probabilities"
    )
    ap.add_argument("--quick", action="store_true", help="toy sizes, a smoke run of a few seconds")
    ap.add_argument(
        "--head", default="scalar", help="scalar, or implicit: q = partial sums of β log π_θ/π_ref"
    )
    ap.add_argument("--beta", type=float, default=0.05, help="β of --head implicit")
    return ap


def _run_name(args: argparse.Namespace) -> str:
    """The run folder's name: the options that differ between runs."""
    return (
        ("trunk-" if args.trunk else "")
        + f"prm-s{args.steps}-b{args.batch_size}-lr{args.lr:g}-n{args.train_items}"
        + (f"-local{args.local:g}" if args.local else "")
        + ("-chars" if args.chars else "")
        + (f"-implicit{args.beta:g}" if args.head == "implicit" else "")
        + (
            f"-w{args.warmup_steps}-{args.scheduler}"
            if args.warmup_steps or args.scheduler != "linear"
            else ""
        )
    )


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The options of the command line (`argv`, default sys.argv), as `run` takes them."""
    return _parser().parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train the PRM of `args` and measure it on the test items: the record `main` prints."""
    import torch

    from preftune.config import load_config
    from preftune.reward.prm_training import train_prm
    from preftune.reward.processbench import evaluate_prm_folder, processbench_from_task
    from preftune.tasks.arithmetic import ArithmeticTask
    from preftune.tasks.sft import SFTConfig, train_sft

    if args.quick:
        args.steps, args.batch_size, args.train_items, args.eval_every = 2, 4, 16, 1
    n_test, sft_size = (
        (12, {"steps": 4, "batch_size": 8, "target_accuracy": None}) if args.quick else (600, {})
    )
    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    test = processbench_from_task(n_test, level=2, seed=2)
    held = {r["problem"] for r in test}
    trunk = Path(args.trunk) if args.trunk else work / "sft"
    if not (trunk / "config.json").is_file():
        if args.trunk:
            raise SystemExit(f"--trunk {trunk}: no config.json; build it with benchmarks/verifier_trunk.py")
        train_sft(ArithmeticTask(level=2), trunk, SFTConfig(seed=0, **sft_size), exclude_prompts=held)
    if args.chars and args.local:
        raise SystemExit("--chars labels task-built items per character; --local items are labelled per line")
    if args.local:
        train = _local_items(args.train_items, args.local, held)
    else:
        train = processbench_from_task(args.train_items, level=2, seed=1, exclude=held)
    valid = processbench_from_task(
        n_test, level=2, seed=3, exclude=held | {r.get("problem", r.get("prompt")) for r in train}
    )
    if args.chars:
        from preftune.reward.prm_labels import character_record

        train = [character_record(r["problem"], r["steps"]) for r in train]
    files = {"train": train, "test": test, "valid": valid}
    for name, rows in files.items():
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    name = _run_name(args)
    config = load_config(None, {
        "method": "prm", "model": str(trunk), "data": str(work / "train.jsonl"), "out": str(work / name),
        "max_steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "log_every": 50,
        "save_every": 0, "warmup_steps": args.warmup_steps, "scheduler": args.scheduler,
        **({"head": "implicit", "beta": args.beta} if args.head == "implicit" else {}),
        # the training-time validation reads at the training separator: off for character records
        **({"separator": ""} if args.chars else {"eval_data": str(work / "valid.jsonl"), "eval_every": args.eval_every}),
    })  # fmt: skip
    t0, c0 = time.time(), resource.getrusage(resource.RUSAGE_SELF)
    train_prm(config)
    c1 = resource.getrusage(resource.RUSAGE_SELF)
    metrics = evaluate_prm_folder(work / name / "final", str(work / "test.jsonl"), separator="\n")
    rows = [json.loads(x) for x in (work / name / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], round(r["f1"], 3)) for r in rows if r.get("split") == "eval"]
    cpu = c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime
    wall = round(time.time() - t0, 1)
    implicit = args.head == "implicit"  # error_kinds reads a scalar-head PRM
    kinds = {} if implicit else error_kinds(work / name / "final", work / "test.jsonl", metrics["threshold"])
    probe = {"lm_probe": lm_probe(trunk, work / "test.jsonl")} if args.lm_probe else {}
    return {"run": name, **metrics, "valid_f1": curve, "flagged": kinds, **probe, "cpu_s": round(cpu, 1),
            "wall_s": wall}  # fmt: skip


def main() -> None:
    print(json.dumps(run(parse())))


if __name__ == "__main__":
    main()
