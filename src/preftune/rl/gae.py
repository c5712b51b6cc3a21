"""Generalised advantage estimation over tokens or macro actions (PPO, MA-RLHF), as pure functions.

    adv, ret = gae_returns(token_rewards, values, mask, gamma=1.0, lam=0.95)        # token GAE (PPO)
    seg = macro_segments(mask, "fixed", n=5)                                       # MA-RLHF macros
    adv, ret = gae_returns(token_rewards, values, mask, gamma=1.0, lam=0.95, segments=seg, pooling="equal")

Tensors are [N, T]: N sampled responses, padded to T tokens, `mask` True on response tokens (a
prefix of each row). The value V_t is the critic's estimate at the state before token t (the same
hidden state that predicts y_t); past a response's end the value is 0 (the episode has ended).
The registered estimator `gae` places each scalar reward on its response's last token and adds the
optional per-token rewards (the KL penalty, RTO's DPO rewards).
"""

from __future__ import annotations

import torch

from preftune.errors import ConfigError
from preftune.losses.registry import HParam
from preftune.rl.groups import Groups
from preftune.rl.registry import register

POOLINGS = ("equal", "unit", "position")
MACROS = ("fixed", "randomized", "ppl")
RANDOMIZED_LENGTHS = (1, 2, 3, 5, 10)  # MA-RLHF's randomized n-gram lengths (official implementation)


def place_rewards(
    rewards: torch.Tensor, token_rewards: torch.Tensor | None, mask: torch.Tensor
) -> torch.Tensor:
    """Token rewards [N, T]: `token_rewards` on the response tokens (0 when None), plus each scalar
    reward [N] on its response's last token (Ouyang et al. 2022: the RM score ends the episode)."""
    mask = mask.to(device=rewards.device, dtype=torch.bool)
    per_token = torch.zeros(mask.shape, dtype=rewards.dtype, device=rewards.device)
    if token_rewards is not None:
        _check("token_rewards", token_rewards, mask)
        per_token = torch.where(mask, token_rewards.to(per_token), per_token)
    last = (mask.long().sum(dim=1) - 1).clamp(min=0)
    per_token[torch.arange(len(last)), last] += torch.where(
        mask.any(dim=1), rewards, torch.zeros_like(rewards)
    )
    return per_token


def _gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> torch.Tensor:
    """Schulman et al. 2016, GAE eq. 16 by its backward recursion: δ_t = r_t + γ V_{t+1} − V_t,
    Â_t = δ_t + γλ Â_{t+1}, with V and Â zero past the end of each row."""
    out = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(next_value)
    for t in range(rewards.shape[1] - 1, -1, -1):
        live = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = torch.where(live, delta + gamma * lam * next_adv, torch.zeros_like(delta))
        out[:, t] = adv
        next_value = torch.where(live, values[:, t], torch.zeros_like(delta))
        next_adv = adv
    return out


def _check(name: str, x: torch.Tensor, mask: torch.Tensor) -> None:
    if x.shape != mask.shape:
        raise ConfigError(f"gae: {name} {tuple(x.shape)} must match mask {tuple(mask.shape)}")


def pool(x: torch.Tensor, segments: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Per macro action, the weighted mean Σ_t σ_t x_t of its tokens → [N, M] (Chai et al. 2025,
    MA-RLHF §3.2): `equal` σ = 1/|ω|; `unit` σ = 1 on the macro's last token; `position` σ ∝ 1/k for
    its k-th token (k = 1, 2, ...). `segments` [N, T] numbers each row's macros 0, 1, ... in order."""
    if pooling not in POOLINGS:
        raise ConfigError(f"gae: unknown pooling '{pooling}' (known: {', '.join(POOLINGS)})")
    n, t = mask.shape
    m = int(segments[mask].max()) + 1 if bool(mask.any()) else 1
    flat = (torch.arange(n, device=x.device)[:, None] * m + segments.clamp(min=0)).reshape(-1)
    keep = mask.reshape(-1)
    pos = torch.arange(t, device=x.device).expand(n, t).reshape(-1)
    big = torch.full((n * m,), t, dtype=torch.long, device=x.device)
    start = big.scatter_reduce(0, flat[keep], pos[keep], reduce="amin")
    end = torch.full_like(big, -1).scatter_reduce(0, flat[keep], pos[keep], reduce="amax")
    k = (pos - start[flat] + 1).to(x.dtype)  # 1-based index within the macro
    if pooling == "equal":
        w = torch.ones_like(k)
    elif pooling == "unit":
        w = (pos == end[flat]).to(x.dtype)
    else:
        w = 1.0 / k
    w = torch.where(keep, w, torch.zeros_like(w))
    norm = torch.zeros(n * m, dtype=x.dtype, device=x.device).index_add(0, flat, w)
    total = torch.zeros_like(norm).index_add(0, flat, w * x.reshape(-1))
    return (total / norm.clamp(min=1e-30)).reshape(n, m)


def gae_returns(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float,
    lam: float,
    segments: torch.Tensor | None = None,
    pooling: str = "equal",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) [N, T] of GAE(γ, λ) (Schulman et al. 2016 eq. 16); returns Â + V are the
    value targets (Ouyang et al. 2022 / TRL's PPO).

    With `segments` (MA-RLHF, Chai et al. 2025 §3.2): each macro action's reward and value are pooled
    over its tokens (`pool`), GAE runs over macro steps, and every token takes its macro's advantage
    and return. Segments of one token each give token-level GAE exactly.
    """
    mask = mask.to(torch.bool)
    for name, x in (("token_rewards", token_rewards), ("values", values)):
        _check(name, x, mask)
    if segments is None:
        adv = _gae(token_rewards, values, mask, gamma, lam)
        return adv, torch.where(mask, adv + values, torch.zeros_like(adv))
    _check("segments", segments, mask)
    macro_r = pool(token_rewards, segments, mask, pooling)
    macro_v = pool(values, segments, mask, pooling)
    counts = torch.where(mask, segments + 1, torch.zeros_like(segments)).amax(dim=1)
    macro_mask = torch.arange(macro_r.shape[1], device=mask.device)[None, :] < counts[:, None]
    macro_adv = _gae(macro_r, macro_v, macro_mask, gamma, lam)
    index = segments.clamp(min=0)
    adv = torch.where(mask, macro_adv.gather(1, index), torch.zeros_like(token_rewards))
    ret = torch.where(mask, (macro_adv + macro_v).gather(1, index), torch.zeros_like(token_rewards))
    return adv, ret


def macro_segments(
    mask: torch.Tensor,
    kind: str,
    n: int = 5,
    *,
    ref_logps: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    repeat: int = 3,
) -> torch.Tensor:
    """Macro-action index of every token [N, T] (−1 off the mask), MA-RLHF's termination rules
    (Chai et al. 2025 §3.1): `fixed` n-grams; `randomized` n-grams with lengths from a seeded shuffle
    of (1, 2, 3, 5, 10) × `repeat` (the rest of the response is one macro); `ppl` starts a macro at
    token i when the reference's perplexity rises at token i + 1 (log π_ref(y_{i+1}) < log π_ref(y_i)).
    As in the authors' implementation, each response's last token is a macro of its own, so the
    sequence reward on it is not pooled. `fixed` with n = 1 makes every token a macro (PPO)."""
    if kind not in MACROS:
        raise ConfigError(f"macro actions: unknown termination '{kind}' (known: {', '.join(MACROS)})")
    if n < 1:
        raise ConfigError(f"macro actions: n = {n} must be ≥ 1")
    if kind == "ppl" and ref_logps is None:
        raise ConfigError("macro actions: 'ppl' needs the reference's per-token log-probs (ref_logps=)")
    mask = mask.to(torch.bool)
    lengths = mask.sum(dim=1).tolist()
    starts = torch.zeros(mask.shape, dtype=torch.bool)
    for row, length in enumerate(lengths):
        if length == 0:
            continue
        if kind == "fixed":
            starts[row, : length - 1 : n] = True
        elif kind == "randomized":
            sizes = torch.tensor(RANDOMIZED_LENGTHS).repeat_interleave(repeat)
            sizes = sizes[torch.randperm(len(sizes), generator=generator)]
            edges = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
            starts[row, edges[edges < length - 1]] = True
        else:
            assert ref_logps is not None
            lp = ref_logps[row, :length].float().cpu()
            starts[row, 0] = True
            starts[row, : length - 1] |= lp[1:] < lp[:-1]
        starts[row, length - 1] = True
    seg = starts.long().cumsum(dim=1) - 1
    return torch.where(mask.cpu(), seg, torch.full_like(seg, -1)).to(mask.device)


@register(
    "gae",
    paper="Schulman et al. 2016, GAE eq. 16; Chai et al. 2025, MA-RLHF §3.2 (macro actions)",
    equation="Â_t = Σ_l (γλ)^l δ_{t+l}, δ_t = r_t + γ V_{t+1} − V_t; r_T += r(x, y)",
    hparams={
        "gamma": HParam(1.0, "discount γ", low=0.0, high=1.0),
        "lam": HParam(0.95, "GAE's λ (1: Monte-Carlo return − V; 0: one-step TD error)", low=0.0, high=1.0),
        "pooling": HParam("equal", "macro actions: value/reward pooling over a macro", choices=POOLINGS),
    },
    inputs={
        "values": "[N, T] the critic's values V_t (required)",
        "mask": "[N, T] response-token mask (required)",
        "token_rewards": "optional [N, T] per-token rewards (KL penalty, RTO's DPO rewards)",
        "segments": "optional [N, T] macro-action index of each token (rl.gae.macro_segments)",
    },
    required=("values", "mask"),
)
def gae(
    rewards: torch.Tensor,
    groups: Groups,
    *,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
    pooling: str,
    token_rewards: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
) -> torch.Tensor:
    """PPO's advantages [N, T]: GAE(γ, λ) over token rewards (the scalar reward on each response's last
    token plus `token_rewards`), or over MA-RLHF's macro actions with `segments`. Not whitened (the
    PPO phase whitens over the batch after taking the returns)."""
    mask = mask.to(device=rewards.device, dtype=torch.bool)
    if mask.dim() != 2 or mask.shape[0] != rewards.shape[0]:
        raise ConfigError(f"estimator 'gae': mask must be [N, T] with N = {rewards.shape[0]}")
    per_token = place_rewards(rewards, token_rewards, mask)
    adv, _ = gae_returns(
        per_token, values.to(per_token), mask, gamma=gamma, lam=lam, segments=segments, pooling=pooling
    )
    return adv
