"""Scaling: time per pair as the prompt grows (preftune and TRL), time per example as K grows (listwise).

    .bench-venv/bin/python benchmarks/scaling.py                 # both sweeps
    .bench-venv/bin/python benchmarks/scaling.py --sweep prompt  # or --sweep k

prompt: DPO, responses fixed at `--response` words (+ EOS), prompt 128 → 2048 tokens; each point
        is one fresh process per side, the two sides alternating which goes first. Same harness,
        hyper-parameters and timing (optimizer-hook intervals after the first step) as dpo_vs_trl.py.
k:      preftune `listwise_pl` (Plackett–Luce over K ranked responses sharing one prompt), K = 2 → 8,
        time per example (one prompt with its K responses) and per response. TRL has no listwise
        DPO, so this sweep is preftune alone: the point is how cost grows with K when the prompt
        is computed once per example.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_utils as bu  # noqa: E402

HERE = Path(__file__).resolve().parent


def child_listwise(a: argparse.Namespace) -> dict[str, Any]:
    stamps = bu.install_step_clock()
    from preftune.train.api import train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = bu.preftune_config(
            model=a.model,
            data=a.data,
            out=Path(tmp) / "run",
            steps=a.steps,
            batch=a.batch,
            method="listwise_pl",
            hparams={"beta": 0.1},
            reference="model",
            ref_model=a.model,
            cache_dir=str(Path(tmp) / "cache"),
        )
        train(cfg)
    return {"stamps": stamps}


def prompt_sweep(a: argparse.Namespace, model: Path, work: Path) -> list[dict[str, Any]]:
    points = []
    for i, p in enumerate(int(x) for x in a.prompts.split(",")):
        shape = bu.Shape(f"prompt{p}", (p, p), (a.response, a.response))
        rows = bu.synth_pairs(shape, a.batch, seed=1)
        data = bu.write_jsonl(rows, work / f"p{p}.jsonl")
        expected = [[q, c + 1, r + 1] for q, c, r in (row["_lengths"] for row in rows)]  # +1: EOS
        point: dict[str, Any] = {"prompt": p, "response": a.response}
        for side in ["trl", "preftune"] if i % 2 == 0 else ["preftune", "trl"]:
            res = bu.run_child(
                [
                    str(HERE / "dpo_vs_trl.py"),
                    "--child",
                    side,
                    "--model",
                    str(model),
                    "--data",
                    str(data),
                    "--batch",
                    str(a.batch),
                    "--steps",
                    str(a.steps),
                    "--lr",
                    "1e-5",
                    "--beta",
                    "0.1",
                    "--seed",
                    "0",
                ],
                timeout=3600,
            )
            if res["lengths"] != expected:
                raise RuntimeError(f"{side} tokenized prompt {p} differently: {res['lengths']} vs {expected}")
            wall, cpu, _ = bu.steps_rate(res["stamps"])
            point[side] = {
                "s_per_pair": wall / a.batch,
                "cpu_s_per_pair": cpu / a.batch,
                "peak_rss_mb": res["peak_rss_mb"],
            }
        point["speedup"] = point["trl"]["s_per_pair"] / point["preftune"]["s_per_pair"]
        point["speedup_cpu"] = point["trl"]["cpu_s_per_pair"] / point["preftune"]["cpu_s_per_pair"]
        print(f"  prompt {p}: {json.dumps(point)}", file=sys.stderr, flush=True)
        points.append(point)
    return points


def k_sweep(a: argparse.Namespace, model: Path, work: Path) -> list[dict[str, Any]]:
    points = []
    for k in (int(x) for x in a.ks.split(",")):
        rows = bu.ranked_rows(a.batch, k, a.k_prompt, a.response, seed=k)
        data = work / f"k{k}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        res = bu.run_child(
            [
                __file__,
                "--child",
                "--model",
                str(model),
                "--data",
                str(data),
                "--batch",
                str(a.batch),
                "--steps",
                str(a.steps),
            ],
            timeout=3600,
        )
        wall, cpu, _ = bu.steps_rate(res["stamps"])
        point = {
            "k": k,
            "prompt": a.k_prompt,
            "response": a.response,
            "s_per_example": wall / a.batch,
            "cpu_s_per_example": cpu / a.batch,
            "s_per_response": wall / a.batch / k,
            "peak_rss_mb": res["peak_rss_mb"],
        }
        print(f"  K {k}: {json.dumps(point)}", file=sys.stderr, flush=True)
        points.append(point)
    return points


def _tables(res: dict[str, Any]) -> list[str]:
    """The markdown tables of the prompt-length and K sweeps that ran."""
    parts = []
    if "prompt" in res:
        parts.append(
            bu.md_table(
                [
                    "prompt tokens",
                    "TRL s/pair",
                    "preftune s/pair",
                    "speedup (wall)",
                    "speedup (CPU)",
                    "TRL peak MiB",
                    "preftune peak MiB",
                ],
                [
                    [
                        p["prompt"],
                        p["trl"]["s_per_pair"],
                        p["preftune"]["s_per_pair"],
                        p["speedup"],
                        p["speedup_cpu"],
                        round(p["trl"]["peak_rss_mb"]),
                        round(p["preftune"]["peak_rss_mb"]),
                    ]
                    for p in res["prompt"]
                ],
            )
        )
    if "k" in res:
        parts.append(
            bu.md_table(
                ["K", "s/example", "CPU s/example", "s/response", "peak MiB"],
                [
                    [
                        p["k"],
                        p["s_per_example"],
                        p["cpu_s_per_example"],
                        p["s_per_response"],
                        round(p["peak_rss_mb"]),
                    ]
                    for p in res["k"]
                ],
            )
        )
    return parts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--sweep", choices=["prompt", "k", "both"], default="both")
    ap.add_argument("--model-size", choices=sorted(bu.MODELS), default="quick")
    ap.add_argument("--prompts", default="128,256,512,1024,2048")
    ap.add_argument("--ks", default="2,4,8")
    ap.add_argument("--k-prompt", type=int, default=256)
    ap.add_argument("--response", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child_listwise(a)))
        return 0
    spec = bu.MODELS[a.model_size]
    bu.RESULTS_DIR.joinpath("tmp").mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {
        "command": "python benchmarks/scaling.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": bu.machine_info(),
        "model": spec,
        "params": bu.param_counts(spec),
        "batch": a.batch,
        "steps": a.steps,
    }
    with tempfile.TemporaryDirectory(dir=bu.RESULTS_DIR / "tmp") as tmp:
        work = Path(tmp)
        model = bu.save_model(spec, work / "model")
        if a.sweep in ("prompt", "both"):
            res["prompt"] = prompt_sweep(a, model, work)
        if a.sweep in ("k", "both"):
            res["k"] = k_sweep(a, model, work)
    parts = _tables(res)
    table = "\n\n".join(parts) + f"\n\nCommand: `{res['command']}`.\n"
    stem = "scaling" if a.sweep == "both" else f"scaling_{a.sweep}"
    bu.save_results(stem, res, table)
    print(table, file=sys.stderr)
    summary = {f"speedup_prompt{p['prompt']}": round(p["speedup"], 3) for p in res.get("prompt", [])}
    summary.update({f"s_per_example_k{p['k']}": round(p["s_per_example"], 3) for p in res.get("k", [])})
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
