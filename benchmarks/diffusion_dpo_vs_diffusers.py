"""Diffusion-DPO: preftune against diffusers' research script `train_diffusion_dpo.py`.

    # the peer (Apache-2.0, not vendored): diffusers' examples/research_projects/diffusion_dpo/
    git clone --depth 1 https://github.com/huggingface/diffusers /tmp/diffusers
    .bench-venv/bin/python benchmarks/diffusion_dpo_vs_diffusers.py \
        --script /tmp/diffusers/examples/research_projects/diffusion_dpo/train_diffusion_dpo.py
    .bench-venv/bin/python benchmarks/diffusion_dpo_vs_diffusers.py --quick   # preftune side only

Both sides train LoRA (rank 4, α = 4, on to_q/to_k/to_v/to_out.0) on the UNet of the same pipeline
folder (`diffusion_bench_data.SPECS`, saved with `save_pretrained`) with the same Pick-a-Pic Parquet
file, β = 5000 in the paper's units (the script's `--beta_dpo 2500`: it folds the ½ of −½·mse into
β), lr 1e-5 constant, AdamW with weight decay 0.01, clipping 1.0, batch 4 pairs, the reference being
the policy with adapters disabled, float32, one thread each. Each run is a fresh process
(`diffusion_dpo_children.py`); the script runs unmodified (the shims are listed there and in the
results). preftune runs twice per repetition: cold (empty latents / text-embedding cache: it encodes
every image and caption once before its first step) and warm (the cache the cold run filled).

Reported per side: pairs/s = batch / median step time over the steps after `--warmup` (each step is
the interval between optimizer steps: data, encoding, forwards, backward, update), CPU s/step, the
time to the first step (start-up, loading and, for preftune cold, the encoding), peak RSS (wait4),
the first-step loss; the ratios preftune / script; and where each side's step time goes (VAE encoder,
text encoder, UNet forwards, the rest: backward + update + data). The first-step check reruns
preftune's statistic and loss on the script's first batch with the script's ε and t (see
`diffusion_dpo_children.child_check`). `--quick` writes only to benchmarks/results/tmp/.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_utils as bu  # noqa: E402
import diffusion_bench_data as bd  # noqa: E402

HERE = Path(__file__).resolve().parent
CHILD = str(HERE / "diffusion_dpo_children.py")
# The script's torchvision (setup_bench_env.sh): $PREFTUNE_DIFFUSERS_SCRIPT_SITE, else the bench venv's.
_SITES = [
    os.environ.get("PREFTUNE_DIFFUSERS_SCRIPT_SITE", ""),
    str(Path(sys.prefix) / "diffusers-script-site"),
]
_SITES.append(str(HERE.parent / ".bench-venv" / "diffusers-script-site"))
DEFAULT_SITE = next((Path(p) for p in _SITES if p and Path(p).is_dir()), None)
SIDES = ("script", "preftune_cold", "preftune_warm")
PARTS = ("vae_encode", "text_encode", "unet_forward")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="toy sizes, preftune side unless --script")
    ap.add_argument("--script", default=os.environ.get("PREFTUNE_DIFFUSERS_DPO_SCRIPT", ""),
                    help="path of diffusers' train_diffusion_dpo.py (none: preftune side only)")  # fmt: skip
    ap.add_argument("--site", default=str(DEFAULT_SITE or ""),
                    help="folder of the script's extra packages (torchvision), on its sys.path only")  # fmt: skip
    ap.add_argument("--size", choices=sorted(bd.SPECS), default=None)
    ap.add_argument("--pairs", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--beta", type=float, default=5000.0)
    ap.add_argument("--rates", action="store_true", help="also measure the VAE's and UNet's FLOP rates")
    a = ap.parse_args(argv)
    defaults = {"size": "quick", "pairs": 8, "batch": 2, "steps": 3, "warmup": 1, "reps": 1}
    if not a.quick:
        defaults = {"size": "bench", "pairs": 64, "batch": 4, "steps": 16, "warmup": 2, "reps": 3}
    for key, value in defaults.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.script and not Path(a.script).is_file():
        ap.error(f"--script {a.script}: no such file (see this file's docstring for how to get it)")
    return a


def run_side(a: argparse.Namespace, side: str, work: Path, cache: Path) -> dict[str, Any]:
    spec = bd.SPECS[a.size]
    common = [
        "--model", str(work / "pipe"), "--data", str(work / "data" / "train.parquet"),
        "--batch", str(a.batch), "--steps", str(a.steps), "--lr", str(a.lr), "--beta", str(a.beta),
        "--threads", str(a.threads), "--resolution", str(spec.resolution), "--cache-dir", str(cache),
        "--record", str(work / "first_step.pt"), "--script", a.script, "--site", a.site,
    ]  # fmt: skip
    child = "script" if side == "script" else "check" if side == "check" else "preftune"
    res = bu.run_child([CHILD, child, *common])
    res["load_average"] = bu.load_average()
    return res


def step_summary(res: dict[str, Any], a: argparse.Namespace) -> dict[str, Any]:
    """Median step wall / CPU time after the warm-up steps, pairs/s, start-up time, phase medians."""
    stamps = res["stamps"]
    if len(stamps) < a.warmup + 2:
        raise RuntimeError(f"{res['side']}: {len(stamps)} optimizer steps, need {a.warmup + 2}")
    idx = range(a.warmup + 1, len(stamps))
    wall = bu.median([stamps[k][0] - stamps[k - 1][0] for k in idx])
    cpu = bu.median([stamps[k][1] - stamps[k - 1][1] for k in idx])
    phases: dict[str, float] = {}
    rows = res.get("phases", [])
    for name in PARTS:
        for key in (name, f"{name}_cpu"):
            phases[key] = bu.median([rows[k].get(key, 0.0) if k < len(rows) else 0.0 for k in idx])
    phases["rest"] = max(0.0, wall - sum(phases[n] for n in PARTS))
    phases["rest_cpu"] = max(0.0, cpu - sum(phases[f"{n}_cpu"] for n in PARTS))
    return {
        "step_s": wall,
        "cpu_step_s": cpu,
        "pairs_per_s": a.batch / wall,
        "to_first_step_s": stamps[0][0] - res["train_start"][0],
        "process_wall_s": res["wall_s"],
        "peak_rss_mb": res["peak_rss_mb"],
        "rss_after_imports_mb": res["rss_after_imports_mb"],
        "first_loss": res["losses"][0] if res["losses"] else None,
        "losses": res["losses"],
        "phases_s": phases,
        "load_average": res["load_average"],
    }


def run_all(
    a: argparse.Namespace, work: Path
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any] | None]:
    sides = [s for s in SIDES if a.script or s != "script"]
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    raw: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    for rep in range(a.reps):
        cache = work / f"cache{rep}"
        order = sides if rep % 2 == 0 or not a.script else [*sides[1:], "script"]
        for side in order:
            res = run_side(a, side, work, cache)
            if res["side"] != side:
                raise RuntimeError(f"expected a {side} run, the child ran {res['side']}")
            raw[side].append(res)
            runs[side].append(step_summary(res, a))
            print(f"rep {rep} {side}: {runs[side][-1]['pairs_per_s']:.3g} pairs/s, "
                  f"{runs[side][-1]['peak_rss_mb']:.0f} MiB", flush=True)  # fmt: skip
    check = None
    if a.script:
        try:
            check = run_side(a, "check", work, work / "cache0")
        except RuntimeError as err:  # keep the timed runs: the check failing is reported, not fatal
            print(f"first-step check failed: {err}", file=sys.stderr)
            return runs, {"error": str(err)[-2000:]}
        check["script_first_logs"] = raw["script"][0]["first_logs"]
        check["script_shims"] = raw["script"][0]["shims"]
    return runs, check


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    out = {}
    for side, rs in runs.items():
        out[side] = {
            key: bu.median([r[key] for r in rs])
            for key in (
                "pairs_per_s",
                "step_s",
                "cpu_step_s",
                "to_first_step_s",
                "process_wall_s",
                "peak_rss_mb",
            )
        }
        out[side]["first_loss"] = rs[0]["first_loss"]
        out[side]["phases_s"] = {k: bu.median([r["phases_s"][k] for r in rs]) for k in rs[0]["phases_s"]}
    if "script" in out:
        base = out["script"]
        for side in ("preftune_cold", "preftune_warm"):
            out[side]["pairs_per_s_ratio"] = out[side]["pairs_per_s"] / base["pairs_per_s"]
            out[side]["cpu_ratio"] = base["cpu_step_s"] / out[side]["cpu_step_s"]
            out[side]["peak_rss_ratio"] = out[side]["peak_rss_mb"] / base["peak_rss_mb"]
    return out


def flop_model(a: argparse.Namespace) -> dict[str, Any]:
    """Expected step-cost ratio from forward FLOPs: the script pays VAE encode per image and text
    encode per pair on top of the 3 UNet passes per image (policy forward, its backward to the
    inputs — LoRA leaves the base weights without gradients — and the reference forward) both pay."""
    out = {}
    for name, counts in ((a.size, bd.flops_per_image(bd.SPECS[a.size])), ("sd15_512px", bd.sd15_flops())):
        unet = 3 * counts["unet_forward"]
        out[name] = {
            **counts,
            "vae_over_unet_forward": counts["vae_encode"] / counts["unet_forward"],
            "expected_ratio": (unet + counts["vae_encode"] + counts["text_encode"] / 2) / unet,
        }
    return out


def table(summary: dict[str, dict[str, Any]], check: dict[str, Any] | None) -> str:
    header = [
        "side",
        "pairs/s",
        "ratio",
        "CPU s/step",
        "CPU ratio",
        "to 1st step s",
        "peak RSS MiB",
        "RSS ratio",
        "1st loss",
    ]
    rows = []
    for side, s in summary.items():
        rows.append([
            side, s["pairs_per_s"], s.get("pairs_per_s_ratio", "-"), s["cpu_step_s"], s.get("cpu_ratio", "-"),
            s["to_first_step_s"],
            s["peak_rss_mb"], s.get("peak_rss_ratio", "-"), s["first_loss"],
        ])  # fmt: skip
    text = bu.md_table(header, rows)
    parts = [*PARTS, "rest"]
    phase_rows = [[side, *(s["phases_s"][f"{k}_cpu"] for k in parts), *(s["phases_s"][k] for k in parts)]
                  for side, s in summary.items()]  # fmt: skip
    text += (
        "\n\nMedian CPU seconds, then wall seconds, per step in each part (rest: backward, update, data):\n\n"
    )
    names = ["VAE encode", "text encode", "UNet forwards", "rest"]
    text += bu.md_table(["side", *(f"{n} CPU" for n in names), *(f"{n} wall" for n in names)], phase_rows)
    if check and "error" in check:
        text += "\n\nFirst-step check FAILED (see first_step_check.error in the JSON)"
    elif check:
        logs = check["script_first_logs"]
        text += (
            f"\n\nFirst step on the script's batch, ε and t: loss script {logs['loss']:.9g} / preftune "
            f"{check['loss']:.9g}; policy mse {logs['raw_model_loss']:.9g} / {check['raw_model_loss']:.9g}; "
            f"reference mse {logs['ref_loss']:.9g} / {check['ref_loss']:.9g}; largest latent gap "
            f"{max(check['latent_gap_winners'], check['latent_gap_losers']):.2g}, text gap {check['text_gap']:.2g}"
        )
    return text


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        spec = bd.SPECS[a.size]
        bd.save_pipeline(spec, work / "pipe")
        bd.write_pickapic(work / "data", a.pairs, spec)
        runs, check = run_all(a, work)
        rates = (
            bu.run_child([CHILD, "rates", "--model", str(work / "pipe"), "--threads", str(a.threads)])
            if a.rates
            else None
        )
    summary = summarise(runs)
    md = table(summary, check)
    data = {
        "settings": {k: v for k, v in vars(a).items() if k != "site"},
        "spec": spec,
        "machine": bu.machine_info(),
        "summary": summary,
        "runs": runs,
        "first_step_check": check,
        "flop_model": flop_model(a),
        "rates": rates,
    }
    name = "diffusion_dpo_vs_diffusers" + ("" if a.size in ("bench", "quick") else f"_{a.size}")
    jp, _ = bu.save_results(name, data, md, quick=a.quick)
    print(md)
    print(f"results: {jp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
