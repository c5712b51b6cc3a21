"""InPO's x_t: DDIM inversion by the current model, checked against the official script's loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from preftune.diffusion.inversion import invert
from preftune.diffusion.tiny import save_tiny_pipeline, tiny_components, write_image_pairs

pytestmark = pytest.mark.usefixtures("one_thread")


def official_inversion(unet, latents, cond, t, scheduler, eta, zs):  # type: ignore[no-untyped-def]
    """The official InPO training script's inversion and target (one t for the batch), re-typed."""
    from diffusers import DDIMInverseScheduler

    inverse = DDIMInverseScheduler.from_config(scheduler.config)
    inverse.set_timesteps(10)
    noisy = latents.clone()
    times = inverse.timesteps[inverse.timesteps < t]
    for j, tau in enumerate(times):
        pred = unet(noisy, tau.repeat(latents.shape[0]), cond).sample
        noisy = inverse.step(pred, tau, noisy).prev_sample
        prev_t = tau + inverse.config.num_train_timesteps // inverse.num_inference_steps
        variance = scheduler._get_variance(prev_t, tau) ** 0.5
        noisy = noisy + eta * zs[j] * variance
    alpha = scheduler.alphas_cumprod[t]
    return noisy, (noisy - latents * alpha**0.5) / (1 - alpha) ** 0.5


@pytest.mark.parametrize("t", [0, 1, 350, 901])
def test_invert_is_the_official_loop(t: int) -> None:
    parts = tiny_components(seed=1)
    unet, scheduler = parts["unet"], parts["scheduler"]
    g = torch.Generator().manual_seed(t)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    cond = torch.randn(2, 16, 16, generator=g)
    zs = [torch.randn(2, 4, 8, 8, generator=g) for _ in range(10)]
    with torch.no_grad():
        want_x, want_eps = official_inversion(unet, latents, cond, t, scheduler, 0.1, zs)
    got_x, got_eps = invert(unet, latents, cond, torch.tensor([t, t]), scheduler, steps=10, eta=0.1, noise=zs)
    assert torch.allclose(got_x, want_x, atol=1e-5)
    assert torch.allclose(got_eps, want_eps, atol=1e-4)
    if t <= 1:  # no grid point below t: x_t is x_0 itself
        assert torch.equal(got_x, latents)


def test_inpo_trains_and_the_reference_sees_the_policys_x_t(tmp_path: Path) -> None:
    """Step 1 of `preftune train inpo`: the reference (a frozen copy) scores the policy's inverted
    x_t, so ρ = 0 and the loss is log 2; β defaults to 2000."""
    import json

    import yaml

    from preftune.config import TrainConfig
    from preftune.train.api import train

    pipe = save_tiny_pipeline(tmp_path / "pipe")
    data = write_image_pairs(tmp_path / "data", pairs=2)
    config = TrainConfig(method="inpo", model=str(pipe), data=str(data), out=str(tmp_path / "run"),
                         batch_size=2, max_steps=2, lr=1e-3, cache_dir=str(tmp_path / "cache"), progress=False)  # fmt: skip
    result = train(config)
    first = json.loads((result.out_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(0.693147, abs=1e-5) and first["rewards/margin"] == 0.0
    assert yaml.safe_load((result.out_dir / "config.yaml").read_text())["hparams"]["beta"] == 2000.0


def test_renoise_step_averages_two_predictions() -> None:
    """A model whose ε-prediction is constant makes ReNoise inversion equal DDIM inversion; the tiny
    UNet (whose prediction depends on x) makes them differ."""
    parts = tiny_components(seed=2)
    scheduler = parts["scheduler"]
    latents, cond = torch.randn(1, 4, 8, 8), torch.randn(1, 16, 16)
    eps = torch.randn(1, 4, 8, 8)

    class Constant(torch.nn.Module):
        def forward(self, x, t, encoder_hidden_states):  # type: ignore[no-untyped-def]
            return type("Out", (), {"sample": eps.expand_as(x)})()

    t = torch.tensor([650])
    plain = invert(Constant(), latents, cond, t, scheduler, eta=0.0)
    renoised = invert(Constant(), latents, cond, t, scheduler, eta=0.0, renoise=True)
    assert torch.allclose(plain[0], renoised[0], atol=1e-6)
    unet = parts["unet"]
    assert not torch.allclose(invert(unet, latents, cond, t, scheduler, eta=0.0)[0],
                              invert(unet, latents, cond, t, scheduler, eta=0.0, renoise=True)[0])  # fmt: skip


def test_smpo_trains_from_scored_pairs(tmp_path: Path) -> None:
    """`preftune train smpo` reads each pair's smoothed label from its scores and inverts with ReNoise
    steps; at step 1 (policy = reference) every pair contributes log 2; pairs without scores are refused."""
    import json

    from preftune.config import TrainConfig
    from preftune.errors import ConfigError
    from preftune.train.api import train

    pipe = save_tiny_pipeline(tmp_path / "pipe")
    data = write_image_pairs(tmp_path / "data", pairs=2)
    base = dict(method="smpo", model=str(pipe), batch_size=2, max_steps=1, lr=1e-3,
                cache_dir=str(tmp_path / "cache"), progress=False)  # fmt: skip
    with pytest.raises(ConfigError, match="pairs.jsonl:1: smpo needs chosen_score and rejected_score"):
        train(TrainConfig(data=str(data), out=str(tmp_path / "no"), **base))  # type: ignore[arg-type]
    assert not (tmp_path / "cache").exists()  # refused before any image was encoded
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    scored = tmp_path / "data" / "scored.jsonl"
    scored.write_text(
        "".join(json.dumps({**r, "chosen_score": 1.0, "rejected_score": 0.0}) + "\n" for r in rows)
    )
    result = train(TrainConfig(data=str(scored), out=str(tmp_path / "run"), **base))  # type: ignore[arg-type]
    first = json.loads((result.out_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(0.693147, abs=1e-5)


class FromEpsilon(torch.nn.Module):
    """A model of prediction type `kind` whose implied ε at (x, t) is `eps_model`'s: its output is
    the v = (ε − √(1 − ᾱ_t) x) / √ᾱ_t or x_0 = (x − √(1 − ᾱ_t) ε) / √ᾱ_t that converts back to ε."""

    def __init__(self, eps_model, alphas: torch.Tensor, kind: str) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.eps_model, self.alphas, self.kind = eps_model, alphas, kind

    def forward(self, x, t, encoder_hidden_states):  # type: ignore[no-untyped-def]
        eps = self.eps_model(x, t, encoder_hidden_states=encoder_hidden_states).sample
        a = self.alphas[t].view(-1, 1, 1, 1)
        if self.kind == "v_prediction":
            out = (eps - (1 - a).sqrt() * x) / a.sqrt()
        else:
            out = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return type("Out", (), {"sample": out})()


def with_kind(scheduler, kind: str):  # type: ignore[no-untyped-def]
    return type(scheduler).from_config(scheduler.config, prediction_type=kind)


@pytest.mark.parametrize("renoise", [False, True])
def test_v_inversion_step_is_the_hand_conversion(renoise: bool) -> None:
    """One inverse step (t just above the first grid point τ = 1) of a v-prediction tiny UNet, by hand:
    ε = √ᾱ_τ v + √(1 − ᾱ_τ) x (diffusers' DDIMScheduler.step), x_τ = √ᾱ_τ x̂_0 + √(1 − ᾱ_τ) ε with
    x̂_0 = x_0 (the step starts at ᾱ = 1); target v = √ᾱ_t ε_t − √(1 − ᾱ_t) x_0."""
    parts = tiny_components(seed=4)
    unet, scheduler = parts["unet"], with_kind(parts["scheduler"], "v_prediction")
    g = torch.Generator().manual_seed(4)
    x0, cond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 16, generator=g)
    t, tau = 60, 1
    a = scheduler.alphas_cumprod
    with torch.no_grad():
        v = unet(x0, torch.tensor([tau, tau]), encoder_hidden_states=cond).sample
        eps = a[tau].sqrt() * v + (1 - a[tau]).sqrt() * x0
        if renoise:
            ahead = a[tau].sqrt() * x0 + (1 - a[tau]).sqrt() * eps
            v2 = unet(ahead, torch.tensor([tau, tau]), encoder_hidden_states=cond).sample
            eps = 0.5 * (eps + a[tau].sqrt() * v2 + (1 - a[tau]).sqrt() * ahead)
        x_tau = a[tau].sqrt() * x0 + (1 - a[tau]).sqrt() * eps
        got_x, got_v = invert(unet, x0, cond, torch.tensor([t, t]), scheduler, eta=0.0, renoise=renoise)
    eps_t = (x_tau - a[t].sqrt() * x0) / (1 - a[t]).sqrt()
    assert torch.allclose(got_x, x_tau, atol=1e-6)
    assert torch.allclose(got_v, a[t].sqrt() * eps_t - (1 - a[t]).sqrt() * x0, atol=1e-5)


@pytest.mark.parametrize("kind", ["v_prediction", "sample"])
@pytest.mark.parametrize("renoise", [False, True])
def test_a_reparametrised_model_inverts_like_its_epsilon_model(kind: str, renoise: bool) -> None:
    """The tiny ε-UNet and the same network read as a v- (or x_0-) model give the same x_t, and the
    target converts back to the ε target (v: ε = √ᾱ_t v + √(1 − ᾱ_t) x_t; x_0: the latent itself)."""
    parts = tiny_components(seed=5)
    unet, scheduler = parts["unet"], parts["scheduler"]
    other = with_kind(scheduler, kind)
    g = torch.Generator().manual_seed(5)
    x0, cond = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 16, 16, generator=g)
    t = torch.tensor([40, 420, 950])
    zs = [torch.randn(3, 4, 8, 8, generator=g) for _ in range(10)]
    with torch.no_grad():
        want_x, want_eps = invert(unet, x0, cond, t, scheduler, renoise=renoise, noise=zs)
        model = FromEpsilon(unet, scheduler.alphas_cumprod, kind)
        got_x, got_target = invert(model, x0, cond, t, other, renoise=renoise, noise=zs)
    assert torch.allclose(got_x, want_x, atol=1e-4)
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    if kind == "v_prediction":
        assert torch.allclose(a.sqrt() * got_target + (1 - a).sqrt() * got_x, want_eps, atol=1e-3)
    else:
        assert torch.equal(got_target, x0)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_ddim_inversion_then_ddim_sampling_reconstructs_the_latent(kind: str) -> None:
    """With an ε field that depends on t only, DDIM inversion (η_inv = 0) through the 10-point grid
    followed by diffusers' DDIMScheduler on the same grid returns x_0 — for every prediction type."""
    from diffusers import DDIMScheduler

    scheduler = with_kind(tiny_components(seed=6)["scheduler"], kind)
    g = torch.Generator().manual_seed(6)
    field, x0, cond = (
        torch.randn(1, 4, 8, 8, generator=g),
        torch.randn(1, 4, 8, 8, generator=g),
        torch.zeros(1, 16, 16),
    )

    class Field(torch.nn.Module):
        def forward(self, x, t, encoder_hidden_states):  # type: ignore[no-untyped-def]
            return type("Out", (), {"sample": torch.cos(t.float() / 300).view(-1, 1, 1, 1) * field})()

    model = Field() if kind == "epsilon" else FromEpsilon(Field(), scheduler.alphas_cumprod, kind)
    with torch.no_grad():
        x_top, _ = invert(model, x0, cond, torch.tensor([902]), scheduler, eta=0.0)
        sampler = DDIMScheduler.from_config(scheduler.config)
        sampler.set_timesteps(10)
        x = x_top
        for tau in sampler.timesteps:
            x = sampler.step(model(x, tau.view(1), encoder_hidden_states=cond).sample, tau, x).prev_sample
    assert not torch.allclose(x_top, x0, atol=0.1)
    assert torch.allclose(x, x0, atol=1e-4), float((x - x0).abs().max())


def test_an_unknown_prediction_type_is_refused() -> None:
    from preftune.errors import ConfigError

    scheduler = tiny_components(seed=7)["scheduler"]
    scheduler.register_to_config(prediction_type="flow_prediction")
    with pytest.raises(ConfigError, match="prediction_type 'flow_prediction' cannot be inverted"):
        invert(
            torch.nn.Identity(), torch.zeros(1, 4, 8, 8), torch.zeros(1, 16, 16), torch.tensor([5]), scheduler
        )
