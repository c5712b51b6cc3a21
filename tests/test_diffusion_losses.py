"""Offline diffusion losses against the official code's expressions, on random statistics.

Each `official_*` function below is the loss expression of the method's official training code,
written out here (not imported): Diffusion-DPO (Wallace et al. 2023) and its diffusers research
script, Diffusion-KTO (Li et al. 2024), MaPO (Hong et al. 2024), SmPO's smoothed label (Lu et al.
2025). The seam's statistic is logp = −½·mse, so mse = −2·logp.

Float32 note: at β = 5000 one float32 rounding of an mse (~1e-7) moves the Diffusion-DPO logit by
~3e-4, and the official code groups its subtractions differently from ρ_w − ρ_l. The ≤ 1e-6
comparisons therefore use statistics on a dyadic grid (k·2⁻¹⁶, where every subtraction is exact in
float32) — they check the algebra (the ½, β's units, signs, mean vs sum) exactly — or compare with the
official expression evaluated in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from preftune import losses
from preftune.diffusion import DenoisingStats, pair_batch, unpaired_batch
from preftune.losses.diffusion_losses import mapo_f, smpo_label

E = 64


def dyadic(n: int, seed: int, low: float = 0.25, high: float = 1.75) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = low + (high - low) * torch.rand(n, generator=g)
    return torch.round(x * 2**16) / 2**16


def pair_stats(seed: int = 0, spread: float = 1e-3) -> tuple[torch.Tensor, ...]:
    """(model_w, model_l, ref_w, ref_l) per-image mean-squared errors, policy near the reference."""
    ref_w, ref_l = dyadic(E, seed), dyadic(E, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    shift = torch.round(spread * torch.randn(2, E, generator=g) * 2**16) / 2**16
    return ref_w + shift[0], ref_l + shift[1], ref_w, ref_l


def seam_batch(mw, ml, rw, rl, labels=None):
    return pair_batch(DenoisingStats(torch.cat([mw, ml])), DenoisingStats(torch.cat([rw, rl])), labels)


def official_diffusion_dpo(mw, ml, rw, rl, beta_dpo):
    """Diffusion-DPO, official (SalesforceAIResearch/DiffusionDPO) form, β = 5000 in the paper."""
    model_diff = mw - ml
    ref_diff = rw - rl
    scale_term = -0.5 * beta_dpo
    inside_term = scale_term * (model_diff - ref_diff)
    return -F.logsigmoid(inside_term).mean()


def test_dpo_on_seam_statistics_is_the_official_diffusion_dpo_loss_with_beta_5000():
    mw, ml, rw, rl = pair_stats()
    ours = losses.get("dpo")(seam_batch(mw, ml, rw, rl), beta=5000.0).losses.mean()
    official = official_diffusion_dpo(mw, ml, rw, rl, 5000.0)
    assert abs(float(ours) - float(official)) <= 1e-6
    assert 0.3 < float(official) < 1.2  # the logits are O(1): the test is not saturated
    # without the ½ (β = 5000 in the script's units) the loss is different: the factor matters
    assert abs(float(official_diffusion_dpo(mw, ml, rw, rl, 10000.0)) - float(ours)) > 1e-2


def test_generic_float_inputs_agree_with_the_official_loss_in_float64():
    g = torch.Generator().manual_seed(5)
    rw, rl = 0.5 + torch.rand(E, generator=g), 0.5 + torch.rand(E, generator=g)
    mw, ml = rw + 1e-4 * torch.randn(E, generator=g), rl + 1e-4 * torch.randn(E, generator=g)
    ours = losses.get("dpo")(seam_batch(mw, ml, rw, rl), beta=5000.0).losses.mean()
    exact = official_diffusion_dpo(mw.double(), ml.double(), rw.double(), rl.double(), 5000.0)
    # float32 rounding of ρ at β/2 = 2500: a few ulp(1) · 2500 ≈ 1e-4 at most
    assert abs(float(ours) - float(exact)) < 2e-4


def diffusers_script(mw, ml, rw, rl, beta_dpo, loss_type):
    """The diffusers research script train_diffusion_dpo.py (β_dpo = 2500 default, no ½)."""
    model_diff, ref_diff = mw - ml, rw - rl
    logits = ref_diff - model_diff
    if loss_type == "sigmoid":
        return -1 * F.logsigmoid(beta_dpo * logits).mean()
    if loss_type == "hinge":
        return torch.relu(1 - beta_dpo * logits).mean()
    # the script's "ipo" branch reads `args.beta`, which its parser never defines (an AttributeError
    # at the first step); this is the evident intent, with β_dpo
    return ((logits - 1 / (2 * beta_dpo)) ** 2).mean()


def test_diffusers_script_beta_2500_is_dpo_and_hinge_at_beta_5000():
    mw, ml, rw, rl = pair_stats(1)
    batch = seam_batch(mw, ml, rw, rl)
    for loss_type, name in (("sigmoid", "dpo"), ("hinge", "hinge")):
        ours = losses.get(name)(batch, beta=5000.0).losses.mean()
        assert abs(float(ours) - float(diffusers_script(mw, ml, rw, rl, 2500.0, loss_type))) <= 1e-6


def test_ipo_on_seam_statistics():
    """IPO: (−d/2 − 1/(2β))² = zoo `ipo` (|y| = 1 per image, so token_mean changes nothing); the
    script's intended IPO on its unhalved logit −d is 4 × that with β = 2·β_dpo."""
    mw, ml, rw, rl = pair_stats(2, spread=1e-2)
    batch = seam_batch(mw, ml, rw, rl)
    d = (mw - ml) - (rw - rl)
    beta = 50.0
    expected = ((-d / 2 - 1 / (2 * beta)) ** 2).mean()
    assert abs(float(losses.get("ipo")(batch, beta=beta).losses.mean()) - float(expected)) <= 1e-6
    script = diffusers_script(mw, ml, rw, rl, beta / 2, "ipo")
    assert abs(4 * float(losses.get("ipo")(batch, beta=beta).losses.mean()) - float(script)) <= 1e-6


def test_on_a_pipeline_ipo_and_hinge_default_to_the_scripts_beta(tmp_path):
    """On a pipeline folder `preftune train ipo|hinge|dpo` gets β = 5000 (DIFFUSION_DEFAULTS): the
    script's one β_dpo = 2500 for its three loss types; a β the user gives is kept."""
    from preftune.config import TrainConfig
    from preftune.diffusion.train import DIFFUSION_DEFAULTS, with_paper_defaults

    assert {name: hp["beta"] for name, hp in DIFFUSION_DEFAULTS.items()} == {
        "dpo": 5000.0,
        "hinge": 5000.0,
        "ipo": 5000.0,
    }
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    for method in ("dpo", "hinge", "ipo"):
        config = with_paper_defaults(TrainConfig(method=method, model=str(tmp_path)))
        assert config.hparams == {f"{method}.beta": 5000.0}
    kept = with_paper_defaults(TrainConfig(method="ipo", model=str(tmp_path), hparams={"beta": 50.0}))
    assert kept.hparams == {"beta": 50.0}
    mw, ml, rw, rl = pair_stats(3)
    ours = losses.get("ipo")(seam_batch(mw, ml, rw, rl), beta=5000.0).losses.mean()
    script = float(diffusers_script(mw, ml, rw, rl, 2500.0, "ipo"))
    assert script > 0 and abs(4 * float(ours) - script) <= 1e-4 * script


def official_diffusion_kto(model_losses, ref_loss, labels, beta, lambda_d=1.0, lambda_u=1.0):
    """jacklishufan/diffusion-kto train_kto_sd_v1.5.py, loss 'kto', halo 'sigmoid', one process."""
    g_term = -model_losses - -ref_loss
    kl = g_term.mean().detach().clamp(min=0)
    g_term = g_term - kl
    label_sgn = 2 * labels - 1
    labels_binary = labels == 1
    h = torch.sigmoid(label_sgn * beta * g_term)
    w_y = lambda_d * labels_binary + lambda_u * ~labels_binary
    return (w_y * (1 - h)).mean()


def test_diffusion_kto_is_the_official_loss_with_z_from_the_global_batch():
    ref = dyadic(E, 10)
    g = torch.Generator().manual_seed(11)
    model = ref + torch.round(1e-3 * torch.randn(E, generator=g) * 2**16) / 2**16
    labels = (torch.rand(E, generator=g) < 0.6).float()
    spec = losses.get("diff_kto")
    for weights in ((1.0, 1.0), (1.5, 0.5)):
        hp = {"desirable_weight": weights[0], "undesirable_weight": weights[1]}
        ours = spec(unpaired_batch(DenoisingStats(model), DenoisingStats(ref), labels), **hp).losses.mean()
        official = official_diffusion_kto(model, ref, labels, 1000.0, *weights)
        assert abs(float(ours) - float(official)) <= 1e-6
    # two "ranks" of 32: z is the mean over all 64 (the official script reduces across processes)
    halves = [
        unpaired_batch(DenoisingStats(model[i : i + 32]), DenoisingStats(ref[i : i + 32]), labels[i : i + 32])
        for i in (0, 32)
    ]
    assert spec.batch_statistic is not None
    sums = [spec.batch_statistic.sums(b) for b in halves]
    state = spec.batch_statistic.state({}, {k: sums[0][k] + sums[1][k] for k in sums[0]})
    split = torch.cat([spec(b, state).losses for b in halves]).mean()
    assert abs(float(split) - float(official_diffusion_kto(model, ref, labels, 1000.0))) <= 1e-6
    # z is clamped at 0: a policy better than the reference everywhere has z > 0, worse has z = 0
    worse = unpaired_batch(DenoisingStats(ref + 0.01), DenoisingStats(ref), labels)
    assert float(spec(worse).metrics["kto/z0"][0]) == 0.0


def official_mapo(model_losses_w, model_losses_l, snr_value=0.5, beta_mapo=0.1, num_train_timesteps=1000):
    """mapo-t2i/mapo utils.compute_loss."""
    log_odds = (snr_value * model_losses_w) / (torch.exp(snr_value * model_losses_w) - 1) - (
        snr_value * model_losses_l
    ) / (torch.exp(snr_value * model_losses_l) - 1)
    ratio = F.logsigmoid(log_odds * num_train_timesteps)
    ratio_losses = beta_mapo * ratio
    return model_losses_w.mean() - ratio_losses.mean()


def test_mapo_is_the_official_loss_reference_free():
    g = torch.Generator().manual_seed(3)
    mw, ml = 0.01 + 2 * torch.rand(E, generator=g), 0.01 + 2 * torch.rand(E, generator=g)
    spec = losses.get("mapo")
    assert not spec.needs_reference
    ours = spec(pair_batch(DenoisingStats(torch.cat([mw, ml])))).losses.mean()
    # the official float32 expression is itself ~4e-6 from exact (exp(x) − 1 cancels): compare in float64
    assert abs(float(ours) - float(official_mapo(mw.double(), ml.double()))) <= 1e-6
    ours2 = spec(pair_batch(DenoisingStats(torch.cat([mw, ml]))), beta=0.5, snr=2.0, timesteps=100)
    official2 = official_mapo(mw.double(), ml.double(), 2.0, 0.5, 100)
    assert abs(float(ours2.losses.mean()) - float(official2)) <= 1e-6


def test_mapo_f_is_finite_and_exact_at_the_edges():
    x = torch.tensor([0.0, 1e-8, 1.0, 100.0, 1e5, -3.0], requires_grad=True)
    f = mapo_f(x)
    expected = torch.tensor(
        [1.0, 1.0, 1.0 / (torch.e - 1.0), 100.0 * torch.exp(torch.tensor(-100.0)), 0.0, 3.0]
    )
    expected[5] = -3.0 / (torch.exp(torch.tensor(-3.0)) - 1.0)
    torch.testing.assert_close(f.detach(), expected, rtol=1e-6, atol=1e-30)
    f.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert abs(float(x.grad[0]) + 0.5) < 1e-6  # f'(0) = −½


def official_smpo(mw, ml, rw, rl, p, beta_dpo):
    """SmPO's smoothed Diffusion-DPO logit: scale −β/2 · (2p − 1) · 10 on the mse difference."""
    model_diff, ref_diff = mw - ml, rw - rl
    scale_term = -0.5 * beta_dpo * (2 * p - 1) * 10
    return -F.logsigmoid(scale_term * (model_diff - ref_diff)).mean()


def test_smpo_smoothed_label_and_its_limits():
    mw, ml, rw, rl = pair_stats(4, spread=1e-4)
    g = torch.Generator().manual_seed(4)
    scores = torch.randn(2, E, generator=g)
    p = smpo_label(scores[0], scores[1])
    torch.testing.assert_close(p, torch.softmax(scores, dim=0)[0])
    p = torch.round(p * 2**8) / 2**8  # dyadic, so (2p − 1)·10·β/2 is exact
    ours = losses.get("smpo")(seam_batch(mw, ml, rw, rl, labels=p), beta=2000.0).losses.mean()
    assert abs(float(ours) - float(official_smpo(mw, ml, rw, rl, p, 2000.0))) <= 1e-6
    # p = ½: a tie contributes log 2 whatever the model does; p = 0.55: plain Diffusion-DPO
    tie = losses.get("smpo")(seam_batch(mw, ml, rw, rl, labels=torch.full((E,), 0.5)), beta=2000.0)
    torch.testing.assert_close(tie.losses, torch.full((E,), float(torch.log(torch.tensor(2.0)))))
    near = losses.get("smpo")(seam_batch(mw, ml, rw, rl, labels=torch.full((E,), 0.55)), beta=2000.0)
    plain = losses.get("dpo")(seam_batch(mw, ml, rw, rl), beta=2000.0)
    torch.testing.assert_close(near.losses, plain.losses, rtol=1e-5, atol=1e-6)
