"""Diffusion ODE solvers as `diffusers` scheduler classes, and their exact test bed.

Use any of them in a pipeline with ``pipe.scheduler = X.from_config(pipe.scheduler.config)``:

- :class:`TimeShiftDDIMScheduler` — the time-shift sampler (Li et al. 2023, arXiv 2305.15583).
- :class:`SearchedStepsDPMSolverScheduler` — DPM-Solver++(2M) on noise levels searched by
  ``calibrate(model_fn, samples, num_inference_steps)`` (the time-step search of USF, Liu et al.
  2023, arXiv 2312.07243).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from preftune.diffusion.schedulers.searched import SearchedStepsDPMSolverScheduler
from preftune.diffusion.schedulers.timeshift import TimeShiftDDIMScheduler

__all__ = ["SearchedStepsDPMSolverScheduler", "TimeShiftDDIMScheduler", "new_configurations"]


def new_configurations(calibrate: Callable[[Any], None] | None = None) -> dict[str, Callable[[], Any]]:
    """The schedulers this package adds, on SD's config, for the exact benchmark.

    ``calibrate(scheduler)`` (optional) runs ``scheduler.calibrate`` of a searched-step scheduler for
    every step count the benchmark uses; without it that scheduler is left out.
    """
    from preftune.diffusion.schedulers.exact import SD_CONFIG

    rows: dict[str, Callable[[], Any]] = {
        "time-shift DDIM (w 40, t_c 300)": lambda: TimeShiftDDIMScheduler.from_config(SD_CONFIG),
    }
    if calibrate is not None:
        searched = SearchedStepsDPMSolverScheduler.from_config(SD_CONFIG)
        calibrate(searched)
        config = dict(searched.config)
        rows["searched-step DPM++2M (calibrated)"] = lambda: SearchedStepsDPMSolverScheduler.from_config(
            config
        )
    return rows
