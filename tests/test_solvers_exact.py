"""diffusers' solvers on the exact Gaussian-mixture ODE: hand-checked steps and measured orders."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("scipy")

from diffusers import DDIMScheduler, DPMSolverMultistepScheduler  # noqa: E402

from preftune.diffusion.gmm import GaussianMixture, level_of, sd_alphas_cumprod  # noqa: E402
from preftune.diffusion.schedulers.exact import SD_CONFIG, order, sample_with, solver_error  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GMM = GaussianMixture.random(components=8, dim=2, seed=0)
S_TOP = level_of(float(sd_alphas_cumprod()[-1]))
X_TOP = GMM.sample(16, np.random.default_rng(0), s=S_TOP)


def test_one_ddim_step_is_an_euler_step_in_x_tilde() -> None:
    """DDIM (Song et al. 2021, eq. 12 with η = 0) is Euler on dx̃/ds = ε: x̃' = x̃ + (s' − s) ε."""
    sched = DDIMScheduler.from_config({**SD_CONFIG, "timestep_spacing": "trailing"})
    sched.set_timesteps(1)
    abar = sched.alphas_cumprod.double().numpy()  # diffusers keeps ᾱ in float32
    s0, s1 = level_of(abar[999]), level_of(abar[0])
    out, s_end = sample_with(sched, GMM, X_TOP, s0)
    assert math.isclose(s_end, s1)
    np.testing.assert_allclose(out, X_TOP + (s1 - s0) * GMM.eps_tilde(X_TOP, s0), rtol=1e-5)  # float32 ᾱ


def test_order_is_minus_the_log_log_slope() -> None:
    assert math.isclose(order([10, 20, 40], [4e-2, 1e-2, 2.5e-3]), 2.0)


def test_dpm_solver_pp_2m_order_two_with_log_snr_steps_about_one_without() -> None:
    """Uniform log-SNR steps (Lu et al. 2022, arXiv 2211.01095) restore DPM++2M's order 2 on SD's
    schedule; uniform-in-t steps leave it below first order at 10–20 NFE."""

    def err(n: int, **extra: object) -> float:
        return solver_error(
            lambda: DPMSolverMultistepScheduler.from_config({**SD_CONFIG, **extra}), GMM, X_TOP, S_TOP, n
        )

    lu = [err(n, use_lu_lambdas=True) for n in (10, 20)]
    lin = [err(n, timestep_spacing="linspace") for n in (10, 20)]
    assert order([10, 20], lu) > 1.8
    assert order([10, 20], lin) < 1.0
    assert lu[0] < 0.5 * lin[0]


def test_benchmark_quick_writes_the_table(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("solvers_gmm", ROOT / "benchmarks" / "solvers_gmm.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "s.json"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    names = {r["solver"]: r for r in result["rows"]}
    assert {"DDIM (SD: leading)", "DPM++2M log-SNR", "UniPC bh2 Karras"} <= set(names)
    assert names["DPM++2M log-SNR"]["order"] > 1.8
    assert out.with_suffix(".md").read_text().startswith("| solver |")
