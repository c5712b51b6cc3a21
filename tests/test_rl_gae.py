"""GAE (Schulman et al. 2016) and MA-RLHF's macro actions: hand-computed recursions, the λ = 1 and
λ = 0 limits, pooling weights and termination rules."""

from __future__ import annotations

import pytest
import torch

from preftune import rl
from preftune.errors import ConfigError
from preftune.rl.gae import gae_returns, macro_segments, place_rewards, pool

MASK = torch.tensor([[True, True, True], [True, True, False]])
R = torch.tensor([[0.0, 0.0, 1.0], [0.5, -1.0, 9.0]], dtype=torch.float64)  # 9, 7: off the mask
V = torch.tensor([[0.5, 0.2, 0.4], [0.1, 0.3, 7.0]], dtype=torch.float64)


def test_gae_hand_computed_recursion() -> None:
    # γ = 0.9, λ = 0.8 (γλ = 0.72); row 0: δ = (−0.32, 0.16, 0.6); row 1 ends after 2 tokens: δ = (0.67, −1.3)
    adv, ret = gae_returns(R, V, MASK, gamma=0.9, lam=0.8)
    expected = torch.tensor([[0.10624, 0.592, 0.6], [-0.266, -1.3, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, torch.where(MASK, expected + V, torch.zeros_like(V)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_gae_limits_lambda_one_and_zero(gamma: float) -> None:
    g = torch.Generator().manual_seed(0)
    r, v = (
        torch.randn(5, 7, generator=g, dtype=torch.float64),
        torch.randn(5, 7, generator=g, dtype=torch.float64),
    )
    lengths = torch.tensor([7, 1, 4, 6, 3])
    mask = torch.arange(7)[None, :] < lengths[:, None]
    mc, td = torch.zeros_like(r), torch.zeros_like(r)
    for i, n in enumerate(lengths.tolist()):
        for t in range(n):
            mc[i, t] = sum(gamma**k * r[i, t + k] for k in range(n - t)) - v[i, t]  # Monte-Carlo return − V
            nxt = v[i, t + 1] if t + 1 < n else 0.0
            td[i, t] = r[i, t] + gamma * nxt - v[i, t]  # one-step TD error
    torch.testing.assert_close(gae_returns(r, v, mask, gamma=gamma, lam=1.0)[0], mc, rtol=0, atol=1e-12)
    torch.testing.assert_close(gae_returns(r, v, mask, gamma=gamma, lam=0.0)[0], td, rtol=0, atol=1e-12)
    # macros of one token each are token-level GAE exactly
    seg = macro_segments(mask, "fixed", 1)
    assert torch.equal(seg, torch.where(mask, torch.arange(7).expand(5, 7), torch.full_like(seg, -1)))
    for pooling in ("equal", "unit", "position"):
        a, b = (
            gae_returns(r, v, mask, gamma=gamma, lam=0.7),
            gae_returns(r, v, mask, gamma=gamma, lam=0.7, segments=seg, pooling=pooling),
        )
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_registered_estimator_puts_the_reward_on_the_last_token() -> None:
    rewards = torch.tensor([1.0, 0.5], dtype=torch.float64)
    kl = torch.tensor([[-0.1, -0.2, 0.0], [0.3, 0.1, 5.0]], dtype=torch.float64)
    per_token = place_rewards(rewards, kl, MASK)
    torch.testing.assert_close(
        per_token, torch.tensor([[-0.1, -0.2, 1.0], [0.3, 0.6, 0.0]], dtype=torch.float64)
    )
    adv = rl.advantages(
        "gae", rewards, torch.tensor([0, 0]), values=V, mask=MASK, token_rewards=kl, gamma=1.0, lam=1.0
    )
    # λ = γ = 1: Σ_{s≥t} r_s − V_t
    expected = torch.tensor(
        [[0.7 - 0.5, 0.8 - 0.2, 1.0 - 0.4], [0.9 - 0.1, 0.6 - 0.3, 0.0]], dtype=torch.float64
    )
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-12)
    with pytest.raises(ConfigError, match="needs values="):
        rl.advantages("gae", rewards, torch.tensor([0, 0]), mask=MASK)


def test_pooling_weights_and_macro_gae() -> None:
    x = torch.tensor([[1.0, 3.0, 2.0, 4.0, 6.0, 5.0]], dtype=torch.float64)
    seg = torch.tensor([[0, 0, 1, 1, 1, 2]])
    mask = torch.ones_like(seg, dtype=torch.bool)
    torch.testing.assert_close(
        pool(x, seg, mask, "equal"), torch.tensor([[2.0, 4.0, 5.0]], dtype=torch.float64)
    )
    torch.testing.assert_close(
        pool(x, seg, mask, "unit"), torch.tensor([[3.0, 6.0, 5.0]], dtype=torch.float64)
    )
    position = torch.tensor([[2.5 / 1.5, 6 / (11 / 6), 5.0]], dtype=torch.float64)  # σ ∝ 1, 1/2, 1/3
    torch.testing.assert_close(pool(x, seg, mask, "position"), position)
    # macro GAE: r = (0.2, 0.4 | 1), V = (1, 3 | 0.5) → macro r (0.3, 1), V (2, 0.5); γ = λ = 1
    r = torch.tensor([[0.2, 0.4, 1.0]], dtype=torch.float64)
    v = torch.tensor([[1.0, 3.0, 0.5]], dtype=torch.float64)
    adv, ret = gae_returns(
        r, v, mask[:, :3], gamma=1.0, lam=1.0, segments=seg[:, :3].clamp(max=1), pooling="equal"
    )
    torch.testing.assert_close(adv, torch.tensor([[-0.7, -0.7, 0.5]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[1.3, 1.3, 1.0]], dtype=torch.float64))
    with pytest.raises(ConfigError, match="unknown pooling 'mean'"):
        pool(x, seg, mask, "mean")


def test_macro_terminations() -> None:
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    seg = macro_segments(mask, "fixed", 2)  # n-grams over all but the last token, which is alone
    assert seg.tolist() == [[0, 0, 1, 1, 2, 3], [0, 0, 1, -1, -1, -1]]
    ref = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.0, 0.0]])  # perplexity rises at tokens 1 and 3
    assert macro_segments(mask[:1, :5], "ppl", ref_logps=ref[:, :5]).tolist() == [[0, 0, 1, 1, 2]]
    long = torch.ones(2, 40, dtype=torch.bool)
    a = macro_segments(long, "randomized", generator=torch.Generator().manual_seed(3))
    b = macro_segments(long, "randomized", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    sizes = torch.bincount(a[0])
    assert sizes[-1] == 1 and set(sizes[:-2].tolist()) <= {1, 2, 3, 5, 10}  # the rest: one macro
    with pytest.raises(ConfigError, match="'ppl' needs the reference"):
        macro_segments(mask, "ppl")
    with pytest.raises(ConfigError, match="unknown termination 'parse'"):
        macro_segments(mask, "parse")
