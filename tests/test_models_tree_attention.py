"""Segment-by-segment attention over packed rows equals the dense tree-mask path, values and gradients."""

from __future__ import annotations

import pytest
import torch

import preftune.models.logprobs as lp
from preftune.models.load import load_causal_lm
from preftune.models.packing import build_packed
from preftune.models.tiny import TINY_ARCHS, save_tiny_model
from preftune.models.tree_attention import row_units, tree_supported

VOCAB = 96

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_tree")
    # a large init scale makes attention sharp: a key seen by mistake moves outputs by ≫ 1e-5
    return {
        a: save_tiny_model(a, root / a, vocab_size=VOCAB, config_overrides={"initializer_range": 0.3})
        for a in TINY_ARCHS
    }


def _batch():
    g = torch.Generator().manual_seed(0)
    prompts = [[1, *torch.randint(3, VOCAB, (n,), generator=g).tolist()] for n in (12, 3, 25, 7)]
    lengths = [(5, 9), (1,), (14, 2, 8), (6, 6)]
    responses = [[torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in ks] for ks in lengths]
    return build_packed(prompts, responses, max_tokens_per_row=60)  # several examples per row, padding


def test_row_units_follow_the_packed_layout():
    batch = build_packed([[1, 5, 6], [1, 7]], [[[8, 9], [10]], [[11, 12, 13]]], max_tokens_per_row=64)
    # one row: prompt₀ (3) | b₀ (2) | b₁ (1) | prompt₁ (2) | b (3)
    assert row_units(batch) == [[(0, 3, [(3, 5), (5, 6)]), (6, 8, [(8, 11)])]]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tree_attention_equals_the_dense_mask(model_dirs, arch, monkeypatch):
    model = load_causal_lm(model_dirs[arch])
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    batch = _batch()
    assert batch.input_ids.shape[0] > 1 and (batch.example_ids < 0).any()  # several rows, padding
    real = (batch.example_ids >= 0)[..., None]

    def run(tree: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        monkeypatch.setattr(lp, "_TREE_ATTENTION", tree)
        hidden = lp.trunk_hidden_states(body, model.config, model.dtype, batch)
        weights = torch.linspace(-1.0, 1.0, hidden.shape[-1])
        loss = (hidden * real * weights).sum()
        params = [p for p in model.parameters() if p.requires_grad]
        return hidden.detach() * real, list(torch.autograd.grad(loss, params, allow_unused=True))

    dense, dense_grads = run(False)
    tree, tree_grads = run(True)
    assert tree_supported(model.config) == (arch in ("llama", "qwen2", "qwen3", "phi3", "gemma"))
    assert (tree - dense).abs().max() <= 1e-5 * max(1.0, dense.abs().max().item())
    for g, r in zip(tree_grads, dense_grads):
        if r is None:
            assert g is None
            continue
        assert (g - r).abs().max() <= 1e-5 * max(1.0, r.abs().max().item())


def test_gradient_checkpointing_keeps_the_dense_mask(model_dirs, monkeypatch):
    """Checkpointing re-runs the forward in backward, outside the tree-attention block: dense path."""
    calls = []
    monkeypatch.setattr(lp, "row_units", lambda b: calls.append(b) or row_units(b))
    for checkpointing, expected in ((False, 1), (True, 0)):
        model = load_causal_lm(model_dirs["llama"], gradient_checkpointing=checkpointing)
        model.train()
        calls.clear()
        hidden = lp.trunk_hidden_states(model.model, model.config, model.dtype, _batch())
        hidden.sum().backward()
        assert len(calls) == expected
