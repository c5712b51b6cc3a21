"""Weight gradients added straight into `.grad` (`preftune.models.direct_grads`): the input embedding's
backward equals `nn.Embedding`'s (padding row included), and a trainer step with one pair per
micro-batch gives the gradients of autograd's own accumulation, to float32 rounding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import preftune.models.direct_grads as dg
from preftune.models.direct_grads import EmbeddingRows, embedding_inputs, grads_into_params

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("padding_idx", [None, 3])
def test_embedding_rows_accumulate_like_nn_embedding(padding_idx):
    """Three micro-batches (token 3 repeated, so rows are summed) through `EmbeddingRows` under
    `grads_into_params` equal `nn.Embedding` with autograd's accumulation: the first bit for bit (no
    `.grad` yet: torch's own backward), the sum to float32 rounding and to the float64 sum; the
    padding row's gradient stays 0."""
    torch.manual_seed(0)
    ref = torch.nn.Embedding(20, 6, padding_idx=padding_idx)
    weight = torch.nn.Parameter(ref.weight.detach().clone())
    exact = torch.zeros(20, 6, dtype=torch.float64)
    for i in range(3):
        g = torch.Generator().manual_seed(i)
        ids = (
            torch.tensor([[3, 5, 3, 7], [1, 3, 3, 19]])
            if i == 0
            else torch.randint(0, 20, (2, 5), generator=g)
        )
        coef = torch.randn(*ids.shape, 6, generator=g)
        (ref(ids) * coef).sum().backward()
        with grads_into_params():
            out = EmbeddingRows.apply(ids, weight, -1 if padding_idx is None else padding_idx)
            (out * coef).sum().backward()
        exact.index_add_(0, ids.reshape(-1), coef.reshape(-1, 6).double())
        if i == 0:
            assert torch.equal(weight.grad, ref.weight.grad)
    if padding_idx is not None:
        exact[padding_idx] = 0
        assert torch.equal(weight.grad[padding_idx], torch.zeros(6))
    torch.testing.assert_close(weight.grad, ref.weight.grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(weight.grad.double(), exact, atol=1e-6, rtol=1e-6)


def test_embedding_inputs_only_for_a_trainable_plain_embedding():
    ids = torch.tensor([[1, 2]])
    plain = torch.nn.Module()
    plain.get_input_embeddings = lambda: torch.nn.Embedding(5, 4)  # type: ignore[method-assign]
    assert "inputs_embeds" in embedding_inputs(plain, ids)
    with torch.no_grad():
        assert set(embedding_inputs(plain, ids)) == {"input_ids"}
    frozen = torch.nn.Embedding(5, 4).requires_grad_(False)
    capped = torch.nn.Embedding(5, 4, max_norm=1.0)
    for embed in (frozen, capped):
        other = torch.nn.Module()
        other.get_input_embeddings = lambda e=embed: e  # type: ignore[method-assign]
        assert set(embedding_inputs(other, ids)) == {"input_ids"}


def _step_grads(policy: Path, ref: Any, data: list[Any], *, micro: int) -> dict[str, torch.Tensor]:
    from test_train_batch_statistics import objective, step

    return step(policy, ref, objective("dpo"), data, micro=micro)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_trainer_step_adds_head_and_embedding_gradients_into_grad(tmp_path, monkeypatch, arch):
    """DPO on 4 pairs, one pair per micro-batch (Llama untied, Qwen2 with the head tied to the
    embedding: both add into the one `.grad`): the head and the embedding add into
    `.grad` in the three later micro-batches, and every gradient equals the step with the old path
    (`_DIRECT_GRADS` off) and the step with all 4 pairs in one micro-batch, to float32 rounding."""
    from preftune.models.load import load_causal_lm
    from preftune.models.reference import ModelReference
    from test_train_batch_statistics import assert_equal_grads
    from test_train_exactness import examples
    from test_train_fixtures import tiny_model

    policy = tiny_model(tmp_path / "policy", arch=arch, seed=0)
    ref = ModelReference(load_causal_lm(tiny_model(tmp_path / "ref", arch=arch, seed=1)))
    data = examples(4, seed=3)
    calls: list[bool] = []
    original = dg.direct_grad

    def counting(weight: torch.Tensor) -> torch.Tensor | None:
        out = original(weight)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(dg, "direct_grad", counting)
    direct = _step_grads(policy, ref, data, micro=1)
    assert calls.count(True) == 6 and calls.count(False) == 2  # head + embedding, micro-batches 2–4
    monkeypatch.setattr(dg, "_DIRECT_GRADS", False)
    calls.clear()
    old = _step_grads(policy, ref, data, micro=1)
    assert calls.count(True) == 0 and len(calls) == 8
    assert_equal_grads(old, direct)
    assert_equal_grads(_step_grads(policy, ref, data, micro=4), direct)
