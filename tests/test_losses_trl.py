"""preftune's losses against TRL 1.16's expressions on random inputs, each written out inline with
the file it comes from (trl/trainer/dpo_trainer.py `_compute_loss` unless noted), and the α-divergence
of fdpo against a float64 reference."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from preftune import losses
from preftune.losses.divergences import divergence_reward
from preftune.types import PreferenceBatch

G = torch.Generator().manual_seed(16)


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=G)


def pair_inputs(e: int = 16):
    """Summed log-probs (policy chosen/rejected, reference chosen/rejected), all < 0."""
    return [-(randn(e).abs() * 4 + 1) for _ in range(4)]


def test_fdpo_alpha_uses_expm1_at_tiny_alpha():
    """α = 1e-6: (1 − e^{−αρ})/α in float32 has a relative error of ~1e-3; −expm1(−αρ)/α < 1e-6."""
    rho = torch.linspace(-30, 30, 61)
    exact = -torch.expm1(-1e-6 * rho.double()) / 1e-6
    got = divergence_reward(rho, "alpha", 1e-6).double()
    rel = ((got - exact).abs() / exact.abs().clamp(min=1e-12)).max()
    assert float(rel) < 1e-6, float(rel)
    pc, pr, rc, rr = pair_inputs()
    loss = losses.pairwise("fdpo", pc, pr, rc, rr, beta=0.5, divergence="alpha", alpha=1e-6).double()
    h = (pc.double() - rc.double()) - (pr.double() - rr.double())
    gw = -torch.expm1(-1e-6 * (pc.double() - rc.double())) / 1e-6
    gl = -torch.expm1(-1e-6 * (pr.double() - rr.double())) / 1e-6
    reference = -F.logsigmoid(0.5 * (gw - gl))
    assert float(((loss - reference).abs() / reference).max()) < 1e-6
    assert float((reference - (-F.logsigmoid(0.5 * h))).abs().max()) < 1e-3  # ≈ DPO at tiny α


def test_fdpo_matches_trl_f_divergences_with_the_flipped_alpha():
    """TRL 1.16: forward_kl 1 − exp(−ρ); js_divergence log 2 + logsigmoid(ρ); alpha_divergence with
    coefficient a: (exp((a − 1)ρ) − 1)/(a − 1). TRL's a is our 1 − α."""
    pc, pr, rc, rr = pair_inputs()
    cw, cl = pc - rc, pr - rr
    beta = 0.3

    def trl(chosen_scores, rejected_scores):
        return -F.logsigmoid(beta * (chosen_scores - rejected_scores))

    def ours(**hp):
        return losses.pairwise("fdpo", pc, pr, rc, rr, beta=beta, **hp)

    torch.testing.assert_close(ours(divergence="forward_kl"), trl(1 - torch.exp(-cw), 1 - torch.exp(-cl)))
    js = (math.log(2) + F.logsigmoid(cw), math.log(2) + F.logsigmoid(cl))
    torch.testing.assert_close(ours(divergence="js"), trl(*js))
    for alpha in (0.2, 0.5, 0.9):
        a = 1.0 - alpha  # TRL's f_alpha_divergence_coef
        coef = 1.0 / (a - 1.0)
        expected = trl((torch.exp((a - 1) * cw) - 1) * coef, (torch.exp((a - 1) * cl) - 1) * coef)
        torch.testing.assert_close(ours(divergence="alpha", alpha=alpha), expected)


def test_bco_without_running_delta_is_trl_bco_pair():
    """TRL 1.16 bco_pair: −logsigmoid(β ρ_w) − logsigmoid(−β ρ_l), no running δ."""
    pc, pr, rc, rr = pair_inputs()
    beta = 0.2
    expected = -F.logsigmoid(beta * (pc - rc)) - F.logsigmoid(-beta * (pr - rr))
    got = losses.pairwise("bco", pc, pr, rc, rr, beta=beta, running_delta=False)
    torch.testing.assert_close(got, expected)
    spec = losses.get("bco")
    batch = PreferenceBatch(
        policy_logps=torch.stack([pc, pr], 1), lengths=torch.ones(16, 2), ref_logps=torch.stack([rc, rr], 1)
    )
    assert spec(batch, {}, running_delta=False).state == {}


def test_ld_dpo_matches_trl_which_desensitises_policy_and_reference():
    """TRL 1.16: logps = shared + ld_alpha·tail for the policy and (same masks) the reference."""
    e, t = 8, 7
    n = torch.randint(1, t + 1, (e, 2), generator=G)
    keep = (torch.arange(t)[None, None, :] < n[:, :, None]).float()
    pol_tok, ref_tok = -randn(e, 2, t).abs() * keep, -randn(e, 2, t).abs() * keep
    alpha, beta = 0.3, 0.5
    shared = torch.arange(t)[None, None, :] < n.min(1).values[:, None, None]
    tail = keep.bool() & ~shared

    def trl_logps(tok):
        return (tok * shared).sum(-1) + alpha * (tok * tail).sum(-1)

    rho = trl_logps(pol_tok) - trl_logps(ref_tok)
    expected = -F.logsigmoid(beta * (rho[:, 0] - rho[:, 1]))
    batch = PreferenceBatch(
        policy_logps=pol_tok.sum(-1),
        lengths=n,
        ref_logps=ref_tok.sum(-1),
        policy_token_logps=pol_tok,
        ref_token_logps=ref_tok,
    )
    torch.testing.assert_close(losses.get("ld_dpo")(batch, beta=beta, alpha=alpha).losses, expected)


def test_trl_sigmoid_plus_sft_is_the_dpo_sft_objective():
    """TRL 1.16 loss_type ["sigmoid", "sft"], loss_weights [1, λ]: mean(−logsigmoid(βh)) + λ·(−mean of
    the chosen per-token logps over the batch) — preftune's `dpo:1,sft:λ` (global token count),
    not rpo's token_mean form (a mean of per-example means)."""
    e, t, lam, beta = 6, 9, 0.7, 0.1
    n = torch.randint(1, t + 1, (e, 2), generator=G)
    keep = (torch.arange(t)[None, None, :] < n[:, :, None]).float()
    tok = -randn(e, 2, t).abs() * keep
    ref = -randn(e, 2).abs() * 5
    pol = tok.sum(-1)
    h = (pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1])
    trl = (-F.logsigmoid(beta * h)).mean() + lam * -tok[:, 0][keep[:, 0].bool()].mean()
    batch = PreferenceBatch(policy_logps=pol, lengths=n, ref_logps=ref)
    terms = losses.parse_objective(f"dpo:1,sft:{lam}")
    total = terms[0][0](batch).losses.sum() / e * terms[0][1]
    total = total + terms[1][1] * terms[1][0](batch).losses.sum() / losses.sft_token_count(batch)
    torch.testing.assert_close(total, trl)
    rpo = losses.get("rpo")(batch, beta=beta, sft_weight=lam, sft_form="token_mean").losses.mean()
    assert not torch.allclose(rpo, trl)
