"""Diffusion ODE solvers as `diffusers` scheduler classes, and their exact test bed.

Use any of them in a pipeline with ``pipe.scheduler = X.from_config(pipe.scheduler.config)``:

- :class:`TimeShiftDDIMScheduler` — the time-shift sampler (Li et al. 2023, arXiv 2305.15583).
- :class:`DCSolverScheduler` — DC-Solver (Zhao et al. 2024, arXiv 2409.03755): UniPC with per-step
  dynamic compensation ratios searched by ``calibrate``.
- :class:`DPMSolverV3Scheduler` — DPM-Solver-v3 (Zheng et al. 2023, arXiv 2310.13268) with empirical
  model statistics from ``calibrate(model_fn, samples, num_inference_steps)``.
- :class:`SearchedStepsDPMSolverScheduler` — DPM-Solver++(2M) on noise levels searched by
  ``calibrate(model_fn, samples, num_inference_steps)`` (the time-step search of USF, Liu et al.
  2023, arXiv 2312.07243).
- :class:`USFScheduler` — USF (Liu et al. 2024, arXiv 2312.07243): an exponential-integrator
  predictor-corrector whose levels and per-step predictor/corrector orders ``calibrate`` searches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from preftune.diffusion.schedulers.dcsolver import DCSolverScheduler
from preftune.diffusion.schedulers.dpmv3 import DPMSolverV3Scheduler
from preftune.diffusion.schedulers.searched import SearchedStepsDPMSolverScheduler
from preftune.diffusion.schedulers.timeshift import TimeShiftDDIMScheduler
from preftune.diffusion.schedulers.usf import USFScheduler

__all__ = [
    "DCSolverScheduler",
    "DPMSolverV3Scheduler",
    "SearchedStepsDPMSolverScheduler",
    "TimeShiftDDIMScheduler",
    "USFScheduler",
    "new_configurations",
]


def new_configurations(
    calibrate: Callable[[Any], None] | None = None,
    calibrate_v3: Callable[[Any], None] | None = None,
    calibrate_dc: Callable[[Any], None] | None = None,
    calibrate_usf: Callable[[Any], None] | None = None,
) -> dict[str, Callable[[], Any]]:
    """The schedulers this package adds, on SD's config, for the exact benchmark.

    ``calibrate(scheduler)`` (optional) runs ``scheduler.calibrate`` of a searched-step scheduler for
    every step count the benchmark uses; ``calibrate_v3(scheduler)`` computes DPM-Solver-v3's
    statistics, ``calibrate_dc(scheduler)`` searches DC-Solver's ratios and ``calibrate_usf(scheduler)``
    USF's solver schedules for every step count. Without them those rows are left out.
    """
    from preftune.diffusion.schedulers.exact import SD_CONFIG

    rows: dict[str, Callable[[], Any]] = {
        "time-shift DDIM (w 40, t_c 300)": lambda: TimeShiftDDIMScheduler.from_config(SD_CONFIG),
        "DPM-Solver-v3 without statistics": lambda: DPMSolverV3Scheduler.from_config(SD_CONFIG),
        "USF default (P3 + C2, log-SNR, no search)": lambda: USFScheduler.from_config(SD_CONFIG),
    }
    if calibrate_v3 is not None:
        v3 = DPMSolverV3Scheduler.from_config(SD_CONFIG)
        calibrate_v3(v3)
        v3_config = dict(v3.config)
        rows["DPM-Solver-v3 (calibrated)"] = lambda: DPMSolverV3Scheduler.from_config(v3_config)
    if calibrate_dc is not None:
        dc = DCSolverScheduler.from_config(SD_CONFIG)
        calibrate_dc(dc)
        dc_config = dict(dc.config)
        rows["DC-Solver (UniPC-3 Karras, calibrated)"] = lambda: DCSolverScheduler.from_config(dc_config)
    if calibrate is not None:
        searched = SearchedStepsDPMSolverScheduler.from_config(SD_CONFIG)
        calibrate(searched)
        config = dict(searched.config)
        rows["searched-step DPM++2M (calibrated)"] = lambda: SearchedStepsDPMSolverScheduler.from_config(
            config
        )
    if calibrate_usf is not None:
        usf = USFScheduler.from_config(SD_CONFIG)
        calibrate_usf(usf)
        usf_config = dict(usf.config)
        rows["USF (searched schedule)"] = lambda: USFScheduler.from_config(usf_config)
    return rows
