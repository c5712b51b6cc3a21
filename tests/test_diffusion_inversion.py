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
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    scored = tmp_path / "data" / "scored.jsonl"
    scored.write_text(
        "".join(json.dumps({**r, "chosen_score": 1.0, "rejected_score": 0.0}) + "\n" for r in rows)
    )
    result = train(TrainConfig(data=str(scored), out=str(tmp_path / "run"), **base))  # type: ignore[arg-type]
    first = json.loads((result.out_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(0.693147, abs=1e-5)
