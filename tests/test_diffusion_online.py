"""Online diffusion RL: DDPO, DPOK, D3PO, SPO and AWM — their defining identities (fast) and a slow
learning test each on a computable reward (the mean of the final latent's first channel)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

pytest.importorskip("diffusers")

from preftune.diffusion.awm import awm_log_likelihood, awm_step, sample_flow  # noqa: E402
from preftune.diffusion.critics import LatentCritic, step_preference_loss  # noqa: E402
from preftune.diffusion.online import ddpo_advantages, ddpo_loss, ddpo_step, dpok_kl, dpok_step  # noqa: E402
from preftune.diffusion.policy import DDIMPolicy, sample_trajectory, step_log_prob  # noqa: E402
from preftune.diffusion.steppairs import _pair_logps, d3po_loss, d3po_step, spo_pairs, spo_step  # noqa: E402
from preftune.diffusion.tiny import encode_prompts, tiny_components  # noqa: E402
from preftune.errors import ConfigError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def brightness(latents: torch.Tensor) -> torch.Tensor:
    """The toy reward: mean of the first latent channel, per image."""
    return latents[:, 0].mean(dim=(1, 2))


@pytest.fixture(scope="module")
def parts():
    return tiny_components(seed=0)


def _cond(parts, n: int) -> torch.Tensor:
    return encode_prompts(parts["tokenizer"], parts["text_encoder"], ["a red square"] * n)


def test_ddpo_advantages_standardise_per_prompt_and_clip():
    rewards = torch.tensor([1.0, 3.0, 2.0, 2.0, 8.0])
    ids = torch.tensor([0, 0, 1, 1, 1])
    adv = ddpo_advantages(rewards, ids, clip=5.0)
    s0, s1 = math.sqrt(2.0), math.sqrt(12.0)  # unbiased stds of [1, 3] and [2, 2, 8]
    expected = [-1 / (s0 + 1e-4), 1 / (s0 + 1e-4), -2 / (s1 + 1e-4), -2 / (s1 + 1e-4), 4 / (s1 + 1e-4)]
    torch.testing.assert_close(adv, torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert ddpo_advantages(rewards, ids, clip=0.5).abs().max() == pytest.approx(0.5)


def test_ddpo_loss_is_ppo_clip_on_per_element_ratios():
    d = 4
    old = torch.zeros(2, 3, dtype=torch.float64)
    logps = torch.tensor([[0.0, 4e-4, -4e-4], [0.0, 4e-4, -4e-4]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([2.0, -1.0])
    out = ddpo_loss(logps, old, adv, elements=d, clip_range=1e-4)
    # per-element log ratios 0, 1e-4, −1e-4: every ratio is inside [1 − 1e-4, 1 + 1e-4] up to rounding
    rho = torch.exp(torch.tensor([0.0, 1e-4, -1e-4]))
    exp0 = float(-(rho.clamp(1 - 1e-4, 1 + 1e-4) * 2.0).mean())
    assert float(out.losses[0].detach()) == pytest.approx(exp0, rel=1e-6)
    out.losses.sum().backward()
    # on-policy gradient of chain i: −A_i ρ / (K d) per step (no clipping active)
    assert float(logps.grad[0, 0]) == pytest.approx(-2.0 / (3 * d), rel=1e-5)
    clipped = ddpo_loss(torch.full((1, 1), 8e-4), torch.zeros(1, 1), torch.tensor([1.0]), d, 1e-4)
    assert float(clipped.losses[0]) == pytest.approx(-(1 + 1e-4), rel=1e-7)  # ρ = e^2e-4 clipped
    assert float(clipped.metrics["clip_fraction"][0]) == 1.0


def test_ddpo_step_gradient_is_minus_advantage_times_the_per_element_score(parts):
    unet = copy.deepcopy(parts["unet"])
    policy = DDIMPolicy(parts["scheduler"], num_steps=3)
    cond, noise = _cond(parts, 4), torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([0, 0, 1, 1])
    before = [p.detach().clone() for p in unet.parameters()]
    opt = torch.optim.SGD(unet.parameters(), lr=1.0)
    ddpo_step(
        unet,
        opt,
        policy,
        cond,
        ids,
        brightness,
        noise=noise,
        generator=torch.Generator().manual_seed(1),
        max_grad_norm=1e9,
    )
    step = [b - p.detach() for b, p in zip(before, unet.parameters())]  # = the gradient (lr 1)
    ref = copy.deepcopy(parts["unet"])
    traj = sample_trajectory(ref, policy, cond, noise, torch.Generator().manual_seed(1))
    adv = ddpo_advantages(brightness(traj.final), ids)
    from preftune.diffusion.policy import trajectory_log_probs

    logps = trajectory_log_probs(ref, policy, traj)
    (-(adv[:, None] * logps / traj.elements).mean()).backward()
    for s, p in zip(step, ref.parameters()):
        torch.testing.assert_close(
            s, p.grad if p.grad is not None else torch.zeros_like(s), rtol=1e-3, atol=1e-7
        )


def test_dpok_kl_and_d3po_loss_values():
    eps, pre = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    pre[1] = 3.0
    torch.testing.assert_close(dpok_kl(eps, pre), torch.tensor([1.0, 9.0]))
    d = 10
    lw, rw = torch.tensor([0.5]), torch.tensor([0.0])  # log r_w = 0.05 per element
    ll, rl = torch.tensor([-3.0]), torch.tensor([0.0])  # log r_l = −0.3, clipped to log 0.9
    loss = d3po_loss(lw, rw, ll, rl, d, beta=0.1, eps=0.1)
    expected = -math.log(1 / (1 + math.exp(-0.1 * (0.05 - math.log(0.9)))))
    assert float(loss[0]) == pytest.approx(expected, rel=1e-6)


def test_awm_log_likelihood_weightings():
    pred, target = torch.zeros(2, 4), torch.ones(2, 4)
    target[1] = 2.0
    s = torch.tensor([0.5, 0.25])
    torch.testing.assert_close(
        awm_log_likelihood(pred, target, s, "uniform"), torch.tensor([-1.0, -4.0]).double()
    )
    ghuber = awm_log_likelihood(pred, target, s, "ghuber", power=0.25)
    tiny = 1e-10
    exp = [-((1 + tiny) ** 0.25 - tiny**0.25) * 0.5 / 0.25, -((4 + tiny) ** 0.25 - tiny**0.25) * 0.25 / 0.25]
    torch.testing.assert_close(ghuber, torch.tensor(exp, dtype=torch.float64))
    with pytest.raises(ConfigError, match="weighting 'huberish' is unknown"):
        awm_log_likelihood(pred, target, s, "huberish")


def test_spo_pairs_keep_confident_best_worst_pairs_after_the_skipped_steps(parts):
    policy = DDIMPolicy(parts["scheduler"], num_steps=4)

    def scorer(x, t, cond):  # a known step-aware "preference": a steep function of brightness
        return 1e4 * brightness(x)

    cond, noise = _cond(parts, 3), torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    pairs, final = spo_pairs(
        parts["unet"],
        policy,
        scorer,
        cond,
        noise,
        candidates=4,
        threshold=0.3,
        skip_steps=2,
        generator=torch.Generator().manual_seed(5),
    )
    assert final.shape == noise.shape and pairs.steps.numel() > 0
    assert int(pairs.steps.min()) >= 2
    assert bool((brightness(pairs.winners) > brightness(pairs.losers)).all())
    again_w, again_l = _pair_logps(parts["unet"], policy, pairs)
    torch.testing.assert_close(again_w.detach(), pairs.logp_w, rtol=0, atol=1e-5)
    torch.testing.assert_close(again_l.detach(), pairs.logp_l, rtol=0, atol=1e-5)
    none, _ = spo_pairs(parts["unet"], policy, scorer, cond, noise, threshold=1.0, skip_steps=0)
    assert none.steps.numel() == 0  # softmax probabilities never differ by more than 1


def test_step_preference_loss_is_bradley_terry_on_pairs_noised_alike(parts):
    class Sum(torch.nn.Module):
        def forward(self, x, t, cond):
            return x.flatten(1).sum(1)

    w, l_ = torch.ones(2, 4, 8, 8), torch.zeros(2, 4, 8, 8)
    cond = torch.zeros(2, 3, 16)
    loss = step_preference_loss(Sum(), w, l_, cond, parts["scheduler"], torch.Generator().manual_seed(0))
    # shared ε and t: f(x_t^w) − f(x_t^l) = √ᾱ_t · 256, so the loss is −log σ(√ᾱ_t · 256) averaged
    g = torch.Generator().manual_seed(0)
    torch.randn((2, 4, 8, 8), generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    a = parts["scheduler"].alphas_cumprod[t].sqrt()
    assert float(loss) == pytest.approx(float(-torch.nn.functional.logsigmoid(a * 256).mean()), rel=1e-4)
    critic = LatentCritic(4, 16)
    assert critic(w, torch.tensor(5), torch.zeros(2, 3, 16)).shape == (2,)


def test_log_prob_helper_agrees_with_torch_normal():
    x, mean = torch.randn(3, 5), torch.randn(3, 5)
    normal = torch.distributions.Normal(mean.double(), 0.3).log_prob(x.double()).sum(1)
    torch.testing.assert_close(step_log_prob(x, mean, 0.3), normal)


# ---- slow learning tests: reward on held-out noise rises -------------------------------------------


def _held_out_reward(unet, policy, cond, noise) -> float:
    traj = sample_trajectory(unet, policy, cond, noise, torch.Generator().manual_seed(123))
    return float(brightness(traj.final).mean())


def _learns(parts, step_fn, iterations: int = 8, n: int = 8) -> tuple[float, float]:
    unet = copy.deepcopy(parts["unet"])
    policy = DDIMPolicy(parts["scheduler"], num_steps=6)
    cond = _cond(parts, n)
    held = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(99))
    before = _held_out_reward(unet, policy, _cond(parts, 16), held)
    g = torch.Generator().manual_seed(0)
    for _ in range(iterations):
        step_fn(unet, policy, cond, torch.randn(n, 4, 8, 8, generator=g), g)
    return before, _held_out_reward(unet, policy, _cond(parts, 16), held)


@pytest.mark.slow
def test_ddpo_raises_the_reward(parts):
    ids = torch.arange(8) // 4

    def step(unet, policy, cond, noise, g):
        opt = step.opt = getattr(step, "opt", None) or torch.optim.Adam(unet.parameters(), lr=3e-3)
        ddpo_step(unet, opt, policy, cond, ids, brightness, noise=noise, generator=g)

    before, after = _learns(parts, step)
    assert after > before + 1.0, (before, after)


@pytest.mark.slow
def test_dpok_raises_the_reward(parts):
    pretrained = copy.deepcopy(parts["unet"]).requires_grad_(False)
    value = LatentCritic(4, 16)
    vopt = torch.optim.Adam(value.parameters(), lr=1e-2)

    def step(unet, policy, cond, noise, g):
        opt = step.opt = getattr(step, "opt", None) or torch.optim.Adam(unet.parameters(), lr=3e-3)
        dpok_step(
            unet,
            pretrained,
            value,
            opt,
            vopt,
            policy,
            cond,
            brightness,
            noise=noise,
            generator=g,
            reward_weight=1.0,
            kl_weight=0.01,
        )

    before, after = _learns(parts, step)
    assert after > before + 1.0, (before, after)


@pytest.mark.slow
def test_d3po_raises_the_reward(parts):
    def step(unet, policy, cond, noise, g):
        opt = step.opt = getattr(step, "opt", None) or torch.optim.Adam(unet.parameters(), lr=3e-3)
        d3po_step(unet, opt, policy, cond[:4], brightness, noise=noise[:4], generator=g, beta=10.0)

    before, after = _learns(parts, step)
    assert after > before + 1.0, (before, after)


@pytest.mark.slow
def test_spo_raises_the_reward_with_a_step_aware_model_trained_on_noisy_latents(parts):
    critic = LatentCritic(4, 16)
    copt = torch.optim.Adam(critic.parameters(), lr=1e-2)
    policy = DDIMPolicy(parts["scheduler"], num_steps=6)
    g = torch.Generator().manual_seed(7)
    cond = _cond(parts, 16)
    for _ in range(60):  # the step-aware model: pairs of the base model's samples ranked by the reward
        final = sample_trajectory(parts["unet"], policy, cond, torch.randn(16, 4, 8, 8, generator=g), g).final
        r = brightness(final)
        w = torch.where((r[:8] > r[8:])[:, None, None, None], final[:8], final[8:])
        l_ = torch.where((r[:8] > r[8:])[:, None, None, None], final[8:], final[:8])
        loss = step_preference_loss(critic, w, l_, cond[:8], parts["scheduler"], g)
        copt.zero_grad()
        loss.backward()
        copt.step()

    def step(unet, policy, cond, noise, g):
        opt = step.opt = getattr(step, "opt", None) or torch.optim.Adam(unet.parameters(), lr=3e-3)
        spo_step(unet, opt, policy, critic, cond, noise=noise, generator=g, skip_steps=1, threshold=0.1)

    before, after = _learns(parts, step)
    assert after > before + 1.0, (before, after)


@pytest.mark.slow
def test_awm_raises_the_reward_of_a_flow_model(parts):
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = copy.deepcopy(parts["unet"])
    reference = copy.deepcopy(parts["unet"]).requires_grad_(False)
    sched = FlowMatchEulerDiscreteScheduler()
    cond = _cond(parts, 8)
    held = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(99))
    before = float(brightness(sample_flow(model, sched, _cond(parts, 16), held, 6)).mean())
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        awm_step(
            model,
            opt,
            sched,
            cond,
            torch.arange(8) // 4,
            brightness,
            noise=torch.randn(8, 4, 8, 8, generator=g),
            num_steps=6,
            reference=reference,
            generator=g,
        )
    after = float(brightness(sample_flow(model, sched, _cond(parts, 16), held, 6)).mean())
    assert after > before + 0.3, (before, after)
