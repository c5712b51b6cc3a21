"""Pairs that share a prompt: DPO on all pairs of K responses per prompt, `group_by_prompt` off vs on.

    python benchmarks/prompt_groups.py                  # 19.5M model, K = 4 and 8, 3 repetitions
    python benchmarks/prompt_groups.py --quick          # 8.3M model, K = 8, 1 repetition (tmp/ only)

Data: P prompts of `--prompt` words, each with K responses of `--response` words turned into all
K(K-1)/2 pairs (`ranked_pairs: all_pairs`, the UltraFeedback recipe). Each step trains one batch of
K(K-1)/2 pairs (one prompt's worth) with DPO, float32, the reference log-probs cached beforehand (the
step clock does not see that pass; both variants share it).

  off : the default data order — pairs shuffled one by one, so a batch mixes the pairs of many
        prompts and each pair's row repeats its prompt.
  on  : `group_by_prompt: true` — prompts shuffled, a prompt's pairs kept together, so one packed row
        holds the prompt once and each distinct response once (`build_packed(merge_prompts=True)`).

The two variants alternate which runs first, each in a fresh process; step times are medians over
steps and repetitions. Both train the same pairs with the same per-pair loss; the batches differ
(that is the lever), so losses are not compared step by step. The first step's loss is log 2 on both
sides (policy = reference).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_utils as bu  # noqa: E402

HERE = Path(__file__).resolve().parent


def child(a: argparse.Namespace) -> dict[str, Any]:
    stamps = bu.install_step_clock()
    import preftune.train.run as train_run
    from preftune.train.api import train

    losses: list[float] = []
    real = train_run.objective_on_batch

    def spy(*args: Any, **kwargs: Any) -> Any:
        sums = real(*args, **kwargs)
        losses.append(sums.result()["loss"])
        return sums

    train_run.objective_on_batch = spy
    with tempfile.TemporaryDirectory() as tmp:
        cfg = bu.preftune_config(
            model=a.model,
            data=a.data,
            out=Path(tmp) / "run",
            steps=a.steps,
            batch=a.batch,
            hparams={"beta": 0.1},
            ranked_pairs="all_pairs",
            group_by_prompt=a.variant == "on",
            cache_dir=str(Path(tmp) / "cache"),
        )
        train(cfg)
    return {"stamps": stamps, "first_loss": losses[0] if losses else None}


def measure_k(a: argparse.Namespace, model: Path, work: Path, k: int) -> dict[str, Any]:
    pairs = k * (k - 1) // 2
    data = bu.write_jsonl(bu.ranked_rows(a.prompts, k, a.prompt, a.response, seed=k), work / f"k{k}.jsonl")
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    for rep in range(a.reps):
        for variant in ("off", "on") if rep % 2 == 0 else ("on", "off"):
            argv = [__file__, "--child", variant, "--model", str(model), "--data", str(data)]
            argv += ["--batch", str(pairs), "--steps", str(a.steps)]
            res = bu.run_child(argv, timeout=3600)
            wall, cpu, n = bu.steps_rate(res["stamps"])
            runs[variant].append(
                {
                    "s_per_step": wall,
                    "cpu_s_per_step": cpu,
                    "intervals": n,
                    "peak_rss_mb": res["peak_rss_mb"],
                    "first_loss": res["first_loss"],
                    "load_average": bu.load_average(),
                }
            )
            print(
                f"  K {k} {variant} rep {rep}: {json.dumps(runs[variant][-1])}", file=sys.stderr, flush=True
            )
    point: dict[str, Any] = {"k": k, "pairs_per_step": pairs, "runs": runs}
    for variant, rs in runs.items():
        point[variant] = {
            "pairs_per_s": pairs / bu.median([r["s_per_step"] for r in rs]),
            "cpu_pairs_per_s": pairs / bu.median([r["cpu_s_per_step"] for r in rs]),
            "peak_rss_mb": bu.median([r["peak_rss_mb"] for r in rs]),
        }
    point["speedup"] = point["on"]["pairs_per_s"] / point["off"]["pairs_per_s"]
    point["speedup_cpu"] = point["on"]["cpu_pairs_per_s"] / point["off"]["cpu_pairs_per_s"]
    point["memory_ratio"] = point["on"]["peak_rss_mb"] / point["off"]["peak_rss_mb"]
    return point


def table(res: dict[str, Any]) -> str:
    rows = [
        [
            p["k"],
            p["pairs_per_step"],
            p["off"]["pairs_per_s"],
            p["on"]["pairs_per_s"],
            p["speedup"],
            p["speedup_cpu"],
            round(p["off"]["peak_rss_mb"]),
            round(p["on"]["peak_rss_mb"]),
        ]
        for p in res["points"]
    ]
    header = ["K", "pairs/step", "off pairs/s", "on pairs/s", "speedup", "speedup (CPU)", "off MiB", "on MiB"]
    loads = [r["load_average"][0] for p in res["points"] for rs in p["runs"].values() for r in rs]
    return (
        bu.md_table(header, rows)
        + f"\n\nModel {res['params']['total'] / 1e6:.1f}M, prompt {res['prompt']} words, responses "
        f"{res['response']} words, {res['reps']} repetitions, {res['steps']} steps each; 1-min load "
        f"{min(loads):.1f}–{max(loads):.1f}.\n\nCommand: `{res['command']}`.\n"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", choices=["off", "on"], dest="variant", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="8.3M model, K = 8, one repetition; tmp/ only")
    ap.add_argument("--model-size", choices=sorted(bu.MODELS), default=None)
    ap.add_argument("--ks", default=None, help="responses per prompt, comma-separated (default 4,8)")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--prompt", type=int, default=256, help="prompt words")
    ap.add_argument("--response", type=int, default=64, help="response words")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--reps", type=int, default=None)
    a = ap.parse_args(argv)
    if a.variant:
        print(json.dumps(child(a)))
        return 0
    size = a.model_size or ("quick" if a.quick else "20m")
    ks = [int(x) for x in (a.ks or ("8" if a.quick else "4,8")).split(",")]
    a.reps = a.reps or (1 if a.quick else 3)
    spec = bu.MODELS[size]
    res: dict[str, Any] = {
        "command": "python benchmarks/prompt_groups.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": bu.machine_info(),
        "model": spec,
        "params": bu.param_counts(spec),
        "prompt": a.prompt,
        "response": a.response,
        "steps": a.steps,
        "reps": a.reps,
    }
    bu.RESULTS_DIR.joinpath("tmp").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=bu.RESULTS_DIR / "tmp") as tmp:
        model = bu.save_model(spec, Path(tmp) / "model")
        res["points"] = [measure_k(a, model, Path(tmp), k) for k in ks]
    text = table(res)
    bu.save_results("prompt_groups", res, text, quick=a.quick or a.model_size == "tiny")
    print(text, file=sys.stderr)
    summary = {f"speedup_k{p['k']}": round(p["speedup"], 3) for p in res["points"]}
    summary.update({f"memory_ratio_k{p['k']}": round(p["memory_ratio"], 3) for p in res["points"]})
    summary["first_losses"] = [
        r["first_loss"] for p in res["points"] for rs in p["runs"].values() for r in rs
    ]
    summary["log2"] = math.log(2)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
