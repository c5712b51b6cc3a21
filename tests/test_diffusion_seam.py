"""The diffusion seam on a tiny diffusers pipeline built from configs (nothing downloaded)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from diffusers import DDPMScheduler, StableDiffusionPipeline  # noqa: E402

from preftune import losses  # noqa: E402
from preftune.diffusion import (  # noqa: E402
    DenoisingStats,
    branch_conditioning,
    denoising_stats,
    pair_batch,
    pair_loss,
    pair_noise,
    train_step,
)
from preftune.diffusion.tiny import encode_prompts, save_tiny_pipeline, tiny_components  # noqa: E402
from preftune.errors import ConfigError  # noqa: E402


@pytest.fixture(scope="module")
def parts():
    return tiny_components(seed=0)


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("pipe") / "tiny-sd", seed=0)


def test_tiny_pipeline_saves_as_a_stable_diffusion_folder_and_loads_back(pipe_dir, parts):
    index = json.loads((pipe_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (pipe_dir / sub).is_dir(), sub
    assert (pipe_dir / "tokenizer" / "tokenizer_config.json").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(str(pipe_dir), safety_checker=None)
    fresh = parts["unet"].state_dict()
    for key, value in pipe.unet.state_dict().items():
        assert torch.equal(value, fresh[key]), key
    # character-level tokenizer: <bos> + one id per character (end-of-word variant last) + <eos>
    ids = pipe.tokenizer("ab").input_ids
    vocab = pipe.tokenizer.get_vocab()
    assert ids == [vocab["<|startoftext|>"], vocab["a"], vocab["b</w>"], vocab["<|endoftext|>"]]
    image = pipe("a red square", num_inference_steps=2, height=16, width=16, output_type="np").images
    assert image.shape == (1, 16, 16, 3)


def test_denoising_stats_targets_for_epsilon_v_and_flow(parts):
    unet = parts["unet"]
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 700])
    cond = torch.randn(2, 5, 16, generator=g)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", clip_sample=False)
    a = sched.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - sched.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    x_t = a * x0 + s * eps
    with torch.no_grad():
        pred = unet(x_t, t, encoder_hidden_states=cond).sample
        for kind, target in (("epsilon", eps), ("v_prediction", a * eps - s * x0)):
            stats = denoising_stats(unet, x0, eps, t, cond, sched, kind)
            torch.testing.assert_close(stats.mse, ((pred - target) ** 2).mean(dim=(1, 2, 3)))
            torch.testing.assert_close(stats.logps, -0.5 * stats.mse)
        sigma = (t.float() / 1000).view(-1, 1, 1, 1)
        pred_flow = unet((1 - sigma) * x0 + sigma * eps, t, encoder_hidden_states=cond).sample
        flow = denoising_stats(unet, x0, eps, t, cond, sched, "flow")
        torch.testing.assert_close(flow.mse, ((pred_flow - (eps - x0)) ** 2).mean(dim=(1, 2, 3)))
    assert denoising_stats(unet, x0, eps, t, cond, sched).mse.shape == (2,)  # type from the config
    with pytest.raises(ConfigError, match="unknown prediction type 'sample'"):
        denoising_stats(unet, x0, eps, t, cond, sched, "sample")
    with pytest.raises(ConfigError, match="2 latents need 2 timesteps"):
        denoising_stats(unet, x0, eps, t[:1], cond, sched)


def official_dpo_on_unet(unet, ref_unet, scheduler, latents, noise, timesteps, cond, beta_dpo):
    """The official Diffusion-DPO step (ε-prediction), written out: rows [winners, losers]."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    model_pred = unet(noisy, timesteps, cond).sample
    model_losses = F.mse_loss(model_pred.float(), noise.float(), reduction="none")
    model_losses = model_losses.mean(dim=list(range(1, len(model_losses.shape))))
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l
    with torch.no_grad():
        ref_pred = ref_unet(noisy, timesteps, cond).sample
        ref_losses = (ref_pred.float() - noise.float()).pow(2).mean(dim=[1, 2, 3])
        ref_losses_w, ref_losses_l = ref_losses.chunk(2)
        ref_diff = ref_losses_w - ref_losses_l
    scale_term = -0.5 * beta_dpo
    inside_term = scale_term * (model_diff - ref_diff)
    return -1 * F.logsigmoid(inside_term).mean(), model_losses.detach(), ref_losses


def on_grid(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x * 2**16) / 2**16


@pytest.mark.parametrize("per_branch_captions, beta", [(False, 5000.0), (True, 500.0)])
def test_dpo_on_unet_statistics_is_official_diffusion_dpo_and_dcpo(parts, per_branch_captions, beta):
    """Diffusion-DPO (β = 5000, one caption per pair) and DCPO (β = 500, the winner conditioned on
    its caption, the loser on its own: only the conditioning rows differ)."""
    ref = parts["unet"]
    unet = copy.deepcopy(ref)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    lat_w, lat_l = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    latents, noise, t = pair_noise(lat_w, lat_l, 1000, g)
    assert torch.equal(noise[:3], noise[3:]) and torch.equal(t[:3], t[3:])
    captions = torch.randn(6 if per_branch_captions else 3, 5, 16, generator=g)
    cond = branch_conditioning(captions, 3)
    sched = parts["scheduler"]
    official, model_mse, ref_mse = official_dpo_on_unet(unet, ref, sched, latents, noise, t, cond, beta)
    with torch.no_grad():
        mine = denoising_stats(unet, latents, noise, t, cond, sched)
        mine_ref = denoising_stats(ref, latents, noise, t, cond, sched)
    torch.testing.assert_close(mine.mse, model_mse, rtol=0, atol=0)  # the same statistic, bit for bit
    torch.testing.assert_close(mine_ref.mse, ref_mse, rtol=0, atol=0)
    # float32 at β = 5000 amplifies one rounding of the mse (1e-7) to 3e-4 in the logit, and the two
    # expressions group their subtractions differently: compare both on the mse rounded to 2⁻¹⁶
    pol, rf = DenoisingStats(on_grid(mine.mse)), DenoisingStats(on_grid(mine_ref.mse))
    ours = losses.get("dpo")(pair_batch(pol, rf), beta=beta).losses.mean()
    mw, ml = on_grid(model_mse).chunk(2)
    rw, rl = on_grid(ref_mse).chunk(2)
    official_grid = -F.logsigmoid(-0.5 * beta * ((mw - ml) - (rw - rl))).mean()
    assert abs(float(ours) - float(official_grid)) <= 1e-6
    unrounded = losses.get("dpo")(pair_batch(mine, mine_ref), beta=beta).losses.mean()
    assert abs(float(unrounded) - float(official)) < 1e-3
    assert abs(float(official) - float(torch.log(torch.tensor(2.0)))) > 1e-3  # not the trivial h = 0


def test_branch_conditioning_rejects_a_wrong_row_count():
    with pytest.raises(ConfigError, match="5 rows for 3 pairs: give 3 .* or 6"):
        branch_conditioning(torch.zeros(5, 2, 2), 3)


def test_train_steps_reduce_the_diffusion_dpo_loss_on_a_fixed_pair(parts):
    unet = copy.deepcopy(parts["unet"])
    ref = copy.deepcopy(unet).requires_grad_(False)
    sched = parts["scheduler"]
    g = torch.Generator().manual_seed(2)
    lat_w, lat_l = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    cond = encode_prompts(parts["tokenizer"], parts["text_encoder"], ["red square", "blue dot"])

    def loss_now() -> float:
        with torch.no_grad():
            out = pair_loss(unet, ref, lat_w, lat_l, cond, sched, generator=torch.Generator().manual_seed(7))
        return float(out.losses.mean())

    before = loss_now()
    assert abs(before - float(torch.log(torch.tensor(2.0)))) < 1e-6  # policy = reference: log 2
    opt = torch.optim.Adam(unet.parameters(), lr=1e-3)
    for _ in range(4):
        train_step(unet, ref, opt, lat_w, lat_l, cond, sched, generator=torch.Generator().manual_seed(7))
    assert loss_now() < before - 0.05
    with pytest.raises(ConfigError, match="loss 'dpo' needs a reference denoiser"):
        pair_loss(unet, None, lat_w, lat_l, cond, sched)
    mapo = pair_loss(
        unet, None, lat_w, lat_l, cond, sched, loss="mapo", generator=torch.Generator().manual_seed(7)
    )
    assert mapo.losses.shape == (2,) and torch.isfinite(mapo.losses).all()
