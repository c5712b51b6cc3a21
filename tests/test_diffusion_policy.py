"""The DDIM η = 1 sampler as a policy: its steps, its exact log-probs, its recomputed ratio."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import DDIMScheduler  # noqa: E402

from preftune.diffusion.policy import (  # noqa: E402
    DDIMPolicy,
    sample_trajectory,
    step_log_prob,
    trajectory_log_probs,
)
from preftune.diffusion.tiny import encode_prompts, tiny_components  # noqa: E402
from preftune.errors import ConfigError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def parts():
    return tiny_components(seed=0)


@pytest.fixture(scope="module")
def cond(parts):
    return encode_prompts(parts["tokenizer"], parts["text_encoder"], ["red", "blue", "red"])


def test_a_policy_step_is_diffusers_ddim_eta_1_and_its_log_prob_the_closed_form_density(parts, cond):
    policy = DDIMPolicy(parts["scheduler"], num_steps=4)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    traj = sample_trajectory(parts["unet"], policy, cond, x, generator=g)
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))  # the first step's noise
    ddim = DDIMScheduler.from_config({**parts["scheduler"].config, "set_alpha_to_one": False})
    ddim.set_timesteps(4)
    with torch.no_grad():
        eps = parts["unet"](x, ddim.timesteps[0], encoder_hidden_states=cond).sample
    ref = ddim.step(eps, ddim.timesteps[0], x, eta=1.0, variance_noise=z).prev_sample
    torch.testing.assert_close(traj.latents[1], ref, rtol=1e-5, atol=1e-5)
    # closed form: x_prev − μ = σ z, so log π = −½‖z‖² − d log σ − (d/2) log 2π with σ² DDIM's variance
    t, prev = int(ddim.timesteps[0]), int(ddim.timesteps[0]) - 250
    sigma = math.sqrt(ddim._get_variance(t, prev))
    d = 4 * 8 * 8
    expected = (
        -0.5 * (z.double() ** 2).flatten(1).sum(1) - d * math.log(sigma) - 0.5 * d * math.log(2 * math.pi)
    )
    torch.testing.assert_close(traj.logps[:, 0], expected, rtol=0, atol=1e-3)
    dist = torch.distributions.Normal(traj.latents[1].double() - sigma * z.double(), sigma)
    torch.testing.assert_close(traj.logps[:, 0], dist.log_prob(traj.latents[1].double()).flatten(1).sum(1))
    assert traj.timesteps.tolist() == ddim.timesteps.tolist() and traj.elements == d
    assert traj.latents.shape == (5, 3, 4, 8, 8) and traj.logps.shape == (3, 4)


def test_recomputed_log_probs_under_the_sampling_weights_equal_the_sampling_ones(parts, cond):
    policy = DDIMPolicy(parts["scheduler"], num_steps=5)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    traj = sample_trajectory(parts["unet"], policy, cond, x, generator=torch.Generator().manual_seed(4))
    again = trajectory_log_probs(parts["unet"], policy, traj)
    assert again.requires_grad
    assert float((again.detach() - traj.logps).abs().max()) < 1e-5  # PPO's ratio is exactly 1
    some = trajectory_log_probs(parts["unet"], policy, traj, steps=[1, 3])
    torch.testing.assert_close(some.detach(), traj.logps[:, [1, 3]], rtol=0, atol=1e-5)


def test_the_last_step_ends_at_the_final_alpha_and_v_prediction_is_converted(parts):
    policy = DDIMPolicy(parts["scheduler"], num_steps=10)
    a, a_prev = policy.alphas(9)
    assert a == pytest.approx(float(policy.ddim.alphas_cumprod[1]))
    assert a_prev == pytest.approx(float(policy.ddim.alphas_cumprod[0]))  # set_alpha_to_one False
    config = {k: v for k, v in parts["scheduler"].config.items() if not k.startswith("_")}
    config["prediction_type"] = "v_prediction"
    vpol = DDIMPolicy(DDIMScheduler.from_config(config), num_steps=10)
    x, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    a = vpol.alphas(0)[0]

    class V:  # a v-predictor whose ε at x is `eps`: v = √ᾱ ε − √(1 − ᾱ) x̂_0
        def __call__(self, x_in, t, encoder_hidden_states):
            x0 = (x_in - math.sqrt(1 - a) * eps) / math.sqrt(a)
            return type("O", (), {"sample": math.sqrt(a) * eps - math.sqrt(1 - a) * x0})()

    torch.testing.assert_close(vpol.predict(V(), x, 0, torch.zeros(2, 3, 16)), eps, rtol=1e-5, atol=1e-5)


def test_step_log_prob_and_bad_settings():
    x, mean = torch.zeros(2, 3), torch.ones(2, 3)
    expected = -3 / (2 * 0.25) - 3 * math.log(0.5) - 1.5 * math.log(2 * math.pi)
    torch.testing.assert_close(step_log_prob(x, mean, 0.5), torch.full((2,), expected, dtype=torch.float64))
    sched = tiny_components()["scheduler"]
    with pytest.raises(ConfigError, match="eta = 0"):
        DDIMPolicy(sched, 4, eta=0.0)
    with pytest.raises(ConfigError, match="uncond="):
        DDIMPolicy(sched, 4, guidance_scale=5.0)
    with pytest.raises(ConfigError, match="at least 1 step"):
        DDIMPolicy(sched, 0)
