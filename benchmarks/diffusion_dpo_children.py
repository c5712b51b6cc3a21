"""The child processes of diffusion_dpo_vs_diffusers.py: one training run per process.

- `script`: diffusers' `train_diffusion_dpo.py`, run unmodified with `runpy` (its own argv). The shims,
  all outside its code: (1) a stand-in `wandb` module when wandb is not installed (the script imports
  it at the top and uses it only with `--report_to wandb`); (2) torchvision's two operator-
  registration modules are skipped when its C extension cannot load (the local torchvision wheel is a
  CUDA build; the script uses only `torchvision.transforms`, which is pure PIL/torch); (3) observers
  that record, without changing anything: the first step's `add_noise` inputs (x_0, ε, t) and the
  UNet's first `encoder_hidden_states`, every `accelerator.log` row, and per-step time in the VAE
  encoder, the text encoder and the UNet forwards.
- `preftune`: `preftune.train.api.train` on the same pipeline folder and Parquet file (LoRA,
  reference = the policy with adapters disabled, as the script); `--cache-dir` decides cold (empty)
  or warm (filled by an earlier run) latents / text-embedding cache.
- `check`: preftune's loss on the script's first batch with the script's ε and t (see `child_check`).

Every child prints one JSON object as its last stdout line; the parent adds peak RSS (wait4).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import types
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench_utils as bu

TIMED = ("vae_encode", "text_encode", "unet_forward")


class PhaseClock:
    """Wall and CPU seconds spent in wrapped methods, per optimizer step (the step clock's intervals);
    CPU time as `PHASE_cpu` (process CPU: the children run one thread)."""

    def __init__(self, stamps: list[tuple[float, float]]) -> None:
        self.stamps = stamps
        self.per_step: list[dict[str, float]] = []

    def wrap(self, cls: Any, name: str, phase: str) -> None:
        original = getattr(cls, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                step = len(self.stamps)
                while len(self.per_step) <= step:
                    self.per_step.append(defaultdict(float))
                self.per_step[step][phase] += time.perf_counter() - t0
                self.per_step[step][f"{phase}_cpu"] += time.process_time() - c0

        setattr(cls, name, timed)

    def rows(self) -> list[dict[str, float]]:
        return [dict(r) for r in self.per_step]


def _shim_imports(site: str) -> list[str]:
    """Let the script import offline on a CPU-only torch; returns what was shimmed. `site`: a folder
    holding the script's extra packages (torchvision), put on sys.path for this process only — never
    into the bench venv itself, where a torchvision whose ops cannot load breaks transformers."""
    import importlib.machinery
    import importlib.util

    done = []
    if site:
        sys.path.append(site)
    if importlib.util.find_spec("wandb") is None:
        stub = types.ModuleType("wandb")
        stub.Image = None  # type: ignore[attr-defined]
        stub.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        sys.modules["wandb"] = stub
        done.append("wandb: stand-in module (not installed; used only with --report_to wandb)")
    if importlib.util.find_spec("torchvision") is None:
        raise SystemExit(
            "the script imports torchvision: run benchmarks/setup_bench_env.sh (it installs torchvision into "
            ".bench-venv/diffusers-script-site, outside the venv) or pass --site FOLDER"
        )
    try:
        import torchvision  # noqa: F401
    except RuntimeError:  # "operator torchvision::nms does not exist": a CUDA build of its C ops
        for name in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[name]
        for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
            sys.modules[name] = types.ModuleType(name)
        import torchvision  # noqa: F401

        done.append("torchvision: op registrations skipped (CUDA build of its C ops; transforms only)")
    return done


def child_script(a: argparse.Namespace) -> dict[str, Any]:
    import runpy

    import torch

    torch.set_num_threads(a.threads)
    shims = _shim_imports(a.site)
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    stamps = bu.install_step_clock()
    clock = PhaseClock(stamps)
    clock.wrap(AutoencoderKL, "encode", "vae_encode")
    clock.wrap(CLIPTextModel, "forward", "text_encode")
    clock.wrap(UNet2DConditionModel, "forward", "unet_forward")
    first: dict[str, Any] = {}
    add_noise = DDPMScheduler.add_noise

    def recording_add_noise(self: Any, x0: Any, noise: Any, t: Any) -> Any:
        if "x0" not in first:
            first.update(x0=x0.detach().clone(), noise=noise.detach().clone(), t=t.detach().clone())
        return add_noise(self, x0, noise, t)

    DDPMScheduler.add_noise = recording_add_noise  # type: ignore[method-assign]
    unet_forward = UNet2DConditionModel.forward

    def recording_forward(
        self: Any, sample: Any, timestep: Any, encoder_hidden_states: Any, *args: Any, **kw: Any
    ) -> Any:
        if "text" not in first:
            first["text"] = encoder_hidden_states.detach().clone()
        return unet_forward(self, sample, timestep, encoder_hidden_states, *args, **kw)

    UNet2DConditionModel.forward = recording_forward  # type: ignore[method-assign]
    logs: list[dict[str, float]] = []
    log = Accelerator.log

    def recording_log(self: Any, values: dict[str, Any], step: int | None = None, **kw: Any) -> Any:
        logs.append({k: float(v) for k, v in values.items()})
        return log(self, values, step=step, **kw)

    Accelerator.log = recording_log  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as tmp:
        argv = [
            a.script,
            "--pretrained_model_name_or_path", a.model,
            "--dataset_name", str(Path(a.data).parent),
            "--dataset_split_name", "train",
            "--output_dir", str(Path(tmp) / "out"),
            "--cache_dir", str(Path(tmp) / "hf"),
            "--resolution", str(a.resolution),
            "--train_batch_size", str(a.batch),
            "--max_train_steps", str(a.steps),
            "--checkpointing_steps", str(10**9),
            "--learning_rate", str(a.lr),
            "--lr_scheduler", "constant",
            "--lr_warmup_steps", "0",
            "--beta_dpo", str(round(a.beta / 2)),  # its β_dpo (an int) has the ½ folded in (seam.py)
            "--rank", str(a.rank),
            "--seed", str(a.seed),
            "--no_hflip",
            "--report_to", "tensorboard",
        ]  # fmt: skip
        rss0 = bu.rss_mb()
        start = (time.perf_counter(), time.process_time())
        sys.argv = argv
        runpy.run_path(a.script, run_name="__main__")
        torch.save(first, a.record)
    return {
        "side": "script",
        "shims": shims,
        "train_start": start,
        "stamps": stamps,
        "rss_after_imports_mb": rss0,
        "losses": [r["loss"] for r in logs],
        "first_logs": logs[0] if logs else {},
        "phases": clock.rows(),
    }


def preftune_config(a: argparse.Namespace, out: Path) -> Any:
    """The preftune side's settings: those of the script's run (LoRA r = α = rank on the attention
    projections, the adapter-disabled policy as reference, AdamW weight decay 0.01, clip 1.0)."""
    return bu.preftune_config(
        model=a.model,
        data=a.data,
        out=out,
        steps=a.steps,
        batch=a.batch,
        lr=a.lr,
        hparams={"dpo.beta": a.beta},
        lora=True,
        lora_r=a.rank,
        lora_alpha=float(a.rank),
        reference="adapter",
        weight_decay=0.01,
        max_grad_norm=1.0,
        optimizer_args={},  # preftune's default AdamW (the fused kernel); LoRA-only, negligible either way
        seed=a.seed,
        cache_dir=a.cache_dir,
    )


def child_preftune(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(a.threads)
    from diffusers import UNet2DConditionModel

    from preftune.train.api import train

    stamps = bu.install_step_clock()
    clock = PhaseClock(stamps)
    clock.wrap(UNet2DConditionModel, "forward", "unet_forward")
    cache = Path(a.cache_dir) / "diffusion"
    warm = cache.is_dir() and any(cache.glob("*.safetensors"))
    with tempfile.TemporaryDirectory() as tmp:
        rss0 = bu.rss_mb()
        start = (time.perf_counter(), time.process_time())
        train(preftune_config(a, Path(tmp) / "run"))
        metrics = [
            json.loads(ln)
            for ln in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
            if ln.strip()
        ]
    losses = [float(m["loss"]) for m in metrics if m.get("split", "train") == "train" and "loss" in m]
    return {
        "side": "preftune_warm" if warm else "preftune_cold",
        "train_start": start,
        "stamps": stamps,
        "rss_after_imports_mb": rss0,
        "losses": losses,
        "phases": clock.rows(),
    }


def _match(rows: Any, candidates: list[Any]) -> tuple[list[int], float]:
    """For each row, the index of the nearest candidate tensor, and the largest distance (max |Δ|)."""
    import torch

    found, worst = [], 0.0
    for row in rows:
        gaps = [float((row - c).abs().max()) for c in candidates]
        k = int(torch.tensor(gaps).argmin())
        found.append(k)
        worst = max(worst, gaps[k])
    return found, worst


def child_check(a: argparse.Namespace) -> dict[str, Any]:
    """preftune's first-step loss on the script's first batch, with the script's ε and t.

    The script recorded its first step's clean latents x_0 (winners then losers, re-encoded by its VAE
    from the JPEG bytes), ε, t and text embeddings. Each of its pairs is found among preftune's
    cached examples by nearest latents (the distance is reported: it checks preftune's cache), and
    preftune's `denoising_example_stats` (what its trainer calls) runs on those examples with
    `example_noise` returning the script's ε and t — the only substitution. The policy is the pipeline's
    UNet with LoRA through preftune's loader (B = 0 at init, as the script's), the reference the same
    with adapters disabled; the loss is the registered `dpo` with β = 5000."""
    import torch

    import preftune.diffusion.denoiser as den
    from preftune import losses
    from preftune.diffusion.phase import load_image_examples
    from preftune.models.load import LoraSettings
    from preftune.types import PreferenceBatch

    rec = torch.load(a.record)
    cfg = preftune_config(a, Path(a.cache_dir) / "unused")
    examples = load_image_examples(a.data, cfg, "pairwise", split=None, log=lambda _m: None)
    pairs = rec["x0"].shape[0] // 2
    winners, w_gap = _match(rec["x0"][:pairs], [e.meta["latents"][0] for e in examples])  # type: ignore[index]
    chosen = [examples[k] for k in winners]
    _, l_gap = _match(rec["x0"][pairs:], [e.meta["latents"][1] for e in chosen])  # type: ignore[index]
    _, text_gap = _match(rec["text"][:pairs], [e.meta["text"][0] for e in chosen])  # type: ignore[index]
    for i, e in enumerate(chosen):
        e.meta.update(bench_noise=rec["noise"][i], bench_t=rec["t"][i : i + 1])
    den.example_noise = lambda e, *_args, **_kw: (e.meta["bench_noise"], e.meta["bench_t"])
    lora = LoraSettings(r=a.rank, alpha=float(a.rank), dropout=0.0, target_modules="all-linear")
    model = den.load_denoiser(a.model, lora=lora)
    with torch.no_grad():
        policy = den.denoising_example_stats(model, chosen).logps.view(pairs, 2)
        with model.disable_adapter():
            ref = den.denoising_example_stats(model, chosen).logps.view(pairs, 2)
    ones = torch.ones(policy.shape, dtype=torch.int64)
    out = losses.get("dpo")(
        PreferenceBatch(policy_logps=policy, lengths=ones, ref_logps=ref), {}, beta=a.beta
    )
    return {
        "side": "check",
        "loss": float(out.losses.mean()),
        "raw_model_loss": float((-2 * policy).mean()),  # mse = −2 · logp; the script's 0.5·(w̄ + l̄)
        "ref_loss": float((-2 * ref).mean()),
        "latent_gap_winners": w_gap,
        "latent_gap_losers": l_gap,
        "text_gap": text_gap,
        "log2": math.log(2),
    }


def child_rates(a: argparse.Namespace) -> dict[str, Any]:
    """The VAE's and UNet's achieved FLOP rates and the UNet's top operators (`op_rates`)."""
    import torch

    import diffusion_bench_data as bd

    torch.set_num_threads(a.threads)
    spec = bd.PipeSpec(**json.loads((Path(a.model) / "bench_spec.json").read_text()))
    return {"side": "rates", **bd.op_rates(spec, Path(a.model))}


CHILDREN: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "rates": child_rates,
    "script": child_script,
    "preftune": child_preftune,
    "check": child_check,
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("child", choices=sorted(CHILDREN))
    for name in ("model", "data", "script", "record", "cache_dir", "site"):
        ap.add_argument(f"--{name.replace('_', '-')}", default="")
    for name, kind, default in (
        ("batch", int, 4), ("steps", int, 10), ("rank", int, 4), ("seed", int, 0), ("threads", int, 1),
        ("resolution", int, 64), ("lr", float, 1e-5), ("beta", float, 5000.0),
    ):  # fmt: skip
        ap.add_argument(f"--{name}", type=kind, default=default)
    a = ap.parse_args()
    res = CHILDREN[a.child](a)
    res["peak_rss_self_mb"] = bu.peak_rss_self_mb()
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
