"""The reserved KV cache of decoding (`preftune.generation.reserve_kv`): each step writes its position
into room reserved ahead instead of concatenating, and everything decoded is bit-identical to
transformers' concatenating cache."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

import preftune.generation as generation
from preftune.generation import generate, reserve_kv
from preftune.rl import RolloutEngine, Sampling

VOCAB = 50

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention: keys and values repeated inside attention
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg).eval()


PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [20], [8, 30, 31, 4, 4]]


@pytest.fixture
def concatenating(monkeypatch: pytest.MonkeyPatch):
    """Run a callable with transformers' own concatenating cache."""

    def run(fn):
        with monkeypatch.context() as m:
            m.setattr(generation, "_RESERVE_KV", False)
            return fn()

    return run


@pytest.mark.parametrize("share_prefill", [True, False])
def test_rollouts_are_bit_identical_to_the_concatenating_cache(model, concatenating, share_prefill) -> None:
    engine = RolloutEngine(model, VOCAB + 1, batch_rows=12)  # EOS never emitted: every row runs 40 steps
    sampling = Sampling(max_new_tokens=40, temperature=1.0, top_p=0.9, seed=3)
    got = engine.generate(PROMPTS, 3, sampling, share_prefill=share_prefill)
    ref = concatenating(lambda: engine.generate(PROMPTS, 3, sampling, share_prefill=share_prefill))
    assert got.completion_ids.shape == (12, 40)
    assert torch.equal(got.completion_ids, ref.completion_ids)
    assert torch.equal(got.logps, ref.logps)
    assert torch.equal(got.min_logits, ref.min_logits)


def test_generate_is_bit_identical_to_the_concatenating_cache(model, concatenating) -> None:
    for temperature in (0.0, 1.0):
        kwargs = dict(num_samples=2, max_new_tokens=30, temperature=temperature, seed=1, batch_size=5)
        got = generate(model, VOCAB + 1, PROMPTS, **kwargs)
        assert got == concatenating(lambda kw=kwargs: generate(model, VOCAB + 1, PROMPTS, **kw))
        assert all(len(s) == 30 for g in got for s in g)


def _prefilled_layer(length: int) -> DynamicLayer:
    layer = DynamicLayer()
    layer.update(torch.randn(2, 3, length, 4), torch.randn(2, 3, length, 5))
    return layer


def test_layer_grows_by_doubling_up_to_its_limit_then_concatenates() -> None:
    torch.manual_seed(0)
    plain, cache = _prefilled_layer(3), DynamicCache()
    cache.layers = [generation._ReservedLayer(plain, 3 + 5)]  # type: ignore[attr-defined]
    reserved = cache.layers[0]
    assert torch.equal(reserved.keys, plain.keys) and torch.equal(reserved.values, plain.values)
    sizes = []
    for step in range(7):  # 5 positions within the limit, then 2 beyond it
        k, v = torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 5)
        want_k, want_v = plain.update(k, v)
        got_k, got_v = reserved.update(k, v)
        assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v), step
        assert reserved.get_seq_length() == 3 + step + 1
        sizes.append(reserved._k.shape[-2])
    # 6 = twice the prompt's 3, then the limit 8; past it the layer concatenates (buffer left behind)
    assert sizes == [6, 6, 6, 8, 8, 8, 8]
    assert reserved.keys.data_ptr() != reserved._k.data_ptr()


def test_a_layer_resized_elsewhere_falls_back_to_concatenation() -> None:
    torch.manual_seed(1)
    plain = _prefilled_layer(4)
    reserved = generation._ReservedLayer(plain, 20)  # (a copy of plain's positions in its buffer)
    reserved.batch_select_indices(torch.tensor([1]))
    plain.batch_select_indices(torch.tensor([1]))
    k, v = torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 5)
    got, want = reserved.update(k, v), plain.update(k, v)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert got[0].shape == (1, 3, 5, 4)


def test_only_plain_dynamic_layers_are_reserved(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = DynamicCache()
    window = DynamicSlidingWindowLayer(sliding_window=4)
    window.update(torch.randn(1, 1, 3, 2), torch.randn(1, 1, 3, 2))
    empty = DynamicLayer()
    cache.layers = [_prefilled_layer(2), window, empty]
    reserve_kv(cache, 10)
    assert [type(layer) for layer in cache.layers] == [
        generation._ReservedLayer,
        DynamicSlidingWindowLayer,
        DynamicLayer,
    ]
    assert cache.layers[0]._k.shape[-2] == 4 and cache.layers[0].limit == 12
    monkeypatch.setattr(generation, "_RESERVE_KV", False)
    again = DynamicCache()
    again.layers = [_prefilled_layer(2)]
    assert type(reserve_kv(again, 10).layers[0]) is DynamicLayer
    assert type(reserve_kv(DynamicCache(), 0)) is DynamicCache
