"""docs/algorithms.md §6: one step of batch 8 = 4 micro-batches of 2 = 2 ranks × 4, to float tolerance,
including a token-level term (sft) normalised by the global token count."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from preftune.config import load_config, validate
from preftune.models.load import load_causal_lm
from preftune.models.reference import ModelReference
from preftune.train.batches import objective_kind
from preftune.train.distributed import World
from preftune.train.loop import Objective, objective_on_batch
from preftune.types import Example
from test_train_fixtures import tiny_model


def examples(n: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)

    def ids(k: int) -> list[int]:
        return [rng.randint(4, 47) for _ in range(k)]

    return [
        Example(ids(rng.randint(2, 6)), [ids(rng.randint(1, 7)), ids(rng.randint(1, 7))]) for _ in range(n)
    ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelReference]:
    root = tmp_path_factory.mktemp("exact")
    policy = tiny_model(root / "policy", seed=0)
    ref = ModelReference(load_causal_lm(tiny_model(root / "ref", seed=1)))
    return policy, ref


def grads(
    policy: Path, ref: ModelReference, method: str, data: list[Example], *, micro: int, world: World = World()
) -> tuple[dict[str, torch.Tensor], float]:
    model = load_causal_lm(policy)
    model.train()
    c = load_config(None, {"model": "m", "data": "d", "out": "o", "method": method})
    terms = validate(c)
    objective = Objective(terms, objective_kind(terms))
    sums = objective_on_batch(
        model,
        data,
        objective=objective,
        reference=ref,
        loss_state={},
        world=world,
        micro_batch_size=micro,
        backward=True,
    )
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, sums.totals["loss"]


def test_accumulation_and_ranks_match_one_big_batch(setup: tuple[Path, ModelReference]) -> None:
    policy, ref = setup
    method = "dpo:1.0,sft:0.5"  # an example-level and a token-level term
    data = examples(8)
    full, loss_full = grads(policy, ref, method, data, micro=8)
    acc, loss_acc = grads(policy, ref, method, data, micro=2)
    r0, loss_0 = grads(policy, ref, method, data, micro=4, world=World(rank=0, size=2))
    r1, loss_1 = grads(policy, ref, method, data, micro=4, world=World(rank=1, size=2))
    assert loss_acc == pytest.approx(loss_full, rel=1e-5)
    assert loss_0 + loss_1 == pytest.approx(loss_full, rel=1e-5)  # per-rank losses sum to the global one
    scale = max(float(g.abs().max()) for g in full.values())
    assert scale > 0
    for name, g in full.items():
        torch.testing.assert_close(acc[name], g, atol=1e-5 * scale, rtol=1e-4)
        torch.testing.assert_close(r0[name] + r1[name], g, atol=1e-5 * scale, rtol=1e-4)


def test_token_term_uses_the_global_token_count(setup: tuple[Path, ModelReference]) -> None:
    """sft = Σ_e NLL_e / Σ_e |y_e| over the whole batch — not the mean of per-micro-batch means (the
    common bug), which differs here because micro-batches hold different token counts."""
    from preftune.models.logprobs import example_stats

    policy, ref = setup
    data = examples(8)
    _, loss = grads(policy, ref, "sft", data, micro=2)
    with torch.no_grad():
        st = example_stats(load_causal_lm(policy), data)
    nll, n = -st.logps[0::2].double(), st.lengths[0::2].double()
    assert loss == pytest.approx(float(nll.sum() / n.sum()), rel=1e-5)
    per_micro = [float(nll[i : i + 2].sum() / n[i : i + 2].sum()) for i in range(0, 8, 2)]
    assert abs(sum(per_micro) / 4 - loss) > 1e-4
