"""Step-level preference pairs on the stochastic sampler (DDIM η, or Flow-GRPO's SDE on a flow model,
`flow_policy`): D3PO and SPO (Python API).

Both train every denoising step of a judged pair with a DPO-form loss on clipped per-step ratios
(D3PO, Yang et al. CVPR 2024, arXiv 2311.13231, eq. 10–11):

    L_k = −log σ(β log clip(r_k^w, 1 ± ε) − β log clip(r_k^l, 1 ± ε)),   r_k = π_θ(a_k | s_k) / π_ref(a_k | s_k)

with log-densities averaged over latent elements as in the official code. π_ref defaults to the
sampling weights (the official code's `sample["log_probs"]`); pass `reference=` for a frozen copy.

- D3PO: two chains per prompt from the same initial noise; the whole chain of the preferred final
  image is the winner at every step (`d3po_step`).
- SPO (Liang et al. 2024, arXiv 2406.04314, Algorithm 1): at each step, from a shared x_t, k
  candidates of x_{t−1} are scored by a step-aware preference model (`critics.LatentCritic` trained
  with `critics.step_preference_loss`); best vs worst form the pair if their softmax probabilities
  differ by more than a threshold; the chain continues from a random candidate (`spo_step`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.nn import functional as F

from preftune.diffusion.online import RewardFn, clip_and_step
from preftune.diffusion.policy import Trajectory, sample_trajectory, step_log_prob, step_stats

if TYPE_CHECKING:
    from preftune.diffusion.policy import StochasticPolicy

__all__ = ["StepPairs", "d3po_loss", "d3po_step", "spo_pairs", "spo_step", "spo_update"]


def d3po_loss(
    logp_w: torch.Tensor,
    ref_w: torch.Tensor,
    logp_l: torch.Tensor,
    ref_l: torch.Tensor,
    elements: int,
    beta: float = 0.1,
    eps: float = 0.1,
) -> torch.Tensor:
    """Per-pair losses −log σ(β (log clip(r^w) − log clip(r^l))) (module docstring), any shape.

    log-probs are summed step densities (`Trajectory.logps` units), divided by `elements` here."""
    lo, hi = math.log(1 - eps), math.log(1 + eps)
    log_rw = ((logp_w - ref_w) / elements).clamp(lo, hi)
    log_rl = ((logp_l - ref_l) / elements).clamp(lo, hi)
    return -F.logsigmoid(beta * (log_rw - log_rl))


def _ref_logps(reference: Any, policy: StochasticPolicy, traj: Trajectory, k: int) -> torch.Tensor:
    if reference is None:
        return traj.logps[:, k]
    with torch.no_grad():
        return step_stats(reference, policy, traj, k)[0]


def d3po_step(
    unet: Any,
    optimizer: torch.optim.Optimizer,
    policy: StochasticPolicy,
    cond: torch.Tensor,
    reward_fn: RewardFn,
    *,
    noise: torch.Tensor,
    generator: torch.Generator | None = None,
    reference: Any | None = None,
    beta: float = 0.1,
    eps: float = 0.1,
    max_grad_norm: float = 1.0,
) -> dict[str, float]:
    """One D3PO iteration on E prompts (`cond` [E, L, D], `noise` [E, C, H, W]): two chains per prompt
    from the same noise, judged by `reward_fn` (the higher final reward wins), every step trained."""
    e = cond.shape[0]
    traj = sample_trajectory(unet, policy, torch.cat([cond, cond]), torch.cat([noise, noise]), generator)
    rewards = reward_fn(traj.final).detach().float()
    first_wins = rewards[:e] >= rewards[e:]
    win = torch.where(first_wins, torch.arange(e), torch.arange(e) + e)
    lose = torch.where(first_wins, torch.arange(e) + e, torch.arange(e))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for k in range(policy.num_steps):
        logp = step_stats(unet, policy, traj, k)[0]
        ref = _ref_logps(reference, policy, traj, k)
        loss = d3po_loss(logp[win], ref[win], logp[lose], ref[lose], traj.elements, beta, eps).mean()
        (loss / policy.num_steps).backward()
        total += float(loss.detach()) / policy.num_steps
    clip_and_step(optimizer, params, max_grad_norm)
    return {"reward_mean": float(rewards.mean()), "loss": total}


@dataclass
class StepPairs:
    """P step-level pairs: shared state x_t [P, C, H, W] at step `steps` [P], actions x_w and x_l,
    their sampling log-densities [P] and the conditioning [P, L, D]."""

    states: torch.Tensor
    steps: torch.Tensor
    winners: torch.Tensor
    losers: torch.Tensor
    logp_w: torch.Tensor
    logp_l: torch.Tensor
    cond: torch.Tensor


@torch.no_grad()
def spo_pairs(
    unet: Any,
    policy: StochasticPolicy,
    scorer: Any,
    cond: torch.Tensor,
    noise: torch.Tensor,
    *,
    candidates: int = 4,
    threshold: float = 0.3,
    skip_steps: int = 4,
    generator: torch.Generator | None = None,
) -> tuple[StepPairs, torch.Tensor]:
    """SPO's sampling (Liang et al. 2024, Algorithm 1): per chain and step, `candidates` draws of
    x_{t−1} from the shared x_t, scored by `scorer(x_{t−1}, t_{k+1}, c)`; a pair (best, worst) is kept
    when softmax(scores)_best − softmax(scores)_worst > threshold and the step index ≥ skip_steps.
    The chain goes on from a random candidate. Returns the pairs and the final latents [N, …]."""
    x, n, found = noise, noise.shape[0], []
    rows = torch.arange(n)
    for k in range(policy.num_steps):
        mean, std = policy.mean_std(policy.predict(unet, x, k, cond), x, k)
        z = torch.randn((candidates, *x.shape), generator=generator, dtype=x.dtype).to(x.device)
        cands = mean[None] + std * z  # [k, N, C, H, W]
        flat = cands.flatten(0, 1)
        scores = scorer(flat, policy.next_timestep(k), cond.repeat(candidates, 1, 1)).reshape(candidates, n)
        probs = scores.float().softmax(dim=0)
        best, worst = scores.argmax(dim=0), scores.argmin(dim=0)
        keep = (probs[best, rows] - probs[worst, rows] > threshold) & (k >= skip_steps)
        if bool(keep.any()):
            idx = rows[keep]
            w, l_ = cands[best[idx], idx], cands[worst[idx], idx]
            found.append(
                (
                    x[idx],
                    k,
                    w,
                    l_,
                    step_log_prob(w, mean[idx], std),
                    step_log_prob(l_, mean[idx], std),
                    cond[idx],
                )
            )
        pick = torch.randint(0, candidates, (n,), generator=generator)
        x = cands[pick, rows]
    return _stack_pairs(found, noise, cond), x


def _stack_pairs(found: list[Any], noise: torch.Tensor, cond: torch.Tensor) -> StepPairs:
    if not found:
        empty = noise[:0]
        none = torch.zeros(0, dtype=torch.float64)
        return StepPairs(empty, torch.zeros(0, dtype=torch.long), empty, empty, none, none, cond[:0])
    steps = torch.cat([torch.full((f[0].shape[0],), f[1], dtype=torch.long) for f in found])
    cat = [torch.cat([f[i] for f in found]) for i in (0, 2, 3, 4, 5, 6)]
    return StepPairs(cat[0], steps, cat[1], cat[2], cat[3], cat[4], cat[5])


def _pair_logps(unet: Any, policy: StochasticPolicy, pairs: StepPairs) -> tuple[torch.Tensor, torch.Tensor]:
    """log π_θ(x_w | x_t) and log π_θ(x_l | x_t) [P] under `unet` (one model call per distinct step)."""
    out_w, out_l = torch.zeros_like(pairs.logp_w), torch.zeros_like(pairs.logp_l)
    for k in pairs.steps.unique().tolist():
        m = pairs.steps == k
        x = pairs.states[m]
        mean, std = policy.mean_std(policy.predict(unet, x, k, pairs.cond[m]), x, k)
        out_w = out_w.index_put((m.nonzero()[:, 0],), step_log_prob(pairs.winners[m], mean, std))
        out_l = out_l.index_put((m.nonzero()[:, 0],), step_log_prob(pairs.losers[m], mean, std))
    return out_w, out_l


def spo_step(
    unet: Any,
    optimizer: torch.optim.Optimizer,
    policy: StochasticPolicy,
    scorer: Any,
    cond: torch.Tensor,
    *,
    noise: torch.Tensor,
    generator: torch.Generator | None = None,
    reference: Any | None = None,
    beta: float = 10.0,
    eps: float = 0.1,
    candidates: int = 4,
    threshold: float = 0.3,
    skip_steps: int = 4,
    max_grad_norm: float = 1.0,
) -> dict[str, float]:
    """One SPO iteration: `spo_pairs`, then one optimiser step on the mean D3PO-form loss of the kept
    pairs (β = 10, ε = 0.1 as the official config). Returns the pair count and the loss."""
    pairs, _ = spo_pairs(
        unet,
        policy,
        scorer,
        cond,
        noise,
        candidates=candidates,
        threshold=threshold,
        skip_steps=skip_steps,
        generator=generator,
    )
    return spo_update(unet, optimizer, policy, pairs, reference=reference, beta=beta, eps=eps,
                      max_grad_norm=max_grad_norm)  # fmt: skip


def spo_update(
    unet: Any,
    optimizer: torch.optim.Optimizer,
    policy: StochasticPolicy,
    pairs: StepPairs,
    *,
    reference: Any | None = None,
    beta: float = 10.0,
    eps: float = 0.1,
    max_grad_norm: float = 1.0,
) -> dict[str, float]:
    """One optimiser step on the mean D3PO-form loss of SPO's step pairs (none: no step)."""
    if pairs.steps.numel() == 0:
        return {"pairs": 0.0, "loss": 0.0}
    elements = int(pairs.states[0].numel())
    ref_w, ref_l = pairs.logp_w, pairs.logp_l
    if reference is not None:
        with torch.no_grad():
            ref_w, ref_l = _pair_logps(reference, policy, pairs)
    logp_w, logp_l = _pair_logps(unet, policy, pairs)
    loss = d3po_loss(logp_w, ref_w, logp_l, ref_l, elements, beta, eps).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clip_and_step(optimizer, [p for p in unet.parameters() if p.requires_grad], max_grad_norm)
    return {"pairs": float(pairs.steps.numel()), "loss": float(loss.detach())}
