"""Listwise losses on K ranked responses, best first, ragged K via the mask (docs/algorithms.md §3)."""

from __future__ import annotations

import torch

from preftune.losses.core import branch_mask, clean, finish, lengths, log_ratios, log_sigmoid
from preftune.losses.pairwise_losses import BETA
from preftune.losses.registry import HParam, LossOutput, register
from preftune.types import PreferenceBatch


def list_metrics(rewards: torch.Tensor, mask: torch.Tensor, better: torch.Tensor) -> dict[str, torch.Tensor]:
    """Best-vs-worst reward metrics and pairwise ranking accuracy of a list.

    rewards [E, K], mask [E, K], better [E, K, K] bool (i should rank above j). rewards/chosen is the
    best-ranked response's reward, rewards/rejected the last present one's; rewards/accuracy the
    fraction of ordered pairs (i above j) with r_i > r_j.
    """
    r = rewards.detach()
    k = mask.shape[1]
    idx = torch.arange(k, device=mask.device).expand_as(mask)
    last = torch.where(mask, idx, torch.zeros_like(idx)).max(dim=1).values
    best, worst = r[:, 0], r.gather(1, last[:, None])[:, 0]
    correct = (r[:, :, None] > r[:, None, :]) & better
    pairs = better.float().sum(dim=(1, 2)).clamp(min=1)
    return {
        "rewards/chosen": best,
        "rewards/rejected": worst,
        "rewards/margin": best - worst,
        "rewards/accuracy": correct.float().sum(dim=(1, 2)) / pairs,
    }


@register(
    "listwise_pl",
    kind="listwise",
    needs_reference=True,
    hparams={"beta": BETA},
    paper="Rafailov et al. 2023, DPO, App. A.3 (Plackett–Luce); Liu et al. 2024, LiPO (list MLE)",
    equation="DPO App. A.3, Plackett–Luce objective (eq. number not verified: paper text not reachable)",
)
def listwise_pl(batch: PreferenceBatch, state: dict[str, torch.Tensor], *, beta: float) -> LossOutput:
    """Plackett–Luce: −Σ_k log( exp(βρ_k) / Σ_{j≥k} exp(βρ_j) ) over the present branches, best first.

    Rafailov et al. 2023, App. A.3: the PL model of a ranking τ with the DPO reward βρ. Summed over
    positions (not averaged), so K = 2 is exactly DPO. Absent branches are left out of every
    denominator; the last present branch contributes 0.
    """
    mask = branch_mask(batch)
    valid = mask.sum(dim=1) >= 2
    s = beta * log_ratios(batch, "listwise_pl")  # [E, K]
    k = mask.shape[1]
    pos = torch.arange(k, device=s.device)
    # denominators of position k: branches j ≥ k that exist; j = k always included so every row of
    # the logsumexp has a finite entry (absent k are zeroed below).
    later = (pos[None, :, None] <= pos[None, None, :]) & mask[:, None, :]
    later = later | torch.eye(k, dtype=torch.bool, device=s.device)[None]
    logits = s[:, None, :].expand(-1, k, -1).masked_fill(~later, float("-inf"))
    terms = s - torch.logsumexp(logits, dim=-1)  # [E, K]
    losses = -torch.where(mask, terms, torch.zeros((), device=s.device)).sum(dim=1)
    better = (pos[:, None] < pos[None, :])[None] & mask[:, :, None] & mask[:, None, :]
    losses, metrics = finish(losses, valid, list_metrics(s, mask, better))
    return LossOutput(losses, metrics, {})


def lambda_weights(labels: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """LambdaLoss / ΔNDCG pair weights [E, K, K] for pairs with labels ψ_i > ψ_j, both present.

    λ_ij = |G_i − G_j| · |1/D(τ_i) − 1/D(τ_j)|, G = 2^ψ − 1, D(τ) = log₂(1 + τ), τ the 1-based rank
    of each response under the current rewards (detached; absent responses ranked last).
    """
    r = rewards.detach().masked_fill(~mask, float("-inf"))
    order = torch.argsort(r, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(1, r.shape[1] + 1, device=r.device).expand_as(order))
    # ψ are graded relevance labels (small numbers); capping at 60 keeps 2^ψ finite in float32.
    gain = torch.pow(2.0, labels.clamp(max=60.0)) - 1.0
    inv_discount = 1.0 / torch.log2(1.0 + rank.float())
    w = (gain[:, :, None] - gain[:, None, :]).abs() * (
        inv_discount[:, :, None] - inv_discount[:, None, :]
    ).abs()
    pair = (labels[:, :, None] > labels[:, None, :]) & mask[:, :, None] & mask[:, None, :]
    return torch.where(pair, w, torch.zeros((), device=w.device))


@register(
    "tpo",
    kind="listwise",
    needs_reference=True,
    hparams={
        "beta": BETA,
        "token_mean": HParam(True, "implicit reward from per-token mean log-ratios (true) or summed (false)"),
    },
    paper="Liao et al. 2024, TPO: Aligning Large Language Models with Multi-branch & Multi-step "
    "Preference Trees (ICLR 2025)",
    equation="§4, preference list ranking (LambdaLoss) over the implicit reward (Eq. 10 adaptive step reward not implemented)",
)
def tpo(
    batch: PreferenceBatch, state: dict[str, torch.Tensor], *, beta: float, token_mean: bool
) -> LossOutput:
    """TPO: −Σ_{ψ_i > ψ_j} λ_ij log σ(r_i − r_j), r = βρ (per-token mean by default), λ from ΔNDCG.

    Liao et al. 2024 frame alignment on a preference tree as preference list ranking with a
    lambda-weighted (LambdaLoss, as LiPO-λ) pairwise logistic loss over the implicit rewards; ψ are
    the responses' scores (`batch.scores`, e.g. the tree's correctness values), or, without scores,
    graded labels from the ranking (K−1 for the best … 0 for the last). The gain 2^ψ − 1 grows fast:
    give small graded scores (e.g. correctness values in [0, 1] or ranks), not raw reward values.
    Deviations: (1) the paper's Adaptive Step Reward (Eq. 10) re-weights each reasoning step's
    reward by the cosine similarity of step embeddings between branches; that needs step boundaries
    and hidden states, which the loss's statistics do not carry, so all steps weigh equally — with
    equal weights the step-averaged reward is the per-token mean log-ratio, hence token_mean=True.
    (2) pair terms are summed per list (LiPO-λ) rather than divided by K(K−1). Checked against the
    authors' code (MrBlankness/TPO loss.py), which differs further: it uses no ΔNDCG weights (every
    ordered pair, −log σ(Δr·sign(ψ_i − ψ_j)), ties included at log 2), divides by K(K−1), and then
    returns −log σ(β·that mean) with the log-ratio unscaled — we keep the paper's lambda-weighted
    ranking over βρ instead (the paper's text was not reachable to settle it). β = 0.1 default, as
    the authors' code.
    """
    mask = branch_mask(batch)
    valid = mask.sum(dim=1) >= 2
    rho = log_ratios(batch, "tpo")
    if token_mean:
        rho = rho / lengths(batch)
    r = beta * rho
    if batch.scores is not None:
        labels = clean(batch.scores, mask)
    else:
        # graded labels from the order: the number of present responses ranked below each one
        labels = (mask.flip(1).cumsum(1).flip(1) - 1).clamp(min=0).float()
    lam = lambda_weights(labels, r, mask)
    pair_loss = -log_sigmoid(r[:, :, None] - r[:, None, :])
    losses = (lam * pair_loss).sum(dim=(1, 2))
    better = (labels[:, :, None] > labels[:, None, :]) & mask[:, :, None] & mask[:, None, :]
    losses, metrics = finish(losses, valid, list_metrics(r, mask, better))
    return LossOutput(losses, metrics, {})
