"""The ODE solvers `preftune sample --solver NAME` runs, for each kind of pipeline.

A pipeline is variance-preserving (ε / v prediction on a DDPM schedule: Stable Diffusion 1.x/2.x)
or a rectified flow (a FlowMatch scheduler, v = ε − x_0: SD3-style pipelines and the built-in task
pretrained on the flow loss). A solver is built from the pipeline's scheduler config:

| solver | ε/v pipelines | flow pipelines |
|---|---|---|
| `ddim` (ε/v default) | diffusers `DDIMScheduler` (η = 0) | refused |
| `flow-euler` (flow default) | refused | diffusers `FlowMatchEulerDiscreteScheduler` (what SD3's pipeline runs) |
| `flow-heun` | refused | diffusers `FlowMatchHeunDiscreteScheduler` (2 model calls a step) |
| `dpm++`, `unipc` | diffusers' DPM-Solver++(2M), UniPC | the same with `use_flow_sigmas`, `prediction_type="flow_prediction"` and the pipeline's `shift` |
| `deis` | diffusers' DEIS | refused: with flow sigmas it converged at first order only (no better than flow-euler) on the exact Gaussian test |
| `time-shift` | preftune's `TimeShiftDDIMScheduler` | refused: it is built on ᾱ_t of a VP schedule |

preftune's calibrated solvers (DPM-Solver-v3, DC-Solver, USF, searched steps) need
`scheduler.calibrate(model_fn, samples, steps)` and are Python-only (`preftune.diffusion.schedulers`);
they too are built on a VP schedule. `solve` is diffusers' sampling loop (no guidance).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from preftune.diffusion.seam import denoiser_output, prediction_type_of
from preftune.errors import ConfigError

__all__ = ["SOLVERS", "default_solver", "solve", "solver_scheduler"]

# name → (takes VP pipelines, takes flow pipelines)
SOLVERS: dict[str, tuple[bool, bool]] = {
    "ddim": (True, False),
    "flow-euler": (False, True),
    "flow-heun": (False, True),
    "dpm++": (True, True),
    "unipc": (True, True),
    "deis": (True, False),
    "time-shift": (True, False),
}
_PYTHON_ONLY = ("dpm-v3", "dc-solver", "usf", "searched")


def default_solver(scheduler: Any) -> str:
    return "flow-euler" if prediction_type_of(scheduler) == "flow" else "ddim"


def _refusal(name: str, flow: bool) -> str:
    kind = "a flow-matching pipeline" if flow else "an ε/v (variance-preserving) pipeline"
    valid = ", ".join(n for n, takes in SOLVERS.items() if takes[1 if flow else 0])
    if name in _PYTHON_ONLY:
        why = (
            f"{name} needs scheduler.calibrate(model_fn, samples, steps) and runs from Python "
            "(preftune.diffusion.schedulers), on ε/v pipelines"
        )
    elif name in SOLVERS:
        why = f"--solver {name} does not integrate {kind}" + (
            " (it steps σ of a flow)"
            if not flow
            else " (diffusers' DEIS on flow sigmas converged at first order only)"
            if name == "deis"
            else " (it is built on the ᾱ_t of a variance-preserving schedule)"
        )
    else:
        why = f"--solver {name!r} is unknown"
    return f"{why}; for {kind} pass --solver with one of: {valid}"


def solver_scheduler(name: str, scheduler: Any) -> Any:
    """The diffusers scheduler of solver `name` on the pipeline's training `scheduler`'s config;
    ConfigError naming the solvers that suit the pipeline when `name` does not."""
    import diffusers

    from preftune.diffusion.schedulers import TimeShiftDDIMScheduler

    flow = prediction_type_of(scheduler) == "flow"
    if name not in SOLVERS or not SOLVERS[name][1 if flow else 0]:
        raise ConfigError(_refusal(name, flow))
    classes: dict[str, Any] = {
        "ddim": diffusers.DDIMScheduler,
        "flow-euler": diffusers.FlowMatchEulerDiscreteScheduler,
        "flow-heun": diffusers.FlowMatchHeunDiscreteScheduler,
        "dpm++": diffusers.DPMSolverMultistepScheduler,
        "unipc": diffusers.UniPCMultistepScheduler,
        "deis": diffusers.DEISMultistepScheduler,
        "time-shift": TimeShiftDDIMScheduler,
    }
    cls = classes[name]
    known = set(inspect.signature(cls.__init__).parameters)  # the keys this class reads, no warnings
    config = {k: v for k, v in scheduler.config.items() if k in known}
    if flow and name in ("dpm++", "unipc"):
        shift = float(scheduler.config.get("shift", 1.0))
        config.update(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift)
    return cls.from_config(config)


@torch.no_grad()
def solve(model: Any, scheduler: Any, cond: torch.Tensor, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """Final latents [N, C, H, W] of `scheduler`'s sampler on `steps` steps from `noise`: the loop of
    diffusers' pipelines (initial σ, `scale_model_input` where the scheduler has it, `step`), the
    denoiser called through `seam.denoiser_output` (a UNet, or an SD3 transformer on packed c)."""
    scheduler.set_timesteps(steps)
    x = noise * float(getattr(scheduler, "init_noise_sigma", 1.0))
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        out = denoiser_output(model, inp, t.expand(x.shape[0]).to(x.device), cond)
        x = scheduler.step(out, t, x).prev_sample
    return x
