"""Config checks of the samplers and of distillation (imports no torch: `preftune --help` reads config)."""

from __future__ import annotations

from typing import Any

from preftune.errors import ConfigError

DISTILL_METHODS = ("adpa", "dckd", "aligndistil")  # preftune.losses.distill_losses


def is_distill(method: str) -> bool:
    """Whether `method` is a distillation objective ("adpa", "dckd:1,adpa:0.5", ...)."""
    return method.split(",")[0].partition(":")[0].strip() in DISTILL_METHODS


def check_sampler(config: Any, estimator: str) -> None:
    """The online method's sampler exists and takes its options; the PPO family takes `uniform` only."""
    from preftune.online_methods import preset_sampler
    from preftune.rl.samplers import get_sampler

    name, args = preset_sampler(config.method, config.sampler, config.sampler_args)
    get_sampler(name).validate(args)
    if estimator == "gae" and name != "uniform":
        raise ConfigError(
            f"method '{config.method}': the PPO family takes sampler uniform only, not '{name}'"
        )


def check_distill(config: Any, objective: list[tuple[Any, float, dict[str, Any]]]) -> None:
    """Teachers are given exactly when the method distils; what distillation cannot combine with."""
    from preftune.config import FIELDS

    if not is_distill(config.method):
        if config.teacher or config.teacher_ref:
            raise ConfigError(f"teacher / teacher_ref are for distillation ({', '.join(DISTILL_METHODS)})")
        return
    if not config.teacher:
        raise ConfigError(f"method '{config.method}' needs 'teacher' — {FIELDS['teacher'].metadata['help']}")
    two = [spec.name for spec, _, _ in objective if getattr(spec.fn, "teachers", 1) == 2]
    if two and not config.teacher_ref:
        raise ConfigError(f"'{two[0]}' needs 'teacher_ref' — {FIELDS['teacher_ref'].metadata['help']}")
    if config.eval_data or config.stages > 1 or config.rounds > 1 or config.fsdp:
        raise ConfigError(
            f"method '{config.method}' (distillation) cannot use eval_data, stages, rounds or fsdp yet"
        )
