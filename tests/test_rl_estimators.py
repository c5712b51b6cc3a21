"""Advantage estimators: hand-computed values, zero-signal groups, and unbiasedness by exact
enumeration of every outcome of a softmax bandit."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from preftune import rl
from preftune.errors import ConfigError

ONE_GROUP = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
ZEROS4 = torch.zeros(4, dtype=torch.long)


def test_one_group_hand_values() -> None:
    # mean 0.5, unbiased std sqrt(4 · 0.25 / 3) = sqrt(1/3)
    grpo = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert grpo == pytest.approx(0.86588, abs=1e-5)
    sign = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(rl.advantages("grpo", ONE_GROUP, ZEROS4), grpo * sign, rtol=0, atol=1e-12)
    torch.testing.assert_close(rl.advantages("rloo", ONE_GROUP, ZEROS4), 2 / 3 * sign, rtol=0, atol=1e-12)
    torch.testing.assert_close(rl.advantages("dr_grpo", ONE_GROUP, ZEROS4), 0.5 * sign, rtol=0, atol=1e-12)
    torch.testing.assert_close(rl.advantages("grpo", ONE_GROUP, ZEROS4, scale="none"), 0.5 * sign)
    torch.testing.assert_close(rl.advantages("positive_only", ONE_GROUP - 0.5, ZEROS4), 0.5 * (sign + 1) / 2)


def test_two_groups_batch_scaling_and_uneven_sizes() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    groups = torch.tensor([7, 7, 7, 7, 3, 3, 3, 3])  # any integer ids
    # batch: mean 5/8, Σ(r − 5/8)² = 5·(3/8)² + 3·(5/8)² = 15/8, unbiased var = 15/56
    std = math.sqrt(15 / 56)
    centred = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75], dtype=torch.float64)
    got = rl.advantages("grpo", rewards, groups, scale="batch")
    torch.testing.assert_close(got, centred / (std + 1e-4), rtol=0, atol=1e-12)
    # groups of 3 and 1: the singleton has no baseline → 0 for grpo and rloo
    r = torch.tensor([3.0, 1.0, 2.0, 5.0], dtype=torch.float64)
    g = torch.tensor([0, 0, 0, 1])
    torch.testing.assert_close(
        rl.advantages("rloo", r, g), torch.tensor([1.5, -1.5, 0.0, 0.0], dtype=torch.float64)
    )
    torch.testing.assert_close(
        rl.advantages("grpo", r, g), torch.tensor([1.0, -1.0, 0.0, 0.0], dtype=torch.float64) / (1 + 1e-4)
    )


def test_all_equal_groups_give_zeros_and_count_as_zero_signal() -> None:
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    for name in ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline", "bnpo", "global_mean"):
        est = rl.estimate(name, rewards, groups)
        assert est.advantages[:4].abs().max() == 0.0, name
        assert est.metrics["zero_signal_fraction"] == pytest.approx(2 / 3)
        assert est.advantages[4] > 0 > est.advantages[5], name


def test_remax_zero_signal_counts_groups_that_match_their_greedy_reward() -> None:
    # group 0 all 1 with greedy 1: no signal; group 1 all 1 with greedy 0: signal (+1 each);
    # group 2 one of one sample (1) with greedy 1: none; group 3 mixed with greedy 0: signal
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 3, 3])
    est = rl.estimate("remax", rewards, groups, baseline_rewards=torch.tensor([1.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(est.advantages, torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0]))
    assert est.metrics["zero_signal_fraction"] == pytest.approx(2 / 4)


def test_remax_baseline_and_clip() -> None:
    rewards = torch.tensor([1.0, 0.0, 9.0, -9.0])
    groups = torch.tensor([0, 0, 1, 1])
    got = rl.advantages("remax", rewards, groups, baseline_rewards=torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(got, torch.tensor([0.5, -0.5, 5.0, -5.0]))
    got = rl.advantages("remax", rewards, groups, baseline_rewards=[0.5, 1.0], clip=2.0)
    torch.testing.assert_close(got, torch.tensor([0.5, -0.5, 2.0, -2.0]))
    with pytest.raises(ConfigError, match=r"estimator 'remax': needs baseline_rewards="):
        rl.advantages("remax", rewards, groups)
    with pytest.raises(ConfigError, match="baseline_rewards has 1 values but the prompt indices"):
        rl.advantages("remax", rewards, groups, baseline_rewards=[0.5])


def test_reinforce_pp_whitening_by_hand() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    groups = torch.tensor([0, 0, 1, 1])
    # mean 1/4, biased var 3/16
    expected = (rewards - 0.25) / math.sqrt(3 / 16)
    torch.testing.assert_close(rl.advantages("reinforce_pp", rewards, groups), expected)
    # baseline: centred per group → [0.5, −0.5, 0, 0]; mean 0, biased var 1/8
    got = rl.advantages("reinforce_pp_baseline", rewards, groups)
    torch.testing.assert_close(
        got, torch.tensor([0.5, -0.5, 0.0, 0.0], dtype=torch.float64) / math.sqrt(1 / 8)
    )
    # per-token discounted returns: lengths 2 and 1, γ = 0.5; returns [[0.5, 1], [2, ·]]
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    adv = rl.advantages(
        "reinforce_pp",
        torch.tensor([1.0, 2.0], dtype=torch.float64),
        torch.tensor([0, 1]),
        gamma=0.5,
        mask=mask,
    )
    values = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    white = (values - values.mean()) / values.var(unbiased=False).sqrt()
    torch.testing.assert_close(adv[mask], white)
    assert adv[1, 1] == 0.0


def test_bnpo_by_hand() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    # p̂ = [0.5, 0.75]: μ = 0.625, σ² = 0.015625, k = 0.234375/0.015625 − 1 = 14, a = 8.75, b = 5.25
    alpha, beta = 1 + 8.75 / 3, 1 + 5.25 / 3

    def density(p: float) -> float:
        norm = math.gamma(alpha + beta) / (math.gamma(alpha) * math.gamma(beta))
        return norm * p ** (alpha - 1) * (1 - p) ** (beta - 1)

    w1, w2 = 1 / density(0.5), 1 / density(0.75)
    expected = [0.5 * w1, -0.5 * w1, -0.5 * w1, 0.5 * w1, 0.25 * w2, 0.25 * w2, 0.25 * w2, -0.75 * w2]
    assert w1 != pytest.approx(1.0) and w2 != pytest.approx(w1)
    torch.testing.assert_close(
        rl.advantages("bnpo", rewards, groups), torch.tensor(expected, dtype=torch.float64)
    )
    # two identical components average to the one-component result
    both = torch.stack([rewards, rewards], dim=1)
    torch.testing.assert_close(
        rl.advantages("bnpo", both, groups), torch.tensor(expected, dtype=torch.float64)
    )


def test_global_mean_uses_the_pool() -> None:
    rewards = torch.tensor([1.0, 0.0])
    groups = torch.tensor([4, 4])
    pool = torch.tensor([1.0, 0.0, 1.0, 1.0])
    got = rl.advantages(
        "global_mean", rewards, groups, pool_rewards=pool, pool_groups=torch.tensor([4, 4, 4, 4])
    )
    torch.testing.assert_close(got, torch.tensor([0.25, -0.75]))


def test_bad_inputs_name_the_problem() -> None:
    with pytest.raises(ConfigError, match="unknown estimator 'grp' — did you mean 'grpo'"):
        rl.advantages("grp", ONE_GROUP, ZEROS4)
    with pytest.raises(ConfigError, match="hyper-parameter 'scale' = 'prompt' is not one of the choices"):
        rl.advantages("grpo", ONE_GROUP, ZEROS4, scale="prompt")
    with pytest.raises(
        ConfigError, match=r"groups must be a 1-D tensor with one prompt index per sample \(4\)"
    ):
        rl.advantages("grpo", ONE_GROUP, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ConfigError, match="reward of sample 2 is nan"):
        rl.advantages("grpo", torch.tensor([1.0, 0.0, float("nan"), 1.0]), ZEROS4)
    with pytest.raises(ConfigError, match="must hold integer prompt indices"):
        rl.advantages("grpo", ONE_GROUP, torch.zeros(4))


def _expected_gradient(name: str, theta: torch.Tensor, reward: torch.Tensor, G: int) -> torch.Tensor:
    """E[(1/G) Σ_i A_i ∇_θ log π(a_i)] by exact enumeration of all K^G outcomes of one prompt."""
    pi = torch.softmax(theta, dim=0)
    eye = torch.eye(len(theta), dtype=torch.float64)
    total = torch.zeros_like(theta)
    greedy = reward[int(theta.argmax())].reshape(1)
    for actions in itertools.product(range(len(theta)), repeat=G):
        a = torch.tensor(actions)
        prob = pi[a].prod()
        extra = {"baseline_rewards": greedy} if name == "remax" else {}
        adv = rl.advantages(name, reward[a], torch.zeros(G, dtype=torch.long), **extra)
        grads = eye[a] - pi  # ∇_θ log softmax(θ)[a_i]
        total += prob * (adv[:, None] * grads).mean(dim=0)
    return total


@pytest.mark.parametrize("name,factor", [("rloo", 1.0), ("remax", 1.0), ("dr_grpo", 3 / 4)])
def test_unbiasedness_on_a_softmax_bandit(name: str, factor: float) -> None:
    theta = torch.tensor([0.3, -0.2, 0.9], dtype=torch.float64)
    reward = torch.tensor([1.0, 0.25, -0.5], dtype=torch.float64)
    pi = torch.softmax(theta, dim=0)
    true = pi * (reward - (pi * reward).sum())  # ∇_θ Σ_a π_a r_a
    got = _expected_gradient(name, theta, reward, G=4)
    torch.testing.assert_close(got, factor * true, rtol=0, atol=1e-12)
    assert true.abs().max() > 0.1
