"""Contract tests that iterate the whole registry: every loss, every edge case (optax style).

A batch is built from each spec's metadata (kind, needs_mismatched, needs_token_logps), never from
its name, so a newly registered loss is checked without editing this file.
"""

from __future__ import annotations

import pytest
import torch

from preftune import losses
from preftune.losses import REGISTRY, LossSpec
from preftune.types import PreferenceBatch

NAMES = sorted(REGISTRY)


def make_batch(
    spec: LossSpec, rho: torch.Tensor, ref: float = -1e4 - 1.0, dtype: torch.dtype = torch.float32
) -> tuple[PreferenceBatch, torch.Tensor]:
    """A batch whose log-ratios are `rho` [E, K'] for spec's data kind; returns (batch, policy_logps leaf).

    Reference log-probs are `ref` everywhere, so policy = ref + ρ (always ≤ 0 for |ρ| ≤ 1e4).
    Lengths 3 + branch; per-token log-probs spread each sum evenly over its tokens.
    """
    e = rho.shape[0]
    kinds = {"pairwise": 2, "any": 2, "listwise": 4, "unpaired": 2 if spec.needs_mismatched else 1}
    k = kinds[spec.kind]
    rho = rho[:, :k] if rho.shape[1] >= k else rho.repeat(1, k)[:, :k]
    ref_logps = torch.full((e, k), ref)
    policy = (ref_logps + rho).to(dtype).requires_grad_(True)
    lengths = (torch.arange(k) + 3).expand(e, k).clone()
    t = int(lengths.max())
    tok_mask = (torch.arange(t)[None, None, :] < lengths[:, :, None]).float()
    policy_tokens = policy[:, :, None] / lengths[:, :, None] * tok_mask
    ref_tokens = ref_logps[:, :, None] / lengths[:, :, None] * tok_mask
    labels = None
    if spec.kind == "unpaired":
        labels = (torch.arange(e) % 2 == 0).float()
    elif spec.kind in ("pairwise", "any"):
        labels = torch.full((e,), 0.8)
    batch = PreferenceBatch(
        policy_logps=policy,
        lengths=lengths,
        ref_logps=ref_logps.to(dtype),
        policy_token_logps=policy_tokens,
        ref_token_logps=ref_tokens.to(dtype),
        labels=labels,
        scores=torch.arange(k, 0, -1).float().expand(e, k).clone() if spec.kind == "listwise" else None,
        margins=torch.randn(e, k, 1) if spec.kind == "pairwise" else None,
    )
    return batch, policy


def call(spec: LossSpec, batch: PreferenceBatch) -> losses.LossOutput:
    return spec(batch, {})


@pytest.mark.parametrize("name", NAMES)
def test_metadata_is_complete(name):
    spec = REGISTRY[name]
    assert spec.name == name and spec.paper and spec.equation
    assert spec.kind in ("pairwise", "unpaired", "listwise", "any")
    assert spec.reduction in ("example", "token")
    assert spec.fn.__doc__
    for hname, hp in spec.hparams.items():
        assert hp.doc, f"{name}.{hname} has no doc"
        assert hp.coerce(hname, hp.default, name) == hp.default  # defaults are in range
    assert spec.validate({}) == spec.defaults()


@pytest.mark.parametrize("name", NAMES)
def test_finite_loss_and_gradient_for_extreme_log_ratios(name):
    """Log-ratios of ±1e4 (and 0, and 37.5 near the exp linearisation) in every branch pattern:
    loss, metrics and gradients stay finite."""
    spec = REGISTRY[name]
    for magnitude in (1e4, -1e4, 0.0, 37.5):
        m = magnitude
        rho = torch.tensor([[m, -m, m, 0.0], [-m, m, 0.0, m]])
        batch, leaf = make_batch(spec, rho)
        out = call(spec, batch)
        assert out.losses.shape == (2,) and out.losses.dtype == torch.float32
        assert torch.isfinite(out.losses).all(), (m, out.losses)
        out.losses.sum().backward()
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all(), (m, leaf.grad)
        for key, value in out.metrics.items():
            assert value.shape == (2,) and torch.isfinite(value).all(), (m, key)
            assert not value.requires_grad, key


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_inputs_compute_in_float32(name):
    """bf16 statistics give float32 losses equal to the float32 computation on the same (rounded) values."""
    spec = REGISTRY[name]
    rho = torch.tensor([[0.5, -0.25, 0.125, 1.0], [-1.0, 2.0, 0.0, 0.5]])
    batch16, leaf16 = make_batch(spec, rho, ref=-8.0, dtype=torch.bfloat16)
    out16 = call(spec, batch16)
    assert out16.losses.dtype == torch.float32
    out16.losses.sum().backward()
    assert leaf16.grad is not None and leaf16.grad.dtype == torch.bfloat16
    batch32 = PreferenceBatch(
        **{
            f: (v.detach().float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for f, v in vars(batch16).items()
        }
    )
    torch.testing.assert_close(out16.losses.detach(), call(spec, batch32).losses, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_batch_of_one_equals_its_row_of_a_larger_batch(name):
    """Per-example losses do not depend on the other examples (except batch statistics: bco's δ,
    kto's z₀, which are made identical here by giving every example the same statistics)."""
    spec = REGISTRY[name]
    rho = torch.tensor([[0.7, -0.3, 0.2, -0.1]]).repeat(3, 1)
    big, _ = make_batch(spec, rho, ref=-6.0)
    one, _ = make_batch(spec, rho[:1], ref=-6.0)
    if big.margins is not None:
        one.margins = big.margins[:1]
    if big.labels is not None:
        big.labels = big.labels[:1].expand(3).clone()
        one.labels = big.labels[:1].clone()
    out_big, out_one = call(spec, big), call(spec, one)
    assert out_one.losses.shape == (1,)
    torch.testing.assert_close(out_one.losses, out_big.losses[:1])


@pytest.mark.parametrize("name", NAMES)
def test_masked_examples_give_zero_loss_zero_gradient_and_leave_others_unchanged(name):
    """An example whose branches are all absent (even holding inf/NaN padding) has loss 0 and no
    gradient, and the other examples' losses equal those of the batch without it."""
    spec = REGISTRY[name]
    rho = torch.tensor([[0.7, -0.3, 0.2, -0.1], [0.1, 0.4, -0.2, 0.3]])
    batch, leaf = make_batch(spec, rho, ref=-6.0)
    clean_out = call(spec, batch).losses.detach()
    k = batch.policy_logps.shape[1]
    mask = torch.ones(3, k, dtype=torch.bool)
    mask[2] = False
    poison = torch.tensor([[float("nan")] * k])
    padded = PreferenceBatch(
        policy_logps=torch.cat([leaf.detach(), poison]).requires_grad_(True),
        lengths=torch.cat([batch.lengths, torch.zeros(1, k, dtype=batch.lengths.dtype)]),
        ref_logps=None if batch.ref_logps is None else torch.cat([batch.ref_logps, -poison.abs()]),
        mask=mask,
        policy_token_logps=torch.cat(
            [batch.policy_token_logps.detach(), torch.full_like(batch.policy_token_logps[:1], float("inf"))]
        ),
        ref_token_logps=torch.cat([batch.ref_token_logps, torch.zeros_like(batch.ref_token_logps[:1])]),
        labels=None if batch.labels is None else torch.cat([batch.labels, torch.tensor([float("nan")])]),
        scores=None if batch.scores is None else torch.cat([batch.scores, poison]),
        margins=None
        if batch.margins is None
        else torch.cat([batch.margins, torch.full_like(batch.margins[:1], float("nan"))]),
    )
    out = call(spec, padded)
    assert out.losses[2].item() == 0.0
    torch.testing.assert_close(out.losses[:2], clean_out)
    out.losses.sum().backward()
    grad = padded.policy_logps.grad
    assert grad is not None and torch.isfinite(grad).all() and (grad[2] == 0).all()
    for key, value in out.metrics.items():
        assert torch.isfinite(value).all() and value[2].item() == 0.0, key
    for value in out.state.values():
        assert torch.isfinite(value).all() and not value.requires_grad


@pytest.mark.parametrize("name", NAMES)
def test_losses_are_unreduced_and_sum_decomposes(name):
    """losses has one entry per example, and the gradient of Σ losses w.r.t. example i's statistics
    depends only on example i (no hidden mean inside the loss)."""
    spec = REGISTRY[name]
    if spec.batch_statistic is not None or spec.coupled:
        pytest.skip("batch statistics (δ, z₀) are detached, but their value depends on the batch")
    rho = torch.tensor([[0.7, -0.3, 0.2, -0.1], [0.1, 0.4, -0.2, 0.3], [-0.5, 0.5, 0.1, 0.0]])
    batch, leaf = make_batch(spec, rho, ref=-6.0)
    out = call(spec, batch)
    assert out.losses.shape == (3,)
    (g_all,) = torch.autograd.grad(out.losses.sum(), leaf)
    batch0, leaf0 = make_batch(spec, rho[:1], ref=-6.0)
    batch0.margins = None if batch.margins is None else batch.margins[:1]
    batch0.labels = None if batch.labels is None else batch.labels[:1]
    (g0,) = torch.autograd.grad(call(spec, batch0).losses.sum(), leaf0)
    torch.testing.assert_close(g_all[:1], g0)


def global_state(spec: LossSpec, parts: list[PreferenceBatch]) -> dict[str, torch.Tensor]:
    """The state a trainer passes for a step over `parts`: the batch statistic's sums added over them."""
    assert spec.batch_statistic is not None
    hp = spec.defaults()
    sums = [spec.batch_statistic.sums(p, **hp) for p in parts]
    total = {k: sum(s[k] for s in sums) for k in sums[0]}
    return spec.batch_statistic.state({}, total, **hp)


@pytest.mark.parametrize("name", NAMES)
def test_four_micro_batches_of_two_equal_one_batch_of_eight(name):
    """docs/algorithms.md §6 at the loss level: per-example losses of 4 micro-batches of 2, concatenated,
    equal those of the batch of 8 — so Σ / global count is the same however the batch is split.
    Losses with a batch statistic (bco's δ, kto's z₀) get it from the whole batch, as the trainer
    does; coupled losses (computed per micro-batch by definition) are exempt."""
    spec = REGISTRY[name]
    if spec.coupled:
        pytest.skip("the loss couples the examples of one call (documented)")
    g = torch.Generator().manual_seed(3)
    rho = torch.randn(8, 4, generator=g)
    full, _ = make_batch(spec, rho, ref=-6.0)
    parts = []
    for i in range(0, 8, 2):
        part, _ = make_batch(spec, rho[i : i + 2], ref=-6.0)
        part.margins = None if full.margins is None else full.margins[i : i + 2]
        parts.append(part)
    state = global_state(spec, parts) if spec.batch_statistic else {}
    if spec.batch_statistic:
        torch.testing.assert_close(global_state(spec, [full]), state)
    split = torch.cat([spec(p, state).losses for p in parts])
    torch.testing.assert_close(split, spec(full, state).losses)


@pytest.mark.parametrize("name", NAMES)
def test_gradient_descent_raises_the_better_response(name):
    """Sign check (catches a loss trained the wrong way round): at π_θ = π_ref, a gradient step on
    the policy log-probs raises the margin, never lowers the preferred response (branch 0: chosen /
    best / a D2O sample, or a desirable completion) and never raises the dispreferred one (last
    branch, or an undesirable completion). Losses whose paper makes them non-monotone near h = 0
    (`monotone=False`) are checked at a margin outside that region (ρ_w = 4, ρ_l = −4, divided by β
    where β > 1 so that the logit is not saturated: SePPO at β = 5000)."""
    spec = REGISTRY[name]
    beta = float(spec.hparams["beta"].default) if "beta" in spec.hparams else 1.0
    margin = torch.tensor([[4.0, -4.0, 0.0, -4.0]]).repeat(2, 1) / max(beta, 1.0)
    rho = torch.zeros(2, 4) if spec.monotone else margin
    batch, leaf = make_batch(spec, rho, ref=-6.0)
    (grad,) = torch.autograd.grad(call(spec, batch).losses.sum(), leaf)
    tiny = 1e-6 * float(grad.abs().max())
    if spec.kind == "unpaired":  # example 0 desirable, example 1 undesirable (make_batch labels)
        assert grad[0, 0] < 0 and grad[1, 0] > 0, grad
    else:
        assert (grad[:, 0] <= tiny).all(), grad
        assert (grad[:, -1] >= 0).all(), grad
        assert (grad[:, 0] - grad[:, -1] < 0).all(), grad
