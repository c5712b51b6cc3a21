"""Every loss against numbers derived by hand (derivation in each docstring), and the invariants
of docs/algorithms.md §6. Notation: ρ = logp_θ − logp_ref, h = ρ_w − ρ_l, sp(x) = log(1 + eˣ), so
−log σ(z) = sp(−z)."""

from __future__ import annotations

import math

import pytest
import torch

from preftune import losses
from preftune.errors import ConfigError
from preftune.types import PreferenceBatch

T = torch.tensor
LOG2 = math.log(2.0)


def pair(name, rho_w, rho_l, *, ref=-5.0, lengths=(4, 2), **hp):
    """Loss of single pairs with the given log-ratios (policy = ref + ρ)."""
    rw, rl = T(rho_w, dtype=torch.float32).reshape(-1), T(rho_l, dtype=torch.float32).reshape(-1)
    e = rw.shape[0]
    refs = torch.full((e,), ref)
    n_w, n_l = torch.full((e,), lengths[0]), torch.full((e,), lengths[1])
    return losses.pairwise(
        name, refs + rw, refs + rl, refs, refs, chosen_lengths=n_w, rejected_lengths=n_l, **hp
    )


def approx(x):
    return pytest.approx(x, rel=1e-5, abs=1e-6)


def test_dpo():
    """β = 0.5, ρ_w = 1, ρ_l = −1: βh = 1, −log σ(1) = sp(−1) = 0.3132617."""
    assert pair("dpo", 1.0, -1.0, beta=0.5).item() == approx(0.3132617)


def test_cdpo():
    """ε = 0.25, βh = 1: 0.75·sp(−1) + 0.25·sp(1) = 0.75·0.3132617 + 0.25·1.3132617 = 0.5632617."""
    assert pair("cdpo", 1.0, -1.0, beta=0.5, epsilon=0.25).item() == approx(0.5632617)


def test_rdpo_value_and_unbiasedness():
    """ε = 0.25, βh = 1: (0.75·sp(−1) − 0.25·sp(1)) / 0.5 = (0.2349463 − 0.3283154)/0.5 = −0.1867383.
    Unbiased: (1−ε)·ℓ(h) + ε·ℓ(−h) (label flipped with prob. ε) = −log σ(βh) for any h."""
    assert pair("rdpo", 1.0, -1.0, beta=0.5, epsilon=0.25).item() == approx(-0.1867383)
    h = torch.linspace(-3, 3, 7)
    flipped = pair("rdpo", (-h).tolist(), [0.0] * 7, beta=0.5, epsilon=0.25)
    clean = pair("rdpo", h.tolist(), [0.0] * 7, beta=0.5, epsilon=0.25)
    torch.testing.assert_close(0.75 * clean + 0.25 * flipped, pair("dpo", h.tolist(), [0.0] * 7, beta=0.5))


def test_smooth_dpo_uses_the_soft_label():
    """p = 0.75 is cdpo with ε = 0.25 (0.5632617); p = 1 is dpo; a missing label is an error."""
    kw = dict(beta=0.5, label=T([0.75, 1.0]))
    out = pair("smooth_dpo", [1.0, 1.0], [-1.0, -1.0], **kw)
    torch.testing.assert_close(out, T([0.5632617, 0.3132617]))
    with pytest.raises(ConfigError, match="soft label"):
        pair("smooth_dpo", 1.0, -1.0)


def test_ipo_token_mean_and_summed():
    """β = 0.5 ⇒ target 1/(2β) = 1. ρ_w = 2 over 4 tokens, ρ_l = −1 over 2: token mean h̄ = 0.5 + 0.5 = 1
    ⇒ (1 − 1)² = 0; summed h = 3 ⇒ (3 − 1)² = 4."""
    assert pair("ipo", 2.0, -1.0, beta=0.5).item() == approx(0.0)
    assert pair("ipo", 2.0, -1.0, beta=0.5, token_mean=False).item() == approx(4.0)


def test_hinge():
    """β = 0.25: h = 2 ⇒ max(0, 1 − 0.5) = 0.5; h = 6 ⇒ 0; h = −2 ⇒ 1.5."""
    torch.testing.assert_close(
        pair("hinge", [1.0, 3.0, -1.0], [-1.0, -3.0, 1.0], beta=0.25), T([0.5, 0.0, 1.5])
    )


def test_dpo_norm():
    """β = 5, ρ_w = 2 over 4 tokens (0.5), ρ_l = −1 over 2 (−0.5): sp(−5) = 0.006715348."""
    assert pair("dpo_norm", 2.0, -1.0, beta=5.0).item() == approx(0.006715348)


def test_simpo():
    """β = 2, γ = 1, logp_w = −4 over 4 tokens (−1), logp_l = −6 over 3 (−2): 2·(−1 + 2) − 1 = 1 ⇒ sp(−1)."""
    out = losses.pairwise(
        "simpo", T([-4.0]), T([-6.0]), chosen_lengths=T([4]), rejected_lengths=T([3]), beta=2.0, gamma=1.0
    )
    assert out.item() == approx(0.3132617)


def test_orpo():
    """|y| = 2, logp_w = 2 log 0.5 (ℓ_w = log 0.5, odds 1, log odds 0), logp_l = 2 log 0.2 (odds 0.25,
    log odds −log 4): NLL term −ℓ_w = log 2; OR term sp(−log 4) = log 1.25. λ = 0.1:
    0.6931472 + 0.1·0.2231436 = 0.7154615."""
    out = losses.pairwise(
        "orpo",
        T([2 * math.log(0.5)]),
        T([2 * math.log(0.2)]),
        chosen_lengths=T([2]),
        rejected_lengths=T([2]),
        odds_ratio_weight=0.1,
    )
    assert out.item() == approx(0.7154615)


def test_fdpo_divergences():
    """β = 1. forward KL: ρ_w = 0 (g = −1), ρ_l = log 2 (g = −½): sp(½) = 0.9740770.
    JS: g(0) = log ½ + log 2 = 0, g(log 2) = log ⅔ + log 2 = log 4/3: sp(log 4/3) = log 7/3 = 0.8472979.
    α = ½: g(ρ) = 2(1 − e^{−ρ/2}); ρ_w = 2 log 2 (g = 1), ρ_l = 0 (g = 0): sp(−1) = 0.3132617."""
    assert pair("fdpo", 0.0, LOG2, beta=1.0, divergence="forward_kl").item() == approx(0.9740770)
    assert pair("fdpo", 0.0, LOG2, beta=1.0, divergence="js").item() == approx(0.8472979)
    assert pair("fdpo", 2 * LOG2, 0.0, beta=1.0, divergence="alpha", alpha=0.5).item() == approx(0.3132617)


def test_fdpo_alpha_limits_and_reverse_kl_is_dpo():
    """Reverse KL is DPO exactly; α → 0 tends to reverse KL (our α convention; TRL's a = 1 − α)."""
    rw, rl = [0.3, -1.2, 2.0], [0.1, 0.5, -1.0]
    torch.testing.assert_close(pair("fdpo", rw, rl, beta=0.7), pair("dpo", rw, rl, beta=0.7))
    torch.testing.assert_close(
        pair("fdpo", rw, rl, beta=0.7, divergence="alpha", alpha=1e-4),
        pair("dpo", rw, rl, beta=0.7),
        rtol=1e-3,
        atol=1e-3,
    )


def ld_batch(alpha_tokens):
    """Chosen tokens policy [−1, −2, −3] ref [−1, −1, −1]; rejected policy [−1, −1] ref [−2, −2]."""
    pc, pr = T([[-1.0, -2.0, -3.0]]), T([[-1.0, -1.0]])
    rc, rr = T([[-1.0, -1.0, -1.0]]), T([[-2.0, -2.0]])
    return dict(
        policy_chosen_logps=pc.sum(-1),
        policy_rejected_logps=pr.sum(-1),
        ref_chosen_logps=rc.sum(-1),
        ref_rejected_logps=rr.sum(-1),
        chosen_lengths=T([3]),
        rejected_lengths=T([2]),
        policy_chosen_token_logps=pc,
        policy_rejected_token_logps=pr,
        ref_chosen_token_logps=rc,
        ref_rejected_token_logps=rr,
    )


def test_ld_dpo():
    """k = min(3, 2) = 2, α = ½: policy_w = (−1 −2) + ½(−3) = −4.5, ref_w = −2 + ½(−1) = −2.5 ⇒ ρ_w = −2;
    rejected fits in k: ρ_l = −2 + 4 = 2. β = ½: ½(−2 − 2) = −2 ⇒ sp(2) = 2.1269280.
    α = 1 is DPO on the full sums: ρ_w = −6 + 3 = −3, ρ_l = 2 (with either reference handling)."""
    kw = ld_batch(None)
    assert losses.pairwise("ld_dpo", **kw, beta=0.5, alpha=0.5).item() == approx(2.1269280)
    # policy only (older TRL releases): ρ_w = −4.5 + 3 = −1.5, ρ_l = 2 ⇒ sp(1.75) = 1.9102242.
    trl = losses.pairwise("ld_dpo", **kw, beta=0.5, alpha=0.5, desensitise_reference=False)
    assert trl.item() == approx(1.9102242)
    dpo = losses.pairwise(
        "dpo",
        kw["policy_chosen_logps"],
        kw["policy_rejected_logps"],
        kw["ref_chosen_logps"],
        kw["ref_rejected_logps"],
        beta=0.5,
    )
    torch.testing.assert_close(losses.pairwise("ld_dpo", **kw, beta=0.5, alpha=1.0), dpo)
    torch.testing.assert_close(
        losses.pairwise("ld_dpo", **kw, beta=0.5, alpha=1.0, desensitise_reference=False), dpo
    )


def test_rpo_paper_and_token_mean_forms():
    """ρ_w = 1, ρ_l = −1, β = ½, logp_θ(y_w) = −3 over 4 tokens, η = 2. Paper (Eq. 4.8): sp(−1) + η·β·3
    = 3.3132617.
    token_mean: sp(−1) + 2·3/4 = 1.8132617."""
    args = (T([-3.0]), T([-6.0]), T([-4.0]), T([-5.0]))
    kw = dict(chosen_lengths=T([4]), rejected_lengths=T([2]), beta=0.5, sft_weight=2.0)
    assert losses.pairwise("rpo", *args, **kw).item() == approx(3.3132617)
    assert losses.pairwise("rpo", *args, **kw, sft_form="token_mean").item() == approx(1.8132617)


def test_rpo_default_is_the_papers_eta():
    """Liu et al. Eq. 4.8 with the paper's η = 0.005 (§6): at β = ½ the SFT term adds
    0.005·½·3 = 0.0075 to sp(−1) = 0.3132617 ⇒ 0.3207617."""
    args = (T([-3.0]), T([-6.0]), T([-4.0]), T([-5.0]))
    out = losses.pairwise("rpo", *args, chosen_lengths=T([4]), rejected_lengths=T([2]), beta=0.5)
    assert out.item() == approx(0.3207617)
    assert losses.get("rpo").hparams["sft_weight"].default == 0.005


def test_modpo():
    """β = ½, w = (½, ½), margins m(y_w) = 1, m(y_l) = 3, h = 2: (β/w₀)h − (w₁/w₀)(1 − 3) = 2 + 2 = 4
    ⇒ sp(−4) = 0.01814993. Without margins and w = (1,) it is DPO."""
    margins = T([[[1.0], [3.0]]])
    assert pair("modpo", 1.0, -1.0, beta=0.5, weights=(0.5, 0.5), margins=margins).item() == approx(
        0.01814993
    )
    assert pair("modpo", 1.0, -1.0, beta=0.5).item() == approx(0.3132617)
    with pytest.raises(ConfigError, match="1 \\+ M = 2"):
        pair("modpo", 1.0, -1.0, weights=(1.0,), margins=margins)


def test_bco_running_delta_is_state():
    """β = ½. Batch 1: rewards βρ: (0.5, −0.5) and (1.0, 0.0); running mean δ = 1/4 = 0.25 (count 4).
    Both pairs: sp(−(0.5 − 0.25)) + sp(−0.75)... = sp(−0.25) + sp(−0.75) = 0.9628104.
    Batch 2 with that state, all ρ = 0 (2 pairs): δ = (0.25·4 + 0)/8 = 0.125 ⇒ sp(0.125) + sp(−0.125) = 1.3901981.
    With momentum 0.2 instead: δ = 0.8·0.25 = 0.2 ⇒ sp(0.2) + sp(−0.2) = 1.3962777."""
    spec = losses.get("bco")
    ref = torch.full((2, 2), -5.0)
    b1 = PreferenceBatch(
        policy_logps=ref + T([[1.0, -1.0], [2.0, 0.0]]), lengths=torch.ones(2, 2), ref_logps=ref
    )
    out1 = spec(b1, {}, beta=0.5)
    torch.testing.assert_close(out1.losses, T([0.9628104, 0.9628104]))
    assert out1.state["delta"].item() == approx(0.25) and out1.state["count"].item() == 4
    b2 = PreferenceBatch(policy_logps=ref.clone(), lengths=torch.ones(2, 2), ref_logps=ref)
    out2 = spec(b2, out1.state, beta=0.5)
    torch.testing.assert_close(out2.losses, T([1.3901981, 1.3901981]))
    out3 = spec(b2, out1.state, beta=0.5, delta_momentum=0.2)
    torch.testing.assert_close(out3.losses, T([1.3962777, 1.3962777]))


def test_bco_unpaired():
    """β = ½, ρ = (2, −2), labels (1, 0): rewards (1, −1), δ = 0 ⇒ sp(−1) for both = 0.3132617."""
    out = losses.unpaired("bco_unpaired", T([-3.0, -7.0]), T([-5.0, -5.0]), labels=T([1.0, 0.0]), beta=0.5)
    torch.testing.assert_close(out, T([0.3132617, 0.3132617]))


def test_kto_reference_point_and_weights():
    """ρ(y) = 1 for both; mismatched ρ(y′) = (0.5, 1.5) ⇒ z₀ = max(0, 1) = 1. β = 1: desirable
    λ_D(1 − σ(0)) = 0.5; undesirable with λ_U = 2: 2(1 − σ(0)) = 1.0. With ρ(y′) = −1, z₀ = 0:
    desirable 1 − σ(1) = 0.2689414. z₀ is detached: no gradient reaches the mismatched branch."""
    pm = T([-4.5, -3.5], requires_grad=True)
    py = T([-4.0, -4.0], requires_grad=True)
    out = losses.unpaired(
        "kto",
        py,
        T([-5.0, -5.0]),
        labels=T([1.0, 0.0]),
        mismatched_policy_logps=pm,
        mismatched_ref_logps=T([-5.0, -5.0]),
        beta=1.0,
        undesirable_weight=2.0,
    )
    torch.testing.assert_close(out, T([0.5, 1.0]))
    (grad_y, grad_mismatched) = torch.autograd.grad(out.sum(), [py, pm], allow_unused=True)
    assert grad_y is not None and bool((grad_y != 0).all())
    assert grad_mismatched is None or bool((grad_mismatched == 0).all())
    out2 = losses.unpaired(
        "kto",
        T([-4.0]),
        T([-5.0]),
        labels=T([1.0]),
        mismatched_policy_logps=T([-6.0]),
        mismatched_ref_logps=T([-5.0]),
        beta=1.0,
    )
    assert out2.item() == approx(0.2689414)


def test_kto_needs_the_mismatched_branch():
    with pytest.raises(ConfigError, match="different prompt"):
        losses.unpaired("kto", T([-4.0]), T([-5.0]), labels=T([1.0]))


def test_d2o():
    """Samples ρ = (1, 3) (mean 2), negative ρ = −1 (last branch). β = ½, α = 1: ½·2 + 1 = 2 ⇒ sp(−2)
    = 0.1269280. K = 1 with α = β is DPO with the sample as chosen."""
    ref = torch.full((1, 3), -5.0)
    out = losses.listwise("d2o", ref + T([[1.0, 3.0, -1.0]]), ref, beta=0.5, alpha=1.0)
    assert out.item() == approx(0.1269280)
    out1 = losses.listwise("d2o", ref[:, :2] + T([[1.0, -1.0]]), ref[:, :2], beta=0.5, alpha=0.5)
    assert out1.item() == approx(0.3132617)


def test_listwise_plackett_luce():
    """β = 1, rewards (2, 1, 0), best first: −[2 − log(e² + e + 1)] − [1 − log(e + 1)] − 0
    = log(1 + e⁻¹ + e⁻²) + sp(−1) = 0.4076059 + 0.3132617 = 0.7208677. K = 2 is DPO. A masked middle
    branch drops out: (2, ·, 1, 0) with branch 1 absent equals the (2, 1, 0) list."""
    ref = torch.full((1, 3), -5.0)
    assert losses.listwise("listwise_pl", ref + T([[2.0, 1.0, 0.0]]), ref, beta=1.0).item() == approx(
        0.7208677
    )
    assert losses.listwise(
        "listwise_pl", ref[:, :2] + T([[1.0, -1.0]]), ref[:, :2], beta=0.5
    ).item() == approx(0.3132617)
    ref4 = torch.full((1, 4), -5.0)
    ragged = losses.listwise(
        "listwise_pl", ref4 + T([[2.0, 99.0, 1.0, 0.0]]), ref4, mask=T([[True, False, True, True]]), beta=1.0
    )
    assert ragged.item() == approx(0.7208677)


def test_tpo_lambda_weights():
    """K = 2, summed rewards (token_mean false), β = 1, r = (1, 0) so ranks (1, 2): ΔD = 1/log₂2 − 1/log₂3
    = 0.3690702. Order labels ψ = (1, 0): G = (1, 0), λ = 0.3690702 ⇒ 0.3690702·sp(−1) = 0.1156156.
    Scores (3, 1): G = (7, 1), λ = 6·0.3690702 ⇒ 0.6936934."""
    ref = torch.full((1, 2), -5.0)
    pol = ref + T([[1.0, 0.0]])
    kw = dict(beta=1.0, token_mean=False)
    assert losses.listwise("tpo", pol, ref, **kw).item() == approx(0.1156156)
    assert losses.listwise("tpo", pol, ref, scores=T([[3.0, 1.0]]), **kw).item() == approx(0.6936934)


# ---- docs/algorithms.md §6 invariants -------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_equal_policy_and_reference_values(beta):
    """π_θ = π_ref (ρ = 0): dpo, cdpo, rdpo = log 2; ipo = 1/(4β²); hinge = 1; bco (δ = 0) = 2 log 2."""
    z = [0.0, 0.0]
    for name, hp in [("dpo", {}), ("cdpo", {"epsilon": 0.3}), ("rdpo", {"epsilon": 0.3})]:
        torch.testing.assert_close(pair(name, z, z, beta=beta, **hp), torch.full((2,), LOG2))
    for token_mean in (True, False):
        torch.testing.assert_close(
            pair("ipo", z, z, beta=beta, token_mean=token_mean), torch.full((2,), 1 / (4 * beta**2))
        )
    torch.testing.assert_close(pair("hinge", z, z, beta=beta), torch.ones(2))
    torch.testing.assert_close(pair("bco", z, z, beta=beta), torch.full((2,), 2 * LOG2))


def test_limits_equal_dpo():
    """cdpo(ε=0) = rdpo(ε=0) = fdpo(reverse KL) = ld_dpo(α=1) = smooth_dpo(p=1) = dpo on random pairs."""
    g = torch.Generator().manual_seed(0)
    rw, rl = (torch.randn(16, generator=g) * 3).tolist(), (torch.randn(16, generator=g) * 3).tolist()
    ref = pair("dpo", rw, rl, beta=0.3)
    torch.testing.assert_close(pair("cdpo", rw, rl, beta=0.3, epsilon=0.0), ref)
    torch.testing.assert_close(pair("rdpo", rw, rl, beta=0.3, epsilon=0.0), ref)
    torch.testing.assert_close(pair("fdpo", rw, rl, beta=0.3, divergence="reverse_kl"), ref)
    torch.testing.assert_close(pair("smooth_dpo", rw, rl, beta=0.3, label=torch.ones(16)), ref)
    tok = torch.randn(16, 2, 5, generator=g) - 1
    refs = torch.full((16, 2), -5.0)
    pol = refs + T([rw, rl]).T
    batch = PreferenceBatch(
        policy_logps=pol,
        lengths=torch.full((16, 2), 5),
        ref_logps=refs,
        policy_token_logps=tok,
        ref_token_logps=tok - 0.5,
    )
    torch.testing.assert_close(losses.get("ld_dpo")(batch, beta=0.3, alpha=1.0).losses, ref)


def test_micro_batches_sum_to_the_full_batch():
    """Σ losses over 4 micro-batches of 2 = Σ over the batch of 8 (example losses), and the sft term's
    Σ losses / Σ tokens is the same however the batch is split (global token normalisation)."""
    g = torch.Generator().manual_seed(1)
    pol, ref = torch.randn(8, 2, generator=g) - 5, torch.randn(8, 2, generator=g) - 5
    n = torch.randint(1, 9, (8, 2), generator=g)
    full = PreferenceBatch(policy_logps=pol, lengths=n, ref_logps=ref)
    parts = [
        PreferenceBatch(policy_logps=pol[i : i + 2], lengths=n[i : i + 2], ref_logps=ref[i : i + 2])
        for i in range(0, 8, 2)
    ]
    for name in ("dpo", "ipo", "simpo", "orpo", "rpo", "sft"):
        spec = losses.get(name)
        whole = spec(full).losses.sum()
        split = sum(spec(p).losses.sum() for p in parts)
        torch.testing.assert_close(split, whole)
    tokens = sum(losses.sft_token_count(p) for p in parts)
    assert tokens == losses.sft_token_count(full) == n[:, 0].sum()


def test_kto_uses_a_given_global_reference_point():
    """state["z0"] = 1 overrides the batch estimate (which would be 0 here): desirable ρ = 1, β = 1
    ⇒ 1 − σ(0) = 0.5 instead of 1 − σ(1) = 0.2689414."""
    ref = torch.full((1, 2), -5.0)
    batch = PreferenceBatch(
        policy_logps=ref + T([[1.0, -1.0]]), lengths=torch.ones(1, 2), ref_logps=ref, labels=T([1.0])
    )
    spec = losses.get("kto")
    assert spec(batch, beta=1.0).losses.item() == approx(0.2689414)
    assert spec(batch, {"z0": T(1.0)}, beta=1.0).losses.item() == approx(0.5)
