"""Inference-time alignment: ReNO (noise optimisation) and DTS / DTS* (tree search over the chain)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import DDIMScheduler  # noqa: E402

from preftune.diffusion.policy import DDIMPolicy  # noqa: E402
from preftune.diffusion.reno import norm_regulariser, one_step_generator, reno  # noqa: E402
from preftune.diffusion.tiny import encode_prompts, tiny_components  # noqa: E402
from preftune.diffusion.tree import _soft_value, policy_step, tree_sample  # noqa: E402
from preftune.errors import ConfigError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def brightness(x: torch.Tensor) -> torch.Tensor:
    return x[:, 0].flatten(1).mean(dim=1)


@pytest.fixture(scope="module")
def parts():
    return tiny_components(seed=0)


def test_norm_regulariser_is_the_chi_law_and_is_flat_at_its_mode():
    eps = torch.tensor([[3.0, 4.0]])
    assert float(norm_regulariser(eps)[0]) == pytest.approx(12.5 - math.log(5.0 + 1e-6), rel=1e-6)
    d = 16
    at_mode = torch.full((1, d), math.sqrt((d - 1) / d), requires_grad=True)  # ‖ε‖ = √(d − 1)
    norm_regulariser(at_mode).sum().backward()
    assert float(at_mode.grad.abs().max()) < 1e-5


def test_one_step_generator_is_ddim_x0_prediction_at_the_top_timestep(parts):
    cond = encode_prompts(parts["tokenizer"], parts["text_encoder"], ["a", "b"])
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    gen = one_step_generator(parts["unet"], parts["scheduler"], cond)
    ddim = DDIMScheduler.from_config(parts["scheduler"].config)
    ddim.set_timesteps(1000)
    with torch.no_grad():
        eps = parts["unet"](noise, 999, encoder_hidden_states=cond).sample
        expected = ddim.step(eps, 999, noise).pred_original_sample
        torch.testing.assert_close(gen(noise), expected, rtol=1e-5, atol=1e-5)


def test_reno_raises_the_reward_and_keeps_the_best_noise_seen():
    weight = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)) / 8

    def generate(eps):  # a toy one-step "model": a fixed linear map of the noise
        return (eps.flatten(1) @ weight).reshape(eps.shape)

    noise = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    out = reno(generate, [(brightness, 1.0)], noise, iterations=20)
    start = brightness(generate(noise))
    assert bool((out.rewards > start + 0.5).all()), (start, out.rewards)
    torch.testing.assert_close(out.rewards, brightness(generate(out.noise)))
    torch.testing.assert_close(out.images, generate(out.noise))
    assert len(out.history) == 21 and out.history[0] == pytest.approx(float(start.mean()))
    assert float(out.rewards.mean()) >= max(out.history) - 1e-6
    with pytest.raises(ConfigError, match="at least one"):
        reno(generate, [], noise)


def test_reno_on_the_tiny_unet_one_step_model(parts):
    cond = encode_prompts(parts["tokenizer"], parts["text_encoder"], ["a red square"])
    gen = one_step_generator(parts["unet"], parts["scheduler"], cond)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    out = reno(gen, [(brightness, 1.0)], noise, iterations=8)
    with torch.no_grad():
        assert float(out.rewards[0]) > float(brightness(gen(noise))[0])


def test_soft_value_backup():
    assert _soft_value([0.0, 0.0], 2.0) == pytest.approx(0.0)
    lam = 0.5
    expected = math.log((math.exp(lam * 1.0) + math.exp(lam * 3.0)) / 2) / lam
    assert _soft_value([1.0, 3.0], lam) == pytest.approx(expected)
    assert _soft_value([1.0, 3.0], 1e-6) == pytest.approx(2.0, rel=1e-5)  # λ → 0: the mean


def _gauss_chain():
    g = torch.Generator().manual_seed(0)
    return g, (lambda x, k: x + torch.randn(x.shape, generator=g))


def test_dts_samples_the_reward_tilted_distribution_of_a_gaussian_chain():
    # x_0 = two N(0, 1) steps from 0, so p(x_0) = N(0, 2); tilted by exp(λ x_0), λ = 0.5: N(1, 2)
    g, step = _gauss_chain()
    means = [
        float(
            tree_sample(
                step,
                lambda x: x.reshape(-1),
                torch.zeros(1, 1),
                2,
                iterations=100,
                lam=0.5,
                branching=4,
                generator=g,
            ).sample
        )
        for _ in range(60)
    ]
    mean = sum(means) / len(means)
    assert abs(mean - 1.0) < 0.55, mean  # 3 standard errors of 60 draws of variance 2 is 0.55


def test_dts_star_returns_the_best_rollout_and_beats_the_base_sampler():
    g, step = _gauss_chain()
    res = tree_sample(
        step, lambda x: x.reshape(-1), torch.zeros(1, 1), 3, iterations=64, mode="search", generator=g
    )
    assert res.reward == max(res.rewards) == float(res.sample)
    assert len(res.rewards) == 64 and res.reward > 2.0  # the base mean is 0, std √3
    with pytest.raises(ConfigError, match="tree mode 'beam' is unknown"):
        tree_sample(step, lambda x: x.reshape(-1), torch.zeros(1, 1), 2, mode="beam")


def test_tree_search_over_the_ddim_policy(parts):
    policy = DDIMPolicy(parts["scheduler"], num_steps=3)
    cond = encode_prompts(parts["tokenizer"], parts["text_encoder"], ["a red square"])
    g = torch.Generator().manual_seed(0)
    step = policy_step(parts["unet"], policy, cond, g)
    root = torch.randn(1, 4, 8, 8, generator=g)
    res = tree_sample(step, brightness, root, 3, iterations=12, branching=2, mode="search", generator=g)
    assert res.sample.shape == (1, 4, 8, 8)
    assert res.reward == pytest.approx(float(brightness(res.sample)[0])) and res.reward == max(res.rewards)
