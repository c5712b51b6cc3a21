"""KTO's z₀ and BCO's δ are statistics of the whole global batch (all micro-batches, all ranks): the
gradient of one step is the same for 1 micro-batch × 8, 4 × 2 and 2 ranks × 4 (ranks simulated
in one process: each rank's pre-pass sums are added, as the all-reduce would)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from preftune.config import load_config, validate
from preftune.models.load import load_causal_lm
from preftune.models.reference import ModelReference
from preftune.train.batches import adapt_examples, objective_kind
from preftune.train.distributed import World
from preftune.train.loop import Objective, objective_on_batch, statistic_states, statistic_sums
from preftune.types import Example
from test_train_exactness import examples
from test_train_fixtures import tiny_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelReference]:
    root = tmp_path_factory.mktemp("stats")
    policy = tiny_model(root / "policy", seed=0)
    ref = ModelReference(load_causal_lm(tiny_model(root / "ref", seed=1)))
    return policy, ref


def objective(method: str, **hparams: Any) -> Objective:
    c = load_config(None, {"model": "m", "data": "d", "out": "o", "method": method, "hparams": hparams})
    terms = validate(c)
    return Objective(terms, objective_kind(terms))


def step(
    policy: Path,
    ref: ModelReference,
    obj: Objective,
    data: list[Example],
    *,
    micro: int,
    world: World = World(),
    batch_states: dict[str, dict[str, torch.Tensor]] | None = None,
    loss_state: dict[str, dict[str, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    model = load_causal_lm(policy)
    model.train()
    objective_on_batch(
        model,
        data,
        objective=obj,
        reference=ref,
        loss_state={} if loss_state is None else loss_state,
        world=world,
        micro_batch_size=micro,
        backward=True,
        batch_states=batch_states,
    )
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def two_ranks(
    policy: Path, ref: ModelReference, obj: Objective, data: list[Example]
) -> dict[str, torch.Tensor]:
    """Gradient SUM of two simulated ranks × 4; the statistic's sums added over ranks."""
    model = load_causal_lm(policy)
    ranks = [World(rank=r, size=2) for r in range(2)]
    parts = [
        statistic_sums(model, data, objective=obj, reference=ref, world=w, micro_batch_size=4) for w in ranks
    ]
    total = {name: {k: parts[0][name][k] + parts[1][name][k] for k in parts[0][name]} for name in parts[0]}
    states = statistic_states(obj, total, {})
    g0, g1 = (step(policy, ref, obj, data, micro=4, world=w, batch_states=states) for w in ranks)
    return {n: g0[n] + g1[n] for n in g0}


def assert_equal_grads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    scale = max(float(g.abs().max()) for g in a.values())
    assert scale > 0
    for name, g in a.items():
        torch.testing.assert_close(b[name], g, atol=1e-6 * scale, rtol=1e-6)


def unpaired_data() -> list[Example]:
    return adapt_examples(examples(4, seed=5), "unpaired", mismatched=True)


def test_kto_gradient_does_not_depend_on_micro_batches_or_ranks(setup: tuple[Path, ModelReference]) -> None:
    policy, ref = setup
    obj, data = objective("kto"), unpaired_data()
    assert len(data) == 8
    # z₀ differs between micro-batches here, so a per-micro-batch z₀ would change the gradient
    from preftune.losses.unpaired_losses import kto_reference_point

    sums = statistic_sums(
        load_causal_lm(policy), data, objective=obj, reference=ref, world=World(), micro_batch_size=8
    )
    z0 = float(kto_reference_point({k: torch.tensor(v) for k, v in sums["kto"].items()}))
    per_micro = [
        statistic_sums(
            load_causal_lm(policy),
            data[i : i + 2],
            objective=obj,
            reference=ref,
            world=World(),
            micro_batch_size=2,
        )
        for i in range(0, 8, 2)
    ]
    z0s = [float(kto_reference_point({k: torch.tensor(v) for k, v in p["kto"].items()})) for p in per_micro]
    assert z0 > 0 and max(abs(z - z0) for z in z0s) > 1e-3, (z0, z0s)

    full = step(policy, ref, obj, data, micro=8)
    assert_equal_grads(full, step(policy, ref, obj, data, micro=2))
    assert_equal_grads(full, two_ranks(policy, ref, obj, data))
    local = step(policy, ref, obj, data, micro=2, batch_states={})  # each micro-batch's own z₀
    assert any(not torch.allclose(local[n], full[n], rtol=1e-4, atol=0) for n in full)


def test_bco_delta_is_updated_once_per_step_with_the_global_batch(setup: tuple[Path, ModelReference]) -> None:
    """δ after the step is the mean βρ of all 16 responses (one update, count 16), whatever the split,
    and the gradient is the same for 1 × 8, 4 × 2 and 2 ranks × 4."""
    policy, ref = setup
    obj, data = objective("bco"), examples(8, seed=2)
    state_full: dict[str, dict[str, torch.Tensor]] = {}
    full = step(policy, ref, obj, data, micro=8, loss_state=state_full)
    state_acc: dict[str, dict[str, torch.Tensor]] = {}
    assert_equal_grads(full, step(policy, ref, obj, data, micro=2, loss_state=state_acc))
    assert_equal_grads(full, two_ranks(policy, ref, obj, data))
    assert float(state_full["bco"]["count"]) == float(state_acc["bco"]["count"]) == 16
    torch.testing.assert_close(state_acc["bco"]["delta"], state_full["bco"]["delta"])
    with torch.no_grad():
        from preftune.models.logprobs import example_stats

        pol, rf = example_stats(load_causal_lm(policy), data), ref.stats(data)
    mean_reward = float((0.1 * (pol.logps - rf.logps)).double().mean())
    assert float(state_full["bco"]["delta"]) == pytest.approx(mean_reward, rel=1e-5, abs=1e-7)


def test_wpo_weighting_reaches_the_trainer(setup: tuple[Path, ModelReference]) -> None:
    """`hparams: {wpo_weighting: true}` on dpo: the step's loss is Σ_i w_i·dpo_i / E with
    w_i = exp(ℓ_w + ℓ_l) from the policy's own statistics (the loop calls LossSpec.run)."""
    from preftune import losses
    from preftune.models.logprobs import example_stats

    policy, ref = setup
    data = examples(8, seed=3)
    model = load_causal_lm(policy)
    sums = objective_on_batch(
        model,
        data,
        objective=objective("dpo", wpo_weighting=True),
        reference=ref,
        loss_state={},
        world=World(),
        micro_batch_size=4,
        backward=False,
    )
    with torch.no_grad():
        pol, rf = example_stats(model, data), ref.stats(data)
    p, r, n = pol.logps.view(8, 2), rf.logps.view(8, 2), pol.lengths.view(8, 2).float()
    dpo = losses.pairwise("dpo", p[:, 0], p[:, 1], r[:, 0], r[:, 1])
    expected = float((dpo * torch.exp(p[:, 0] / n[:, 0] + p[:, 1] / n[:, 1])).sum() / 8)
    assert sums.totals["loss"] == pytest.approx(expected, rel=1e-5)
    assert expected < float(dpo.mean()) / 2  # the weights matter here
