"""Adaptive samplers: Reinforce-Ada (rounds until a prompt has signal), GVM (a budget split by
acceptance rate and gradient norm) and VADE (Thompson selection from per-prompt Beta posteriors).

A sample is *accepted* (correct) when its reward is ≥ `accept` (1.0: the arithmetic verifier's
"right"). Each sampler's docstring gives its paper and rule; docs/online.md has the table.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from preftune.errors import ConfigError
from preftune.losses.registry import HParam
from preftune.rl.draws import Drawn, StepSource
from preftune.rl.samplers import Selection, Stateless, by_prompt, flat, largest_remainder, register_sampler

ACCEPT = HParam(1.0, "a completion is accepted (correct) when its reward is ≥ this")


def _split(drawn: Drawn, rows: list[int], accept: float) -> tuple[list[int], list[int]]:
    """(accepted rows, rejected rows) of `rows`."""
    good = [r for r in rows if float(drawn.rewards[r]) >= accept]
    return good, [r for r in rows if float(drawn.rewards[r]) < accept]


def balanced_subset(good: list[int], bad: list[int], keep: int, rng: np.random.Generator) -> list[int]:
    """`keep` rows, half accepted and half rejected where the pool allows (keep // 2 accepted), the
    rest from the other side; chosen uniformly at random within each side (`rng`: numpy Generator)."""
    want = keep // 2
    n_good = min(len(good), max(want, keep - len(bad)))
    n_bad = min(len(bad), keep - n_good)
    pick = rng.permutation
    chosen = [good[int(i)] for i in pick(len(good))[:n_good]] + [bad[int(i)] for i in pick(len(bad))[:n_bad]]
    return sorted(chosen)


@register_sampler(
    "reinforce_ada",
    paper="Xiong et al. 2025, Reinforce-Ada, Algorithm 1 (successive elimination, exits pos / balance)",
    rule="rounds of per_round samples for the still-active prompts; a prompt exits with ≥ 1 accepted "
    "(pos) or with keep//2 accepted and keep − keep//2 rejected (balance); each pool cut to keep, balanced",
    hparams={
        "rounds": HParam(4, "sampling rounds at most (N)", low=1),
        "per_round": HParam(8, "completions per active prompt and round (M)", low=1),
        "keep": HParam(4, "completions trained on per prompt (n), balanced down-sampling", low=2),
        "exit": HParam("balance", "when a prompt stops being sampled", choices=("balance", "pos")),
        "accept": ACCEPT,
    },
    fixed_groups=False,
)
class ReinforceAda(Stateless):
    """Reinforce-Ada (Xiong et al. 2025, Algorithm 1): sample in rounds, deactivate a prompt once its
    pool holds enough signal, then down-sample each pool to `keep` completions, balanced between
    accepted and rejected. Use it with the `global_mean` estimator: the baseline is the mean reward of
    the prompt's whole pool (all rounds), not of the kept subset. A pool whose rewards are all equal
    after the last round gives no gradient under that baseline and is dropped, so with keep ≥ 2 every
    kept group holds both an accepted and a rejected completion (zero-signal fraction 0)."""

    def __init__(
        self, prompts: int, *, rounds: int, per_round: int, keep: int, exit: str, accept: float
    ) -> None:
        if keep > rounds * per_round:
            raise ConfigError(
                f"sampler 'reinforce_ada': keep={keep} exceeds rounds × per_round = {rounds * per_round}"
            )
        self.rounds, self.per_round, self.keep, self.exit, self.accept = rounds, per_round, keep, exit, accept

    def _done(self, drawn: Drawn, pool: list[int]) -> bool:
        good, bad = _split(drawn, pool, self.accept)
        if self.exit == "pos":
            return len(good) >= 1
        return len(good) >= self.keep // 2 and len(bad) >= self.keep - self.keep // 2

    def select(self, source: StepSource, batch_size: int, num_generations: int) -> Selection:
        drawn, active, rounds = Drawn(), list(source.batch), 0
        while active and rounds < self.rounds:
            drawn.extend(source.draw(active, self.per_round))
            rounds += 1
            active = [p for p in active if not self._done(drawn, drawn.rows_of(p))]
        pools = [drawn.rows_of(p) for p in source.batch]
        live = [pool for pool in pools if not flat(drawn, pool)]
        groups = [balanced_subset(*_split(drawn, pool, self.accept), self.keep, source.rng) for pool in live]
        if not groups:  # every pool flat: a zero-gradient step on the first completions of each
            groups = [pool[: self.keep] for pool in pools]
        metrics = {
            "sampler/rounds": float(rounds),
            "sampler/unresolved": float(len(active)) / max(len(pools), 1),
            "sampler/flat_pools": float(len(pools) - len(live)) / max(len(pools), 1),
        }
        return Selection(drawn, groups, metrics)


def gvm_allocation(
    accept_rate: torch.Tensor, grad_norm: torch.Tensor, budget: int, *, alpha: float = 1e-3, beta: float = 2.0
) -> torch.Tensor:
    """GVM's stage-2 budget split: n_i ∝ G_i / sqrt(p_i + α / p_i^{β−1}) (0 when p_i = 0 or G_i = 0),
    integers summing to `budget` (largest remainders). All weights 0: an equal split."""
    p, g = accept_rate.double(), grad_norm.double()
    ok = (p > 0) & (g > 0)
    safe = torch.where(ok, p, torch.ones_like(p))
    weights = torch.where(ok, g / torch.sqrt(safe + alpha / safe ** (beta - 1)), torch.zeros_like(p))
    if float(weights.sum()) <= 0:
        weights = torch.ones_like(p)
    return largest_remainder(weights, budget)


@register_sampler(
    "gvm",
    paper="Yao et al. 2025, Optimizing Chain-of-Thought Reasoners via Gradient Variance Minimization "
    "(GVM), Algorithm 2 (two-stage dynamic sample allocation)",
    rule="stage 1: probe completions per prompt → acceptance rate p_i and LM-head gradient norm G_i; "
    "stage 2: batch_size × num_generations completions split n_i ∝ G_i / sqrt(p_i + α/p_i^{β−1})",
    hparams={
        "probe": HParam(8, "stage-1 completions per prompt", low=1),
        "alpha": HParam(1e-3, "α of the allocation", low=0.0),
        "beta": HParam(2.0, "β of the allocation", low=1.0),
        "accept": ACCEPT,
    },
    fixed_groups=False,
)
class GVM(Stateless):
    """GVM (Yao et al. 2025): minimise the variance of the stochastic gradient for a fixed budget by
    giving prompt i n_i ∝ G_i / sqrt(p_i + α/p_i^{β−1}) samples, p_i its stage-1 acceptance rate and
    G_i the mean norm of ∇ log π(y|x) over its accepted stage-1 samples, restricted to the LM head
    weight (`preftune.rl.draws.head_gradient_norms`). Stage-1 samples only estimate p_i and G_i;
    the step trains on the stage-2 samples. With RAFT++ (`positive_only`) this is GVM-RAFT++; any
    group-relative estimator works on top (GVM-GRPO)."""

    def __init__(self, prompts: int, *, probe: int, alpha: float, beta: float, accept: float) -> None:
        self.probe, self.alpha, self.beta, self.accept = probe, alpha, beta, accept

    def select(self, source: StepSource, batch_size: int, num_generations: int) -> Selection:
        drawn = Drawn()
        drawn.extend(source.draw(source.batch, self.probe))
        rates, norms = [], []
        for prompt in source.batch:
            good, _ = _split(drawn, drawn.rows_of(prompt), self.accept)
            rates.append(len(good) / self.probe)
            norms.append(float(source.head_grad_norms(drawn, good).mean()) if good else 0.0)
        budget = len(source.batch) * num_generations
        counts = gvm_allocation(
            torch.tensor(rates), torch.tensor(norms), budget, alpha=self.alpha, beta=self.beta
        )
        rows = drawn.extend(source.draw_each(dict(zip(source.batch, counts.tolist()))))
        metrics = {
            "sampler/accept_rate": sum(rates) / max(len(rates), 1),
            "sampler/prompts_sampled": float((counts > 0).sum()),
            "sampler/max_allocation": float(counts.max()) if len(counts) else 0.0,
        }
        return Selection(drawn, by_prompt(drawn, rows), metrics)


@register_sampler(
    "vade",
    paper="VADE: variance-aware dynamic sampling with per-prompt Beta posteriors (Thompson sampling); "
    "decayed update as in MoPPS, Qu et al. 2025 (constants unverified)",
    rule="candidates = pool × batch_size prompts; θ̃_i ~ Beta(α_i, β_i); keep the batch_size with θ̃ "
    "nearest target; after scoring α_i ← λα_i + (1−λ)α₀ + s_i, β_i ← λβ_i + (1−λ)β₀ + (n_i − s_i)",
    hparams={
        "pool": HParam(4, "candidate prompts per step, as a multiple of batch_size", low=1),
        "target": HParam(0.5, "success rate to aim for (½: most reward variance)", low=0.0, high=1.0),
        "decay": HParam(
            0.9,
            "λ: weight kept by a prompt's old counts at each update (1: no forgetting)",
            low=0.0,
            high=1.0,
        ),
        "prior": HParam(1.0, "α₀ = β₀ of the Beta prior", low=0.0, low_open=True),
        "accept": ACCEPT,
    },
)
class VADE:
    """Per-prompt Beta posterior over the success rate, Thompson selection of informative prompts.

    Each prompt i holds Beta(α_i, β_i), prior Beta(α₀, β₀). A step reads pool × batch_size candidate
    prompts (the step's batch, then further prompts of the step's seeded order), draws
    θ̃_i ~ Beta(α_i, β_i) and keeps the batch_size prompts whose θ̃_i is nearest `target` (½ maximises
    the Bernoulli variance θ(1 − θ), so the groups most likely to carry signal). After their
    num_generations completions are scored, the observed prompts' counts are decayed towards the
    prior and updated with s_i accepted of n_i: α_i ← λα_i + (1−λ)α₀ + s_i, β_i ← λβ_i + (1−λ)β₀ +
    n_i − s_i (λ = 1: the plain Beta-Bernoulli count update). Implemented from the method's
    description; the decayed update follows MoPPS (Qu et al. 2025). α, β are the checkpointed state."""

    def __init__(
        self, prompts: int, *, pool: int, target: float, decay: float, prior: float, accept: float
    ) -> None:
        self.pool, self.target, self.decay, self.prior, self.accept = pool, target, decay, prior, accept
        self.alpha = torch.full((prompts,), prior, dtype=torch.float64)
        self.beta = torch.full((prompts,), prior, dtype=torch.float64)

    def update(self, prompts: list[int], successes: list[float], trials: list[float]) -> None:
        """The decayed Beta-Bernoulli update of `prompts` (see the class docstring)."""
        idx = torch.tensor(prompts, dtype=torch.long)
        keep, base = self.decay, (1 - self.decay) * self.prior
        s, n = torch.tensor(successes, dtype=torch.float64), torch.tensor(trials, dtype=torch.float64)
        self.alpha[idx] = keep * self.alpha[idx] + base + s
        self.beta[idx] = keep * self.beta[idx] + base + (n - s)

    def select(self, source: StepSource, batch_size: int, num_generations: int) -> Selection:
        candidates = list(source.batch) + source.more((self.pool - 1) * batch_size)
        idx = torch.tensor(candidates, dtype=torch.long)
        theta = torch.from_numpy(source.rng.beta(self.alpha[idx].numpy(), self.beta[idx].numpy()))
        order = sorted(range(len(candidates)), key=lambda i: (abs(float(theta[i]) - self.target), i))
        chosen = [candidates[i] for i in order[:batch_size]]
        drawn = source.draw(chosen, num_generations)
        groups = by_prompt(drawn, range(len(drawn)))
        successes = [float(len(_split(drawn, g, self.accept)[0])) for g in groups]
        self.update([drawn.prompt[g[0]] for g in groups], successes, [float(len(g)) for g in groups])
        mean = self.alpha[idx] / (self.alpha[idx] + self.beta[idx])
        metrics = {"sampler/candidates": float(len(candidates)), "sampler/posterior_mean": float(mean.mean())}
        return Selection(drawn, groups, metrics)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"alpha": self.alpha.clone(), "beta": self.beta.clone()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if not state:
            return  # a fresh run: the prior
        if set(state) != {"alpha", "beta"} or state["alpha"].shape != self.alpha.shape:
            shape = tuple(state["alpha"].shape) if "alpha" in state else sorted(state)
            raise ConfigError(
                f"resume: the checkpoint's vade state {shape} does not fit {self.alpha.numel()} prompts — "
                "resume with the run's own prompt data"
            )
        self.alpha = state["alpha"].to(torch.float64).clone()
        self.beta = state["beta"].to(torch.float64).clone()
