"""The exact Gaussian-mixture test bed: ε* is the scaled score, and the reference flows agree."""

from __future__ import annotations

import numpy as np

from preftune.diffusion.gmm import GaussianMixture, level_of, sd_alphas_cumprod


def test_sd_schedule_endpoints() -> None:
    a = sd_alphas_cumprod()
    assert a.shape == (1000,)
    assert np.isclose(a[0], 1 - 0.00085)
    assert np.isclose(level_of(a[-1]), 14.6146, atol=1e-3)  # SD's sigma_max


def test_eps_is_minus_sigma_times_finite_difference_score() -> None:
    gmm = GaussianMixture.random(components=4, dim=3, seed=1)
    x = np.random.default_rng(0).standard_normal((5, 3))
    for abar in (0.9, 0.3, 0.02):
        h, sigma = 1e-5, np.sqrt(1 - abar)
        grad = np.zeros_like(x)
        for j in range(3):
            e = np.zeros(3)
            e[j] = h
            grad[:, j] = (gmm.log_density(x + e, abar) - gmm.log_density(x - e, abar)) / (2 * h)
        np.testing.assert_allclose(gmm.eps(x, abar), -sigma * grad, atol=1e-5)


def test_one_gaussian_closed_form_equals_numerical_flow() -> None:
    gmm = GaussianMixture(np.ones(1), np.array([[0.5, -1.0]]), np.array([0.1]))
    xt = gmm.sample(6, np.random.default_rng(2), s=14.6)
    exact = gmm.flow(xt, 14.6, 0.0)
    np.testing.assert_allclose(gmm.flow_numeric(xt, 14.6, 0.0), exact, atol=1e-8)
    # the invariant by hand: (x̃ − μ)/sqrt(v + s²) at s = 14.6 and at s = 0
    np.testing.assert_allclose(
        (exact - gmm.means[0]) / np.sqrt(0.1), (xt - gmm.means[0]) / np.sqrt(0.1 + 14.6**2)
    )


def test_mixture_flow_carries_the_marginal_to_the_data() -> None:
    gmm = GaussianMixture.random(components=2, dim=1, seed=3, spread=3.0)
    xt = gmm.sample(400, np.random.default_rng(4), s=14.6)
    x0 = gmm.flow(xt, 14.6, 0.0)
    # the flow transports p_s to p_0: the sample mean matches Σ π_k μ_k within 3 standard errors
    mean = float((gmm.weights[:, None] * gmm.means).sum())
    assert abs(x0.mean() - mean) < 3 * x0.std() / np.sqrt(400)
