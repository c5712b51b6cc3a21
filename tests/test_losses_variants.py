"""The DPO variants of TRL's loss_type list, CPO, AlphaPO and WPO weighting: hand-derived values
(derivation in each docstring), limiting cases, and TRL 1.16's expressions written out inline on
random inputs (trl/trainer/dpo_trainer.py `_compute_loss`; trl/experimental/cpo/cpo_trainer.py
`cpo_loss` and `concatenated_forward`). sp(x) = log(1 + eˣ), so −log σ(z) = sp(−z)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from preftune import losses
from preftune.types import PreferenceBatch
from test_losses_values import approx, pair

T = torch.tensor
LOG2, LOG3 = math.log(2.0), math.log(3.0)
G = torch.Generator().manual_seed(7)


def inputs(e: int = 12):
    """Random summed log-probs: policy chosen/rejected, reference chosen/rejected (all < 0)."""
    return [-(torch.rand(e, generator=G) * 6 + 0.5) for _ in range(4)]


def test_exo_pair_values_and_limit():
    """β = 1, ε = ¼. h = 0: q = (½, ½): ½(log ½ − log ¾) + ½(log ½ − log ¼) = −log 2 − ½ log(3/16)
    = 0.1438410. h = log 3: q = (¾, ¼) = p ⇒ KL = 0 (the minimum). ε = 0.1, h = log 3:
    ¾(log ¾ − log 0.9) + ¼(log ¼ − log 0.1) = 0.0923315."""
    assert pair("exo_pair", 0.0, 0.0, beta=1.0, epsilon=0.25).item() == approx(0.1438410)
    assert pair("exo_pair", LOG3, 0.0, beta=1.0, epsilon=0.25).item() == approx(0.0)
    assert pair("exo_pair", LOG3, 0.0, beta=1.0, epsilon=0.1).item() == approx(0.0923315)


def test_nca_pair_values():
    """β = 1. ρ = 0: log 2 + ½ log 2 + ½ log 2 = 2 log 2. ρ_w = log 3 (σ = ¾), ρ_l = 0:
    −log ¾ − ½ log ¼ − ½ log ½ = 1.3274028."""
    assert pair("nca_pair", 0.0, 0.0, beta=1.0).item() == approx(2 * LOG2)
    assert pair("nca_pair", LOG3, 0.0, beta=1.0).item() == approx(1.3274028)


def test_sppo_hard_values():
    """β = ½ ⇒ targets ±1: ρ_w = 2, ρ_l = −3: (2 − 1)² + (−3 + 1)² = 5; at π_θ = π_ref 1/(2β²) = 2;
    at the targets 0."""
    assert pair("sppo_hard", 2.0, -3.0, beta=0.5).item() == approx(5.0)
    assert pair("sppo_hard", 0.0, 0.0, beta=0.5).item() == approx(2.0)
    assert pair("sppo_hard", 1.0, -1.0, beta=0.5).item() == approx(0.0)


def test_apo_values():
    """β = 1. apo_zero: ρ_w = log 3, ρ_l = −log 3: (1 − ¾) + ¼ = ½. apo_down: ρ_w = 0,
    ρ_l = −log 3: σ(0) + 1 − σ(log 3) = ½ + ¼ = ¾. Both 1 at π_θ = π_ref."""
    assert pair("apo_zero", LOG3, -LOG3, beta=1.0).item() == approx(0.5)
    assert pair("apo_down", 0.0, -LOG3, beta=1.0).item() == approx(0.75)
    assert pair("apo_zero", 0.0, 0.0).item() == approx(1.0)
    assert pair("apo_down", 0.0, 0.0).item() == approx(1.0)


def test_discopop_values_and_limits():
    """β = τ = 1. h = 0: m = ½: ½ log 2 + ½ = 0.8465736. h = log 3: m = ¾:
    ¼ log(4/3) + ¾·⅓ = 0.3219205. τ → 0: m is a step, the logistic loss below 0, e^{−βh} above."""
    assert pair("discopop", 0.0, 0.0, beta=1.0, tau=1.0).item() == approx(0.8465736)
    assert pair("discopop", LOG3, 0.0, beta=1.0, tau=1.0).item() == approx(0.3219205)
    h = torch.tensor([-2.0, -0.5, 0.5, 2.0])
    small = pair("discopop", h.tolist(), [0.0] * 4, beta=1.0, tau=1e-3)
    torch.testing.assert_close(small, torch.where(h < 0, -F.logsigmoid(h), torch.exp(-h)))


def test_aot_sorts_margins_over_the_batch():
    """β = 1, two pairs. aot: policy margins u = (2, −1), reference margins v = (0, 1): sorted
    Δ = (−1 − 0, 2 − 1) = (−1, 1) ⇒ (sp(1), sp(−1)) = (1.3132617, 0.3132617) — DPO would pair
    u − v = (2, −2). aot_unpaired: ρ_w = (1, −2), ρ_l = (0, −1): sorted (−2, 1) − (−1, 0) = (−1, 1),
    the same values."""
    ref = T([-5.0, -5.0])
    pc, pr = T([-3.0, -6.0]), T([-5.0, -5.0])  # u = (2, −1)
    rc, rr = T([-5.0, -4.0]), T([-5.0, -5.0])  # v = (0, 1)
    torch.testing.assert_close(losses.pairwise("aot", pc, pr, rc, rr, beta=1.0), T([1.3132617, 0.3132617]))
    out = losses.pairwise("aot_unpaired", ref + T([1.0, -2.0]), ref + T([0.0, -1.0]), ref, ref, beta=1.0)
    torch.testing.assert_close(out, T([1.3132617, 0.3132617]))
    assert losses.get("aot").coupled and losses.get("aot_unpaired").coupled


def test_cpo_value():
    """β = ½, logp_θ(y_w) = −4 over 4 tokens, logp_θ(y_l) = −6, cpo_alpha = 2:
    sp(−½·2) + 2·(4/4) = 0.3132617 + 2 = 2.3132617; no reference needed."""
    out = losses.pairwise(
        "cpo", T([-4.0]), T([-6.0]), chosen_lengths=T([4]), rejected_lengths=T([3]), beta=0.5, cpo_alpha=2.0
    )
    assert out.item() == approx(2.3132617)
    assert not losses.get("cpo").needs_reference


def test_alphapo_value_and_simpo_limit():
    """α = ½, β = 1, γ = 1: ℓ_w = −2 log 2 ⇒ e^{−αℓ} = 2, r_w = (1 − 2)/½ = −2; ℓ_l = −2 log 3 ⇒
    r_l = −4: sp(−(−2 + 4 − 1)) = sp(−1) = 0.3132617. α → 0 (and α = 0) is SimPO."""
    kw = dict(chosen_lengths=T([2]), rejected_lengths=T([2]))
    out = losses.pairwise("alphapo", T([-4 * LOG2]), T([-4 * LOG3]), **kw, beta=1.0, gamma=1.0, alpha=0.5)
    assert out.item() == approx(0.3132617)
    pc, pr, _, _ = inputs()
    n = dict(chosen_lengths=torch.full((12,), 5), rejected_lengths=torch.full((12,), 3))
    simpo = losses.pairwise("simpo", pc, pr, **n, beta=2.0, gamma=1.0)
    torch.testing.assert_close(losses.pairwise("alphapo", pc, pr, **n, alpha=0.0), simpo)
    torch.testing.assert_close(
        losses.pairwise("alphapo", pc, pr, **n, alpha=1e-6), simpo, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_variants_match_trl_expressions(beta):
    """TRL 1.16 dpo_trainer.py `_compute_loss`, with chosen_logratios = ρ_w, rejected_logratios = ρ_l,
    delta_score = h, label_smoothing = ε."""
    pc, pr, rc, rr = inputs()
    cw, cl = pc - rc, pr - rr
    d = cw - cl
    eps = 0.2

    def ours(name, **hp):
        return losses.pairwise(name, pc, pr, rc, rr, beta=beta, **hp)

    qw, ql = torch.sigmoid(beta * d), torch.sigmoid(-beta * d)
    exo = qw * (F.logsigmoid(beta * d) - torch.log1p(-T(eps))) + ql * (
        F.logsigmoid(-beta * d) - torch.log(T(eps))
    )
    torch.testing.assert_close(ours("exo_pair", epsilon=eps), exo)
    nca = -F.logsigmoid(beta * cw) - 0.5 * F.logsigmoid(-beta * cw) - 0.5 * F.logsigmoid(-beta * cl)
    torch.testing.assert_close(ours("nca_pair"), nca)
    torch.testing.assert_close(ours("sppo_hard"), (cw - 0.5 / beta) ** 2 + (cl + 0.5 / beta) ** 2)
    apo_zero = 1 - torch.sigmoid(beta * cw) + torch.sigmoid(beta * cl)
    torch.testing.assert_close(ours("apo_zero"), apo_zero)
    apo_down = torch.sigmoid(beta * cw) + 1 - torch.sigmoid(beta * (cw - cl))
    torch.testing.assert_close(ours("apo_down"), apo_down)
    logits = d * beta
    mod = torch.sigmoid(logits / 0.05)
    discopop = -F.logsigmoid(logits) * (1 - mod) + torch.exp(-logits) * mod
    torch.testing.assert_close(ours("discopop", tau=0.05), discopop)
    delta = torch.sort(pc - pr, dim=0).values - torch.sort(rc - rr, dim=0).values
    aot = -F.logsigmoid(beta * delta) * (1 - eps) - F.logsigmoid(-beta * delta) * eps
    torch.testing.assert_close(ours("aot", epsilon=eps), aot)
    delta = torch.sort(cw, dim=0).values - torch.sort(cl, dim=0).values
    aot_u = -F.logsigmoid(beta * delta) * (1 - eps) - F.logsigmoid(-beta * delta) * eps
    torch.testing.assert_close(ours("aot_unpaired", epsilon=eps), aot_u)


def test_cpo_and_alphapo_match_trl_cpo_trainer():
    """TRL 1.16 experimental/cpo/cpo_trainer.py. sigmoid: −logsigmoid(β(logp_w − logp_l)) (summed
    logps), loss = losses.mean() + cpo_alpha·nll, nll the cross-entropy over all chosen response
    tokens of the batch — our `cpo:1,sft:A` with cpo_alpha = 0. alphapo: loss_type simpo with
    average_log_prob, rewards (1 − p^(−α))/α with p = exp(mean logp), logits = r_w − r_l − γ/β."""
    e, t, beta, a = 6, 8, 0.1, 1.5
    n = torch.randint(1, t + 1, (e, 2), generator=G)
    keep = torch.arange(t)[None, None, :] < n[:, :, None]
    tok = -torch.rand(e, 2, t, generator=G) * 3 * keep
    logp = tok.sum(-1)
    trl = (-F.logsigmoid(beta * (logp[:, 0] - logp[:, 1]))).mean() + a * -tok[:, 0][keep[:, 0]].mean()
    batch = PreferenceBatch(policy_logps=logp, lengths=n)
    (cpo, _), (sft, w) = losses.parse_objective(f"cpo:1,sft:{a}")
    ours = cpo(batch, cpo_alpha=0.0).losses.sum() / e + w * sft(batch).losses.sum() / losses.sft_token_count(
        batch
    )
    torch.testing.assert_close(ours, trl)
    alpha, gamma, beta = 0.3, 0.5, 2.0
    avg = logp / n
    rewards = (1 - torch.exp(avg).pow(-alpha)) / alpha
    trl_alpha = -F.logsigmoid(beta * (rewards[:, 0] - rewards[:, 1] - gamma / beta))
    got = losses.get("alphapo")(batch, alpha=alpha, gamma=gamma, beta=beta).losses
    torch.testing.assert_close(got, trl_alpha)


@pytest.mark.parametrize("name", ["dpo", "ipo", "simpo", "apo_zero", "aot", "cpo"])
def test_wpo_weighting_is_an_option_of_any_pairwise_loss(name):
    """WPO (Zhou et al. 2024): loss × exp(ℓ_w)·exp(ℓ_l), ℓ = logp_θ/|y|, the weight detached — TRL 1.16's
    `use_weighting` expression (per_sequence_loss *= chosen_weights * rejected_weights) without its
    alignment term. dpo, β = ½, ρ_w = 1, ρ_l = −1, ℓ_w = −1, ℓ_l = −2: sp(−1)·e^{−3} = 0.0155964."""
    pc, pr, rc, rr = inputs()
    pc.requires_grad_(True)
    n = dict(chosen_lengths=torch.full((12,), 4), rejected_lengths=torch.full((12,), 2))
    plain = losses.pairwise(name, pc, pr, rc, rr, **n)
    weighted = losses.pairwise(name, pc, pr, rc, rr, **n, wpo_weighting=True)
    w = torch.exp(pc.detach() / 4) * torch.exp(pr / 2)
    torch.testing.assert_close(weighted, plain * w)
    (g_plain,) = torch.autograd.grad(plain.sum(), pc)
    (g_weighted,) = torch.autograd.grad(weighted.sum(), pc)
    if not losses.get(name).coupled:  # aot: term i (a sorted position) is weighted by pair i, as in TRL
        torch.testing.assert_close(g_weighted, g_plain * w)  # no gradient through the weight
    out = losses.pairwise(
        "dpo",
        T([-4.0]),
        T([-4.0]),
        T([-5.0]),
        T([-3.0]),
        **{k: v[:1] for k, v in n.items()},
        beta=0.5,
        wpo_weighting=True,
    )
    assert out.item() == approx(0.0155964)
