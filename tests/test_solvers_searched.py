"""Searched-step DPM-Solver++(2M) (the time-step search of USF, Liu et al. 2023, arXiv 2312.07243)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("scipy")

from diffusers import DPMSolverMultistepScheduler  # noqa: E402

from preftune.diffusion.gmm import GaussianMixture, level_of, sd_alphas_cumprod  # noqa: E402
from preftune.diffusion.schedulers import SearchedStepsDPMSolverScheduler  # noqa: E402
from preftune.diffusion.schedulers.exact import SD_CONFIG, gmm_model_fn, solver_error  # noqa: E402

GMM = GaussianMixture.random(components=8, dim=2, seed=0)
S_TOP = level_of(float(sd_alphas_cumprod()[-1]))


def test_without_calibration_it_is_dpm_solver_pp_2m_with_log_snr_steps() -> None:
    x = GMM.sample(16, np.random.default_rng(0), s=S_TOP)
    lu = {**SD_CONFIG, "use_lu_lambdas": True}
    for n in (5, 10):
        ours = solver_error(lambda: SearchedStepsDPMSolverScheduler.from_config(SD_CONFIG), GMM, x, S_TOP, n)
        theirs = solver_error(lambda: DPMSolverMultistepScheduler.from_config(lu), GMM, x, S_TOP, n)
        assert ours == pytest.approx(theirs, rel=1e-6)


def test_calibration_lowers_the_error_and_is_kept_in_the_config(tmp_path) -> None:
    sched = SearchedStepsDPMSolverScheduler.from_config(SD_CONFIG)
    noise = torch.from_numpy(GMM.sample(16, np.random.default_rng(1), s=S_TOP) / np.sqrt(1 + S_TOP**2))
    fn = gmm_model_fn(GMM, sched.alphas_cumprod)
    result = sched.calibrate(fn, noise, 5, reference_steps=200, max_evals=120)
    assert result["after"] < 0.8 * result["before"]
    levels = sched.config.searched_sigmas["5"]
    assert len(levels) == 5 and levels[0] == pytest.approx(S_TOP, rel=1e-5)
    assert all(a > b for a, b in zip(levels, levels[1:]))
    sched.save_pretrained(tmp_path)
    again = SearchedStepsDPMSolverScheduler.from_pretrained(tmp_path)
    again.set_timesteps(5)
    assert again.sigmas[:-1].double().numpy() == pytest.approx(np.array(levels), rel=1e-6)
    # the searched levels are what a run with 5 steps uses: its error on the calibration noise drops
    x_top = noise.numpy() * np.sqrt(1 + S_TOP**2)
    cal = solver_error(
        lambda: SearchedStepsDPMSolverScheduler.from_config(dict(again.config)), GMM, x_top, S_TOP, 5
    )
    plain = solver_error(lambda: SearchedStepsDPMSolverScheduler.from_config(SD_CONFIG), GMM, x_top, S_TOP, 5)
    assert cal < plain
