"""An exact test bed for diffusion ODE solvers: Gaussian-mixture data.

For data ``p_0 = Σ_k π_k N(μ_k, v_k I)`` and the VP forward process ``x_t = α_t x_0 + σ_t ε``
(``α_t = sqrt(ᾱ_t)``, ``σ_t = sqrt(1 − ᾱ_t)``) every marginal is again a mixture,
``p_t = Σ_k π_k N(α_t μ_k, (α_t² v_k + σ_t²) I)``, so the ideal noise predictor
``ε*(x, t) = −σ_t ∇ log p_t(x)`` is known in closed form (no network, no training error).

Solvers are compared in the variables of DPM-Solver (Lu et al. 2022, arXiv 2206.00927, eq. 3.3)
and DDIM (Song et al. 2021, arXiv 2010.02502, eq. 14): ``x̃ = x / α_t`` and ``s = σ_t / α_t``, in
which the probability-flow ODE (Song et al. 2021, arXiv 2011.13456, eq. 13) reads
``dx̃/ds = ε*(α x̃, t)`` and ``x̃ ~ Σ_k π_k N(μ_k, (v_k + s²) I)``. For one Gaussian
``(x̃ − μ)/sqrt(v + s²)`` is constant along the flow (closed form); for a mixture the flow is
integrated with scipy's DOP853 at tolerance 1e-11.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["GaussianMixture", "sd_alphas_cumprod", "level_of"]


def sd_alphas_cumprod(num_train_timesteps: int = 1000) -> np.ndarray:
    """ᾱ_t of Stable Diffusion's ``scaled_linear`` schedule (β from 0.00085 to 0.012, 1000 steps)."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, num_train_timesteps, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def level_of(alpha_cumprod: float) -> float:
    """The noise level ``s = σ/α = sqrt((1 − ᾱ)/ᾱ)`` of a VP step with cumulative product ``ᾱ``."""
    return float(np.sqrt((1.0 - alpha_cumprod) / alpha_cumprod))


@dataclass(frozen=True)
class GaussianMixture:
    """``Σ_k weights[k] · N(means[k], variances[k] · I)`` in ``d = means.shape[1]`` dimensions."""

    weights: np.ndarray  # (K,), sums to 1
    means: np.ndarray  # (K, d)
    variances: np.ndarray  # (K,), > 0

    @classmethod
    def random(cls, components: int, dim: int, seed: int = 0, spread: float = 2.0) -> GaussianMixture:
        """A reproducible mixture: means ~ N(0, spread²), variances in [0.02, 0.2], Dirichlet weights."""
        rng = np.random.default_rng(seed)
        weights = rng.dirichlet(np.full(components, 2.0))
        means = spread * rng.standard_normal((components, dim))
        variances = rng.uniform(0.02, 0.2, components)
        return cls(weights, means, variances)

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def sample(self, n: int, rng: np.random.Generator, s: float = 0.0) -> np.ndarray:
        """``n`` draws of ``x̃ = x_0 + s ε`` (the marginal at noise level ``s`` in ``x̃`` units)."""
        k = rng.choice(len(self.weights), size=n, p=self.weights)
        std = np.sqrt(self.variances[k] + s * s)[:, None]
        return self.means[k] + std * rng.standard_normal((n, self.dim))

    def _log_components(self, xt: np.ndarray, s: float) -> tuple[np.ndarray, np.ndarray]:
        """log π_k N(x̃; μ_k, (v_k + s²) I) per row and component, and the variances v_k + s²."""
        var = self.variances + s * s
        sq = ((xt[:, None, :] - self.means[None]) ** 2).sum(-1)
        logn = -0.5 * sq / var - 0.5 * self.dim * np.log(2 * np.pi * var)
        return np.log(self.weights) + logn, var

    def eps_tilde(self, xt: np.ndarray, s: float) -> np.ndarray:
        """Exact ε at ``x̃`` (rows) and level ``s``: ``s Σ_k w_k(x̃) (x̃ − μ_k)/(v_k + s²)``."""
        logp, var = self._log_components(xt, s)
        w = np.exp(logp - logp.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
        diff = xt[:, None, :] - self.means[None]
        return s * (w[:, :, None] * diff / var[None, :, None]).sum(1)

    def eps(self, x: np.ndarray, alpha_cumprod: float) -> np.ndarray:
        """Exact ε*(x, t) for VP samples ``x`` at a step with cumulative product ``ᾱ_t``."""
        alpha = float(np.sqrt(alpha_cumprod))
        return self.eps_tilde(x / alpha, level_of(alpha_cumprod))

    def log_density(self, x: np.ndarray, alpha_cumprod: float) -> np.ndarray:
        """log p_t(x) of VP samples (rows); ``−σ_t ∇ log p_t`` equals :meth:`eps`."""
        alpha = float(np.sqrt(alpha_cumprod))
        logp, _ = self._log_components(x / alpha, level_of(alpha_cumprod))
        top = logp.max(axis=1)
        return top + np.log(np.exp(logp - top[:, None]).sum(1)) - self.dim * np.log(alpha)

    def flow(self, xt: np.ndarray, s_from: float, s_to: float, rtol: float = 1e-11) -> np.ndarray:
        """The exact probability-flow ODE map ``x̃(s_from) → x̃(s_to)`` for rows of ``xt``.

        One component: the closed form ``μ + (x̃ − μ) sqrt((v + s_to²)/(v + s_from²))``. Several:
        scipy's DOP853 (Hairer et al., "Solving ODEs I", II.5) on ``dx̃/ds = ε(x̃, s)``.
        """
        if s_from == s_to:
            return xt.copy()
        if len(self.weights) == 1:
            v, mu = float(self.variances[0]), self.means[0]
            return mu + (xt - mu) * np.sqrt((v + s_to**2) / (v + s_from**2))
        return self.flow_numeric(xt, s_from, s_to, rtol)

    def flow_numeric(self, xt: np.ndarray, s_from: float, s_to: float, rtol: float = 1e-11) -> np.ndarray:
        """:meth:`flow` by numerical integration only (DOP853, ``rtol = atol``), for any mixture."""
        from scipy.integrate import solve_ivp

        shape = xt.shape

        def rhs(s: float, y: np.ndarray) -> np.ndarray:
            return self.eps_tilde(y.reshape(shape), s).ravel()

        out = solve_ivp(rhs, (s_from, s_to), xt.ravel(), method="DOP853", rtol=rtol, atol=rtol)
        if not out.success:
            raise RuntimeError(f"reference ODE integration failed: {out.message}")
        return np.asarray(out.y[:, -1]).reshape(shape)
