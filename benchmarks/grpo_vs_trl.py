"""GRPO throughput and peak memory: `preftune train grpo` against TRL 1.16's GRPOTrainer.

    .bench-venv/bin/python benchmarks/grpo_vs_trl.py --quick  # minutes on 2 CPU cores
    .bench-venv/bin/python benchmarks/grpo_vs_trl.py          # the full measurement (docs/performance.md)

Same conditions on both sides: one Llama model built from a config (float32, vocab 32k, the word
tokenizer of bench_utils, so both sides see the same tokens), the same 16 prompts × 8 generations
per optimizer step, the same max completion length (a random model rarely emits EOS, so nearly every
completion uses it all), temperature 1, β = 0 (no reference model), TRL's `loss_type="dapo"` against
preftune's token mean (its default), ε = 0.2, one optimizer step per batch of rollouts, fused AdamW,
constant lr, the same reward function (grpo_children.reward).

Sides (`--sides`): `trl` is TRL as it runs on CPU; `trl_gpu` is the same TRL with its GPU scoring
path. TRL 1.16 sends the hidden states through its fused chunked LM-head kernel
(`trl.trainer.utils.add_fused_lm_head`); on devices with Triton it scores only the positions whose
label is a completion token, elsewhere (CPU included) every position, the ~250 prompt tokens of a
prompt-heavy sample too, and masks the result afterwards. `trl_gpu` makes that one decision answer
"compact" on CPU, as dpo_children.py's `gpu` variant does, so its row shows what TRL costs when its
vocabulary layer runs on completion tokens only, as it does on a GPU. β = 0 leaves no reference
model to precompute, fused AdamW is on, gradient checkpointing is off on both sides (GRPOConfig
turns it on by default; preftune's side recomputes nothing), and the step is one forward/backward
over the generation batch (TRL's default); `torch_compile` was not measured for GRPO
(docs/performance.md §6).

Two shapes: `prompt_heavy` (~250-token prompts) and `short` (the quickstart's ~10-token prompts).
Each side runs in a fresh process; the order alternates between repetitions; medians are reported.
A step is timed by the optimizer hook of bench_utils (the first step is not timed) and split into
generation, reward and the rest (log-probs, loss, backward, update). Peak memory is the child's
peak RSS. `--quick` prints a last JSON line with `speedup` (completions/s, prompt-heavy),
`speedup_short` and `memory_ratio` (prompt-heavy), and writes only into benchmarks/results/tmp/.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_utils as bu  # noqa: E402
from grpo_children import child_preftune, child_trl  # noqa: E402

SHAPES = {"prompt_heavy": ((224, 288), 64), "short": ((6, 12), 48)}  # prompt tokens, completion budget
SIDES = ("trl", "trl_gpu", "preftune")


def write_prompts(path: Path, n: int, lengths: tuple[int, int], seed: int, vocab: int) -> Path:
    rng = random.Random(seed)
    rows = [" ".join(f"w{rng.randrange(4, vocab)}" for _ in range(rng.randint(*lengths))) for _ in range(n)]
    path.write_text("".join(json.dumps({"prompt": r}) + "\n" for r in rows))
    return path


def summarise(res: dict[str, Any], completions: int) -> dict[str, Any]:
    s_per_step, cpu_per_step, n = bu.steps_rate(res["stamps"], skip=1)
    length = bu.median(res["completion_length"][1:] or res["completion_length"])
    gen, rew = bu.median(res["generate_s"][1:] or [0.0]), bu.median(res["reward_s"][1:] or [0.0])
    return {
        "completions_s": completions / s_per_step,
        "tokens_s": completions * length / s_per_step,
        "s_per_step": s_per_step,
        "cpu_s_per_step": cpu_per_step,
        "generate_s": gen,
        "reward_s": rew,
        "rest_s": s_per_step - gen - rew,  # log-probs, loss, backward, optimizer step
        "completion_length": length,
        "timed_steps": n,
        "first_loss": res["losses"][0] if res["losses"] else float("nan"),
        "peak_rss_mb": res["peak_rss_mb"],
        "load_average": res["load_average"],
    }


def measure(name: str, a: argparse.Namespace, model: Path, work: Path) -> dict[str, Any]:
    lengths, budget = SHAPES[name]
    lengths = (max(1, round(lengths[0] * a.scale)), max(1, round(lengths[1] * a.scale)))
    budget = max(2, round(budget * a.scale))
    prompts = write_prompts(
        work / f"{name}.jsonl", a.prompts, lengths, a.seed + 1, bu.MODELS[a.model_size].vocab_size
    )
    common = ["--model", str(model), "--prompts", str(prompts), "--steps", str(a.steps), "--lr", str(a.lr)]
    common += ["--generations", str(a.generations), "--max-completion", str(budget), "--seed", str(a.seed)]
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in a.sides}
    for rep in range(a.reps):
        for side in a.sides if rep % 2 == 0 else list(reversed(a.sides)):
            load0 = bu.load_average()
            res = bu.run_child([__file__, "--child", side, *common], timeout=a.child_timeout)
            res["load_average"] = [load0, bu.load_average()]
            runs[side].append(summarise(res, a.prompts * a.generations))
            print(f"  {name} rep {rep + 1} {side}: {runs[side][-1]['completions_s']:.2f} completions/s, "
                  f"peak {runs[side][-1]['peak_rss_mb']:.0f} MiB, load {load0[0]}", file=sys.stderr, flush=True)  # fmt: skip
    keys = [k for k in runs[a.sides[0]][0] if k != "load_average"]
    med = {s: {k: bu.median([r[k] for r in rs]) for k in keys} for s, rs in runs.items()}
    out: dict[str, Any] = {
        "prompt_tokens": lengths,
        "max_completion_length": budget,
        "runs": runs,
        "median": med,
    }
    p = med.get("preftune")
    out["ratios"] = {
        peer: {
            "speedup": p["completions_s"] / t["completions_s"],
            "speedup_cpu_time": t["cpu_s_per_step"] / p["cpu_s_per_step"],
            "memory_ratio": p["peak_rss_mb"] / t["peak_rss_mb"],
            "generate_speedup": t["generate_s"] / max(p["generate_s"], 1e-9),
            "rest_speedup": t["rest_s"] / max(p["rest_s"], 1e-9),
        }
        for peer, t in med.items()
        if p is not None and peer != "preftune"
    }
    return out


def render(res: dict[str, Any]) -> str:
    rows = [
        [n, s, m["completions_s"], m["tokens_s"], m["generate_s"], m["reward_s"], m["rest_s"],
         round(m["peak_rss_mb"]), m["first_loss"]]
        for n, r in res["shapes"].items() for s, m in r["median"].items()
    ]  # fmt: skip
    head = ["shape", "side", "completions/s", "completion tokens/s", "generation s/step", "reward s/step"]
    head += ["log-probs+backward+update s/step", "peak RSS MiB", "first-step loss"]
    keys = ("speedup", "speedup_cpu_time", "generate_speedup", "rest_speedup", "memory_ratio")
    ratios = [[n, peer, *(x[k] for k in keys)]
              for n, r in res["shapes"].items() for peer, x in r["ratios"].items()]  # fmt: skip
    rhead = ["shape", "preftune vs", "speedup (completions/s)", "speedup (CPU time)", "generation speedup"]
    rhead += ["train-part speedup", "memory ratio"]
    loads = [
        lv[0][0]
        for r in res["shapes"].values()
        for rs in r["runs"].values()
        for x in rs
        for lv in [x["load_average"]]
    ]
    return (
        f"{bu.md_table(head, rows)}\n\n{bu.md_table(rhead, ratios)}\n\nCommand: `{res['command']}`; "
        f"{res['reps']} repetitions × {res['steps']} steps of {res['prompts']} prompts × {res['generations']} "
        f"generations, model {res['params']['total'] / 1e6:.1f}M params; 1-min load average "
        f"{min(loads, default=0):.2f}–{max(loads, default=0):.2f}. First step not timed.\n"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--max-completion", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="8M model, 2 reps × 3 steps: minutes")
    ap.add_argument(
        "--smoke", action="store_true", help="tiny model and lengths, 1 rep × 2 steps: code paths only"
    )
    ap.add_argument("--model-size", choices=sorted(bu.MODELS), default="20m")
    ap.add_argument(
        "--scale", type=float, default=1.0, help="multiply prompt lengths and the completion budget"
    )
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per run (the first is not timed)")
    ap.add_argument("--prompts", default="16", help="prompts per step (a child: the prompt file)")
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sides", default=",".join(SIDES))
    ap.add_argument("--shapes", default="prompt_heavy,short")
    ap.add_argument("--child-timeout", type=float, default=3600.0)
    ap.add_argument("--name", default=None, help="results file stem (default grpo_vs_trl[_quick|_smoke])")
    a = ap.parse_args(argv)
    if a.quick:
        a.reps, a.steps, a.model_size = 2, 3, "quick"
    if a.smoke:
        a.reps, a.steps, a.model_size, a.scale, a.prompts, a.generations = 1, 2, "tiny", 0.1, "2", 2
        a.shapes = "prompt_heavy"
    if not a.child:
        a.prompts, a.sides = int(a.prompts), [s for s in a.sides.split(",") if s]
        if not a.sides or set(a.sides) - set(SIDES):
            ap.error(f"--sides: choose from {','.join(SIDES)}")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.child:
        out = child_preftune(a) if a.child == "preftune" else child_trl(a, gpu_path=a.child == "trl_gpu")
        print(json.dumps(out))
        return 0
    spec, t0 = bu.MODELS[a.model_size], time.time()
    bu.RESULTS_DIR.joinpath("tmp").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=bu.RESULTS_DIR / "tmp") as tmp:
        model = bu.save_model(spec, Path(tmp) / "model", seed=a.seed)
        shapes = {}
        for name in a.shapes.split(","):
            print(f"[grpo_vs_trl] {name}", file=sys.stderr, flush=True)
            shapes[name] = measure(name, a, model, Path(tmp))
    res = {
        "command": "python benchmarks/grpo_vs_trl.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": bu.machine_info(), "model": asdict(spec), "params": bu.param_counts(spec),
        "reps": a.reps, "steps": a.steps, "prompts": a.prompts, "generations": a.generations,
        "shapes": shapes, "elapsed_s": time.time() - t0,
    }  # fmt: skip
    stem = a.name or ("grpo_vs_trl_smoke" if a.smoke else "grpo_vs_trl_quick" if a.quick else "grpo_vs_trl")
    jp, _ = bu.save_results(stem, res, render(res), quick=a.quick or a.smoke)
    print(render(res), file=sys.stderr)
    print(f"[grpo_vs_trl] results: {jp}", file=sys.stderr)

    def ratio(shape: str, peer: str, key: str) -> Any:
        return shapes.get(shape, {}).get("ratios", {}).get(peer, {}).get(key)

    headline = {
        "speedup": ratio("prompt_heavy", "trl", "speedup"),
        "speedup_short": ratio("short", "trl", "speedup"),
        "memory_ratio": ratio("prompt_heavy", "trl", "memory_ratio"),
        "speedup_gpu_path": ratio("prompt_heavy", "trl_gpu", "speedup"),
        "speedup_short_gpu_path": ratio("short", "trl_gpu", "speedup"),
        "elapsed_s": round(res["elapsed_s"], 1),
    }
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in headline.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
