"""Policy loss terms: hand values of PPO-clip's branches, dual clip, GSPO's sequence ratio, the KL
estimators, the three aggregations, and exactness across micro-batches and ranks."""

from __future__ import annotations

import math

import pytest
import torch

from preftune.errors import ConfigError
from preftune.losses.policy_losses import (
    POLICY_LOSSES,
    PolicyBatch,
    get_policy,
    global_denominators,
    kl_penalty,
    local_denominator,
    parse_policy_objective,
    policy_objective,
)


def one_token(log_ratio: list[float], adv: list[float]) -> tuple[PolicyBatch, torch.Tensor]:
    logp = torch.tensor(log_ratio, dtype=torch.float64)[:, None].requires_grad_(True)
    batch = PolicyBatch(
        policy_token_logps=logp,
        mask=torch.ones(len(adv), 1, dtype=torch.bool),
        advantages=torch.tensor(adv),
        old_token_logps=torch.zeros(len(adv), 1),
    )
    return batch, logp


def run(name: str, batch: PolicyBatch, **hp: object) -> torch.Tensor:
    spec = get_policy(name)
    return spec.fn(batch, {}, **spec.validate(hp)).losses


def test_ppo_clip_branches_by_hand() -> None:
    ratios = [1.5, 0.5, 0.5, 1.5, 1.25]
    advs = [1.0, 1.0, -1.0, -1.0, 1.0]
    batch, logp = one_token([math.log(r) for r in ratios], advs)
    losses = run("ppo_clip", batch)
    # A>0 ρ>1+ε: −1.2 (clipped, no gradient); A>0 ρ<1: −0.5; A<0 ρ<1−ε: 0.8 (clipped); A<0 ρ>1: 1.5
    torch.testing.assert_close(losses, torch.tensor([-1.2, -0.5, 0.8, 1.5, -1.2]))
    losses.sum().backward()
    # ∂(−ρA)/∂log π = −ρA on the unclipped branch, 0 where clipped
    torch.testing.assert_close(logp.grad[:, 0].float(), torch.tensor([0.0, -0.5, 0.0, 1.5, 0.0]))
    batch, _ = one_token([math.log(r) for r in ratios], advs)
    higher = run("ppo_clip", batch, eps_high=0.28)  # DAPO's clip-higher: 1.25 < 1.28 is not clipped
    torch.testing.assert_close(higher, torch.tensor([-1.28, -0.5, 0.8, 1.5, -1.25]))


def test_dual_clip_bounds_negative_advantages() -> None:
    batch, logp = one_token([math.log(5.0), math.log(2.0), math.log(5.0)], [-1.0, -1.0, 1.0])
    losses = run("ppo_clip", batch, dual_clip=3.0)
    # A<0 ρ=5: min(5, 3) = 3 (no gradient); ρ=2: 2 < 3 unchanged; A>0 untouched (clipped at 1.2)
    torch.testing.assert_close(losses, torch.tensor([3.0, 2.0, -1.2]))
    losses.sum().backward()
    torch.testing.assert_close(logp.grad[:, 0].float(), torch.tensor([0.0, 2.0, 0.0]))
    with pytest.raises(ConfigError, match=r"dual_clip = 0.5 must be 0 \(off\) or > 1"):
        run("ppo_clip", batch, dual_clip=0.5)


def test_gspo_sequence_ratio() -> None:
    logp = torch.tensor([[0.1, 0.3, 9.0]], dtype=torch.float64, requires_grad=True)
    batch = PolicyBatch(
        policy_token_logps=logp,
        mask=torch.tensor([[True, True, False]]),
        advantages=torch.tensor([2.0]),
        old_token_logps=torch.zeros(1, 3),
    )
    out = get_policy("ppo_clip").fn(
        batch,
        {},
        eps_low=0.2,
        eps_high=10.0,
        dual_clip=0.0,
        level="sequence",
        aggregation="seq_mean_token_mean",
    )
    s = math.exp(0.2)  # exp(mean token log-ratio)
    assert float(out.losses[0].detach()) == pytest.approx(-2 * s, abs=1e-6)
    assert float(out.metrics["ratio_mean"][0]) == pytest.approx(s, abs=1e-6)
    out.losses.sum().backward()
    # GSPO: ∇(−A s) = −A s · (1/|y|) Σ_t ∇log π_t
    torch.testing.assert_close(logp.grad[0].float(), torch.tensor([-s, -s, 0.0]), atol=1e-6, rtol=0)


def test_kl_estimators_by_hand() -> None:
    policy = torch.tensor([[math.log(0.5)]])
    ref = torch.tensor([[math.log(0.25)]])
    r = math.log(0.5)  # log π_ref − log π_θ
    expected = {"k1": -r, "k2": r * r / 2, "k3": math.exp(r) - r - 1}
    for name, value in expected.items():
        batch = PolicyBatch(policy, torch.ones(1, 1, dtype=torch.bool), torch.zeros(1), ref_token_logps=ref)
        assert float(run("kl", batch, estimator=name)[0]) == pytest.approx(value, abs=1e-6)
    assert expected["k3"] == pytest.approx(0.193147, abs=1e-6)
    policy2 = torch.tensor([[math.log(0.5), -1.0, 7.0]])
    ref2 = torch.tensor([[math.log(0.25), -1.5, 0.0]])
    mask = torch.tensor([[True, True, False]])
    penalty = kl_penalty(policy2, ref2, mask, beta=0.1)
    torch.testing.assert_close(penalty, torch.tensor([[-0.1 * -r, -0.05, 0.0]]))
    summed = kl_penalty(policy2, ref2, mask, beta=0.1, per_token=False)
    torch.testing.assert_close(summed, torch.tensor([-0.1 * -r - 0.05]))
    with pytest.raises(ConfigError, match="loss 'kl' needs reference log-probs"):
        run("kl", PolicyBatch(policy, torch.ones(1, 1, dtype=torch.bool), torch.zeros(1)))


def test_aggregations_by_hand() -> None:
    # per-token pg losses: sequence 0 has one token with loss 2, sequence 1 three tokens with loss 1
    logp = torch.tensor([[-1.0, 5.0, 5.0], [-1.0, -1.0, -1.0]])
    batch = PolicyBatch(
        logp, torch.tensor([[1, 0, 0], [1, 1, 1]], dtype=torch.bool), torch.tensor([2.0, 1.0]), max_len=4
    )
    expected = {
        "token_mean": 5 / 4,
        "seq_mean_token_mean": (2 + 1) / 2,
        "seq_mean_token_sum_norm": (2 / 4 + 3 / 4) / 2,
    }
    for aggregation, value in expected.items():
        terms = [(get_policy("pg"), 1.0, {"aggregation": aggregation})]
        total, _ = policy_objective(batch, terms, global_denominators(terms, [batch]))
        assert float(total) == pytest.approx(value), aggregation
    no_len = PolicyBatch(logp, batch.mask, batch.advantages)
    with pytest.raises(ConfigError, match="needs the batch's max_len"):
        run("pg", no_len, aggregation="seq_mean_token_sum_norm")


def test_on_policy_token_mean_loss_is_the_length_weighted_advantage() -> None:
    # ρ = 1 (π_old = the sampling policy): every token's loss is −A_i, so the DAPO token mean is
    # −Σ_i A_i·|y_i| / Σ_i |y_i| — zero for equal lengths (A sums to 0 in a group), not otherwise.
    # One group of 4: rewards [1, 0, 0, 1] → A = ±0.866 (unbiased std 0.577, ε 1e-4), lengths 5, 3, 3, 1.
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    adv = torch.tensor([a, -a, -a, a])
    lengths = torch.tensor([5, 3, 3, 1])
    mask = torch.arange(5)[None, :] < lengths[:, None]
    logp = -torch.rand(4, 5, generator=torch.Generator().manual_seed(0)) - 0.1
    terms = [(get_policy("ppo_clip"), 1.0, get_policy("ppo_clip").validate({}))]
    batch = PolicyBatch(logp, mask, adv, old_token_logps=logp.clone())
    total, _ = policy_objective(batch, terms, global_denominators(terms, [batch]))
    assert float(total) == pytest.approx(-a * (5 - 3 - 3 + 1) / 12, abs=1e-7)  # = +a/6 ≈ 0.1443
    equal = PolicyBatch(logp, torch.ones(4, 5, dtype=torch.bool), adv, old_token_logps=logp.clone())
    total, _ = policy_objective(equal, terms, global_denominators(terms, [equal]))
    assert abs(float(total)) < 1e-7


def _global_batch(seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.nn.Parameter, torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    n, t = 16 * 8, 12
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    data = {
        "mask": mask,
        "base": torch.randn(n, t, generator=g, dtype=torch.float64),
        "old": -torch.rand(n, t, generator=g, dtype=torch.float64) * 2,
        "ref": -torch.rand(n, t, generator=g, dtype=torch.float64) * 2,
        "adv": torch.randn(n, generator=g, dtype=torch.float64),
    }
    theta = torch.nn.Parameter(torch.zeros(n, t, dtype=torch.float64))
    w = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))
    return data, theta, w


def _batch(data: dict[str, torch.Tensor], theta: torch.Tensor, w: torch.Tensor, rows: slice) -> PolicyBatch:
    logp = -torch.nn.functional.softplus(data["base"][rows] + theta[rows] + w)
    return PolicyBatch(
        policy_token_logps=logp,
        mask=data["mask"][rows],
        advantages=data["adv"][rows],
        old_token_logps=data["old"][rows],
        ref_token_logps=data["ref"][rows],
        max_len=12,
    )


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_exact_across_micro_batches_and_ranks(aggregation: str) -> None:
    terms = [
        (spec, weight, spec.validate({"aggregation": aggregation}))
        for spec, weight in parse_policy_objective("ppo_clip:1,kl:0.04")
    ]
    results = []
    for ranks, micro in ((1, 1), (1, 4), (2, 2)):
        data, theta, w = _global_batch()
        per_rank = 128 // ranks
        size = per_rank // micro
        losses = []
        # each rank computes its local denominators; the counts are summed over ranks (all-reduce)
        shares = [
            [
                _batch(data, theta, w, slice(r * per_rank + m * size, r * per_rank + (m + 1) * size))
                for m in range(micro)
            ]
            for r in range(ranks)
        ]
        local = [
            [sum(local_denominator(b, h["aggregation"]) for b in mine) for _, _, h in terms]
            for mine in shares
        ]
        denominators = [max(sum(col), 1.0) for col in zip(*local)]
        for mine in shares:
            for b in mine:
                total, _ = policy_objective(b, terms, denominators)
                total.backward()
                losses.append(float(total.detach()))
        grads = [theta.grad.clone(), w.grad.clone()]  # gradients summed over ranks and micro-batches
        results.append((sum(losses), grads))
    (loss0, (gt0, gw0)) = results[0]
    for loss, (gt, gw) in results[1:]:
        assert loss == pytest.approx(loss0, abs=1e-6)
        assert float((gt - gt0).abs().max()) <= 1e-6
        assert float((gw - gw0).abs()) <= 1e-6
    assert float(gt0.abs().max()) > 0 and float(gw0.abs()) > 0


def test_registry_and_objective() -> None:
    assert {"pg", "ppo_clip", "kl", "value"} <= set(POLICY_LOSSES)
    assert all(s.kind == "policy" and s.reduction == "aggregation" for s in POLICY_LOSSES.values())
    with pytest.raises(ConfigError, match="unknown loss 'ppo' — did you mean 'pg'|unknown loss 'ppo'"):
        parse_policy_objective("ppo:1")
    with pytest.raises(ConfigError, match="hyper-parameter 'aggregation' = 'mean' is not one of the choices"):
        get_policy("pg").validate({"aggregation": "mean"})
