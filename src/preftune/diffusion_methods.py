"""The online diffusion RL methods of `preftune train` and their options (imports no torch).

    preftune train ddpo --model PIPELINE_FOLDER --prompts prompts.jsonl --reward shapes --out runs/ddpo

A method name here (ddpo, dpok, d3po, spo, awm) on a diffusers pipeline folder trains the denoiser
on its own samples (`preftune.diffusion.online_run`); each option below is a `--key value` flag (or a
YAML key), its default the paper's where the paper gives one (docs/diffusion.md, "Online RL").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Option:
    """One option of an online diffusion method: default per method, range and help text."""

    defaults: dict[str, Any]  # method → default (methods that take the option)
    help: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()


METHODS: dict[str, str] = {
    "ddpo": "Black et al. 2023, DDPO (arXiv 2305.13301): per-prompt standardised rewards, PPO-clip over "
    "every denoising step",
    "dpok": "Fan et al. 2023, DPOK (arXiv 2305.16381): policy gradient with a value baseline + KL to the "
    "pretrained model",
    "d3po": "Yang et al. 2024, D3PO (arXiv 2311.13231): two chains per prompt from one noise, the better "
    "final image's chain wins at every step (DPO form on clipped step ratios)",
    "spo": "Liang et al. 2024, SPO (arXiv 2406.04314): per step, k candidates scored by a step-aware "
    "preference model, best vs worst",
    "awm": "Xue et al. 2025, AWM (arXiv 2509.25050), flow-matching pipelines: advantage-weighted "
    "pretraining loss with PPO-clip",
}

_SAMPLED = dict.fromkeys(("ddpo", "dpok", "d3po", "spo"))

OPTIONS: dict[str, Option] = {
    "sample_steps": Option(
        {m: 10 for m in METHODS},
        "denoising steps K of the sampler (ddpo/dpok/d3po/spo: DDIM η, or Flow-GRPO's SDE on a flow; "
        "awm: the flow ODE); the papers use 50 (DDPO, DPOK) and 20 (D3PO) on Stable Diffusion, 10 "
        "suits the built-in task",
        low=1,
    ),
    "eta": Option(
        {m: 1.0 for m in _SAMPLED},
        "DDIM η of the policy on ε/v pipelines (1: DDPM's ancestral steps, DDPO's)",
        low=0,
    ),
    "noise_level": Option(
        {m: 0.7 for m in _SAMPLED},
        "on flow-matching pipelines: the noise level a of the policy, Flow-GRPO's SDE sampler "
        "(σ_t = a·√(σ/(1−σ)); the paper's 0.7)",
        low=0,
    ),
    "clip_range": Option(
        {"ddpo": 1e-4, "dpok": 1e-4, "d3po": 0.1, "spo": 0.1, "awm": 1.0},
        "PPO clip of the per-step ratio (ddpo/dpok 1e-4 on element-mean log-probs, awm 1), or ε of "
        "D3PO/SPO's clipped ratio",
        low=0,
    ),
    "adv_clip": Option(
        {"ddpo": 5.0, "awm": 5.0}, "clip of the per-prompt standardised advantages (DDPO: 5)", low=0
    ),
    "inner_epochs": Option({"ddpo": 1}, "optimizer steps per batch of samples (DDPO: 1)", low=1),
    "reward_weight": Option({"dpok": 10.0}, "DPOK's reward weight α (paper: 10-1000)", low=0),
    "kl_weight": Option(
        {"dpok": 0.01, "awm": 0.002},
        "weight of the KL to the pretrained model: DPOK ‖ε_θ − ε_pre‖² (paper 0.01-0.1), AWM "
        "‖v_θ − v_ref‖² (paper 0.001-0.003)",
        low=0,
    ),
    "beta": Option({"d3po": 0.1, "spo": 10.0}, "β of the DPO-form step loss (D3PO 0.1, SPO 10)", low=0),
    "candidates": Option({"spo": 4}, "SPO: candidates k of x_{t-1} per step", low=2),
    "threshold": Option(
        {"spo": 0.3}, "SPO: keep a step pair when the softmax of the scores differs by more", low=0, high=1
    ),
    "skip_steps": Option({"spo": 4}, "SPO: the first steps that are not trained", low=0),
    "scorer": Option(
        {"spo": "critic"},
        "SPO's step-aware scorer of candidates: critic (a preference model of noisy latents, the "
        "paper's) or x0 (the reward of the decoded x̂_0 the denoiser predicts from the candidate)",
        choices=("critic", "x0"),
    ),
    "critic_warmup": Option(
        {"spo": 50, "dpok": 50},
        "steps fitting the critic (SPO's step-aware preference model, DPOK's value) on the pretrained "
        "model's samples before training",
        low=0,
    ),
    "critic_lr": Option({"spo": 1e-2, "dpok": 1e-2}, "learning rate of the critic", low=0),
    "train_times": Option({"awm": 4}, "AWM: noise levels s drawn per sample and step", low=1),
    "weighting": Option({"awm": "ghuber"}, "AWM: loss weighting w(ℓ, s)", choices=("ghuber", "uniform", "t")),
    "heldout": Option(
        {m: 4 for m in METHODS},
        "held-out seeds per prompt: the mean reward of these samples before and after training "
        "(summary.json, paired by seed)",
        low=1,
    ),
}


def is_diffusion_rl(method: str) -> bool:
    """Whether `method` names an online diffusion RL method."""
    return method.strip() in METHODS


def method_options(method: str, given: dict[str, Any]) -> dict[str, Any]:
    """Every option of `method` with `given` over the defaults; ConfigError naming a key the method
    does not take, or a value out of range, and the fix."""
    from difflib import get_close_matches

    from preftune.errors import ConfigError

    own = {k: o for k, o in OPTIONS.items() if method in o.defaults}
    values = {k: o.defaults[method] for k, o in own.items()}
    for key, value in given.items():
        k = str(key).replace("-", "_")
        if k not in own:
            takers = [m for m in METHODS if m != method and m in OPTIONS.get(k, Option({}, "")).defaults]
            close = get_close_matches(k, sorted(own), n=1)
            where = (
                f" (an option of {', '.join(takers)})"
                if takers
                else f" (did you mean --{close[0].replace('_', '-')}?)"
                if close
                else ""
            )
            raise ConfigError(
                f"option '--{k.replace('_', '-')}' is not one of preftune train {method}'s{where}; its "
                f"options: {', '.join('--' + o.replace('_', '-') for o in sorted(own))}"
            )
        values[k] = _coerce(k, value, own[k], type(own[k].defaults[method]), method)
    return values


def _coerce(key: str, value: Any, option: Option, kind: type, method: str) -> Any:
    from preftune.errors import ConfigError

    flag = f"--{key.replace('_', '-')}"
    try:
        out = kind(value) if kind is not int else int(str(value))
    except (TypeError, ValueError):
        raise ConfigError(
            f"{flag} {value!r}: not {'an integer' if kind is int else 'a number'} — e.g. "
            f"{flag} {option.defaults[method]}"
        ) from None
    if option.choices and out not in option.choices:
        raise ConfigError(f"{flag} {value!r}: must be one of {', '.join(option.choices)}")
    if option.low is not None and out < option.low:
        raise ConfigError(f"{flag} {value}: must be ≥ {option.low} — {option.help}")
    if option.high is not None and out > option.high:
        raise ConfigError(f"{flag} {value}: must be ≤ {option.high} — {option.help}")
    return out


def help_text() -> str:
    """The description of the methods and options for `preftune train --help`."""
    lines = ["Diffusion RL on a pipeline folder (--model PIPELINE --prompts FILE --reward NAME):"]
    lines += [f"  {name}: {paper}" for name, paper in METHODS.items()]
    return "\n".join(lines)
