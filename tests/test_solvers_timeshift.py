"""The time-shift sampler (Li et al. 2023, arXiv 2305.15583): DDIM without the shift, the rule by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import DDIMScheduler  # noqa: E402

from preftune.diffusion.gmm import GaussianMixture, level_of, sd_alphas_cumprod  # noqa: E402
from preftune.diffusion.schedulers import TimeShiftDDIMScheduler  # noqa: E402
from preftune.diffusion.schedulers.exact import SD_CONFIG, solver_error  # noqa: E402

GMM = GaussianMixture.random(components=8, dim=2, seed=0)
S_TOP = level_of(float(sd_alphas_cumprod()[-1]))
X_TOP = GMM.sample(16, np.random.default_rng(0), s=S_TOP)


def test_without_a_window_it_is_diffusers_ddim() -> None:
    for n in (5, 10):
        ts = solver_error(
            lambda: TimeShiftDDIMScheduler.from_config({**SD_CONFIG, "window_size": 0}), GMM, X_TOP, S_TOP, n
        )
        ddim = solver_error(lambda: DDIMScheduler.from_config(SD_CONFIG), GMM, X_TOP, S_TOP, n)
        assert ts == pytest.approx(ddim, rel=1e-5)


def test_same_timesteps_as_ddim_for_each_spacing() -> None:
    for spacing in ("leading", "trailing", "linspace"):
        a = TimeShiftDDIMScheduler.from_config({**SD_CONFIG, "timestep_spacing": spacing})
        b = DDIMScheduler.from_config({**SD_CONFIG, "timestep_spacing": spacing})
        a.set_timesteps(7)
        b.set_timesteps(7)
        assert a.timesteps.tolist() == b.timesteps.tolist()


def test_the_shift_picks_the_window_step_whose_variance_matches() -> None:
    sched = TimeShiftDDIMScheduler.from_config({**SD_CONFIG, "window_size": 40, "cutoff_timestep": 300})
    abar = sched.alphas_cumprod
    sample = torch.randn(4, 4096, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    var = float(sample.var())
    want = min(range(480, 521), key=lambda t: abs(1 - float(abar[t]) - var))  # by hand, window 500 ± 20
    assert sched.shifted(sample, 500, 901) == want
    assert sched.shifted(sample, 250, 901) == 250  # below the cutoff: no shift
    assert sched.shifted(sample, 500, 505) <= 504  # time never goes back up


def test_a_pipeline_loop_sees_the_shifted_timestep() -> None:
    """diffusers pipelines iterate over scheduler.timesteps and pass each t to the network."""
    sched = TimeShiftDDIMScheduler.from_config({**SD_CONFIG, "window_size": 100, "cutoff_timestep": 0})
    sched.set_timesteps(4)
    nominal = sched.timesteps.tolist()
    x, seen = torch.randn(2, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 3, []
    for t in sched.timesteps:
        seen.append(int(t))
        x = sched.step(torch.zeros_like(x), t, x).prev_sample  # ε = 0: the sample keeps variance ~9·ᾱ ratio
    assert seen == sched.timesteps.tolist() and seen != nominal
