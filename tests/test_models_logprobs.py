"""Packed prefix-shared log-probs and gradients equal separate unpadded forward passes, per architecture."""

from __future__ import annotations

import random
import warnings

import pytest
import torch

from preftune.errors import DataError
from preftune.models.load import LoraSettings, load_causal_lm
from preftune.models.logprobs import example_stats, sequence_logps
from preftune.models.packing import build_packed, packing_support
from preftune.models.tiny import TINY_ARCHS, save_tiny_model
from preftune.types import Example

VOCAB = 96


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    # A large init scale makes attention sharp, so a masking mistake moves log-probs by ≫ 1e-5.
    return {
        a: save_tiny_model(a, root / a, vocab_size=VOCAB, config_overrides={"initializer_range": 0.3})
        for a in TINY_ARCHS
    }


def _data(seed: int = 0):
    """Prompts of 3–30 tokens with K = 2, 1, 3, 2 responses of 1–19 tokens (lengths cross sliding windows)."""
    rng = random.Random(seed)
    prompts = [[1] + [rng.randrange(3, VOCAB) for _ in range(rng.randrange(2, 30))] for _ in range(4)]
    responses = [
        [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(1, 20))] for _ in range(k)]
        for k in (2, 1, 3, 2)
    ]
    return prompts, responses


def _separate(model, prompts, responses, temperature=1.0):
    """Reference: one unpadded forward per (prompt, response), full logits, log_softmax, gather."""
    out = []
    for prompt, branches in zip(prompts, responses):
        rows = []
        for resp in branches:
            logits = model(input_ids=torch.tensor([prompt + resp])).logits[0].float() / temperature
            logp = logits.log_softmax(-1)[len(prompt) - 1 : -1]
            rows.append(logp.gather(-1, torch.tensor(resp)[:, None]).squeeze(-1))
        out.append(rows)
    return out


def _grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_packed_and_padded_equal_separate_forwards(model_dirs, arch):
    model = load_causal_lm(model_dirs[arch])
    prompts, responses = _data()
    # a budget of 70 tokens puts several examples (of different K) into one row
    packed = build_packed(prompts, responses, max_tokens_per_row=70)
    assert packed.input_ids.shape[0] < len(prompts)
    ref = _separate(model, prompts, responses)
    weights = torch.linspace(0.5, 1.5, sum(len(b) for b in responses))  # distinct weight per sequence
    ref_loss = (torch.stack([r.sum() for rows in ref for r in rows]) * weights).sum()
    ref_grads = _grads(model, ref_loss)
    for pack in (True, False):
        sums, tokens = sequence_logps(
            model, prompts, responses, pack=pack, token_logps=True, max_tokens_per_row=70
        )
        for i, rows in enumerate(ref):
            assert sums[i].shape == (len(rows),)
            for k, r in enumerate(rows):
                torch.testing.assert_close(tokens[i][k, : len(r)], r, atol=1e-5, rtol=0)
                assert torch.all(tokens[i][k, len(r) :] == 0)
                torch.testing.assert_close(sums[i][k], r.sum(), atol=1e-5, rtol=1e-6)
        grads = _grads(model, (torch.cat(sums) * weights).sum())
        for g, rg in zip(grads, ref_grads):
            # float32 sums of ~100 terms: compare to 1e-5 relative to the gradient tensor's scale
            assert (g - rg).abs().max() <= 1e-5 * max(1.0, rg.abs().max().item())


def test_context_changes_logps_so_the_equality_test_has_power(model_dirs):
    """If a branch could see its sibling, its log-probs would move by far more than the 1e-5 tolerance."""
    model = load_causal_lm(model_dirs["llama"])
    prompts, responses = _data()
    p, (b0, b1) = prompts[0], responses[0]
    alone = _separate(model, [p], [[b1]])[0][0]
    after_sibling = _separate(model, [p + b0], [[b1]])[0][0]
    assert (alone - after_sibling).abs().max() > 1e-2


def test_temperature_and_gemma2_softcap(model_dirs):
    model = load_causal_lm(model_dirs["gemma2"])
    assert model.config.final_logit_softcapping == 5.0
    prompts, responses = _data(1)
    ref = _separate(model, prompts, responses, temperature=0.7)  # HF logits already soft-capped
    sums = sequence_logps(model, prompts, responses, temperature=0.7)
    for i, rows in enumerate(ref):
        torch.testing.assert_close(sums[i], torch.stack([r.sum() for r in rows]), atol=1e-5, rtol=1e-6)
    # soft-capped logits lie in (-5, 5): a token's log-prob is above log(e^-5 / (e^-5 + (V-1)e^5))
    floor = -10.0 - torch.log(torch.tensor(float(VOCAB - 1)))
    assert all(
        bool((s > floor * torch.tensor([len(r) for r in resp])).all())
        for s, resp in zip(sequence_logps(model, prompts, responses), responses)
    )


def test_example_stats_flat_order_lengths_and_token_matrix(model_dirs):
    model = load_causal_lm(model_dirs["qwen2"])
    prompts, responses = _data(2)
    examples = [
        Example(prompt_ids=p, response_ids=r, kind="ranked" if len(r) > 2 else "pairwise")
        for p, r in zip(prompts, responses)
    ]
    stats = example_stats(model, examples, token_logps=True, max_tokens_per_row=50)
    flat = [r for rs in responses for r in rs]
    assert stats.lengths.tolist() == [len(r) for r in flat]
    assert stats.token_logps is not None and stats.token_logps.shape == (len(flat), max(map(len, flat)))
    torch.testing.assert_close(stats.token_logps.sum(1), stats.logps)
    ref = [r.sum() for rows in _separate(model, prompts, responses) for r in rows]
    torch.testing.assert_close(stats.logps, torch.stack(ref), atol=1e-5, rtol=1e-6)
    assert stats.logps.requires_grad


def test_chunking_does_not_change_values(model_dirs):
    model = load_causal_lm(model_dirs["gpt2"])
    prompts, responses = _data(3)
    examples = [Example(prompt_ids=p, response_ids=r) for p, r in zip(prompts, responses)]
    whole = example_stats(model, examples)
    chunked = example_stats(model, examples, chunk_tokens=3)
    torch.testing.assert_close(chunked.logps, whole.logps, atol=1e-5, rtol=1e-6)


def test_unsupported_architecture_falls_back_to_padding_with_reason(model_dirs):
    model = load_causal_lm(model_dirs["llama"])
    prompts, responses = _data()
    expected = sequence_logps(model, prompts, responses, pack=False)
    model.config.model_type = "unverified_arch"
    assert "unverified_arch" in (packing_support(model.config) or "")
    with pytest.warns(RuntimeWarning, match="padded rows: model type 'unverified_arch'"):
        got = sequence_logps(model, prompts, responses)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    model.config.model_type = "llama"
    model.config._attn_implementation = "flash_attention_2"
    assert "flash_attention_2" in (packing_support(model.config) or "")


def test_lora_and_gradient_checkpointing_keep_values(model_dirs):
    plain = load_causal_lm(model_dirs["mistral"])
    prompts, responses = _data(4)
    expected = sequence_logps(plain, prompts, responses)
    model = load_causal_lm(
        model_dirs["mistral"], lora=LoraSettings(r=4, alpha=8.0), gradient_checkpointing=True
    )
    model.train()  # checkpointing is active in train mode only; dropout is 0
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback: packing works through PEFT
        got = sequence_logps(model, prompts, responses)
    for g, e in zip(got, expected):  # LoRA's B starts at zero, so the adapted model equals the base
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-6)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    ref = _separate(model, prompts, responses)
    ref_grads = _grads(model, torch.stack([r.sum() for rows in ref for r in rows]).sum())
    for g, rg in zip(_grads(model, torch.cat(got).sum()), ref_grads):
        assert (g - rg).abs().max() <= 1e-5 * max(1.0, rg.abs().max().item())
    assert any(g.abs().max() > 0 for g in ref_grads)  # lora_B gets a gradient even at B = 0


def test_empty_batch_and_empty_response(model_dirs):
    model = load_causal_lm(model_dirs["gpt2"])
    stats = example_stats(model, [], token_logps=True)
    assert stats.logps.shape == (0,) and stats.lengths.shape == (0,)
    prompts, responses = [[1, 5, 6]], [[[7, 8], []]]
    for pack in (True, False):
        sums = sequence_logps(model, prompts, responses, pack=pack)[0]
        assert sums[1].item() == 0.0  # an empty response has log-prob log 1 = 0
        torch.testing.assert_close(sums[0], _separate(model, prompts, [[[7, 8]]])[0][0].sum())


def test_empty_prompt_is_a_data_error(model_dirs):
    model = load_causal_lm(model_dirs["llama"])
    with pytest.raises(DataError, match="row 7: field 'prompt_ids': empty prompt"):
        example_stats(model, [Example(prompt_ids=[], response_ids=[[4, 5]], source_row=7)])


def _peak_bytes(fn) -> int:
    """Peak of live CPU tensor bytes while `fn` runs, from the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def test_chunked_peak_memory_is_a_small_fraction_of_full_logits_at_128k_vocab():
    from transformers import AutoModelForCausalLM, LlamaConfig

    vocab = 128_000
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (8,), generator=g).tolist() for _ in range(4)]
    responses = [[torch.randint(3, vocab, (32,), generator=g).tolist() for _ in range(2)] for _ in range(4)]

    def chunked():
        torch.cat(sequence_logps(model, prompts, responses)).sum().backward()

    def full_logits():  # the usual path: [rows, T, V] logits, log_softmax, gather
        ids = torch.tensor([p + r for p, rs in zip(prompts, responses) for r in rs])
        logp = model(input_ids=ids).logits.float().log_softmax(-1)[:, 7:-1]
        logp.gather(-1, ids[:, 8:, None]).sum().backward()

    model.zero_grad(set_to_none=False)  # weight gradients allocated up front: not part of either peak
    ratio = _peak_bytes(chunked) / _peak_bytes(full_logits)
    # 256 response tokens × 128k × 4 B = 131 MB of logits per copy in the full path; chunks of
    # 2^22 elements (32 tokens) keep each copy at 16 MiB, and the softmax kept from forward to
    # backward is capped at 4 float32 copies of the head weight (128k × 32 × 4 B × 4 = 65.5 MB: 3
    # chunks here). Measured ≈ 0.10 keeping none, ≈ 0.235 with the cap.
    print(f"chunked / full-logits peak memory at vocab 128k: {ratio:.3f}")
    assert ratio < 0.25


def test_frozen_head_path_gives_the_same_gradients(model_dirs):
    """LoRA-style frozen head (gemma2: tied, soft-capped, temperature 0.7): no recomputation, same grads."""
    from preftune.models.logprobs import LogitTransform, chunked_token_logps

    model = load_causal_lm(model_dirs["gemma2"])
    model.get_input_embeddings().weight.requires_grad_(False)  # tied: freezes the head too
    head = model.get_output_embeddings()
    h = torch.randn(7, 32, requires_grad=True)
    out = chunked_token_logps(h, torch.arange(7) + 3, head, LogitTransform(model.config, 0.7), chunk_tokens=3)
    assert out.grad_fn is not None and "FrozenHeadLogps" in type(out.grad_fn).__name__
    prompts, responses = _data(5)
    ref = _separate(model, prompts, responses, temperature=0.7)
    weights = torch.linspace(0.5, 1.5, sum(len(b) for b in responses))
    ref_grads = _grads(model, (torch.stack([r.sum() for rows in ref for r in rows]) * weights).sum())
    sums = sequence_logps(model, prompts, responses, temperature=0.7)
    for s, rows in zip(sums, ref):
        torch.testing.assert_close(s, torch.stack([r.sum() for r in rows]), atol=1e-5, rtol=1e-6)
    for g, rg in zip(_grads(model, (torch.cat(sums) * weights).sum()), ref_grads):
        assert (g - rg).abs().max() <= 1e-5 * max(1.0, rg.abs().max().item())


@pytest.mark.parametrize("keep_chunks", [0, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_trainable_head_keeps_lse_only_and_gives_the_same_gradients(dtype, keep_chunks):
    """The hand-written backward of a plain linear head (logit scale 2, temperature 0.7, chunks of 4
    over 13 tokens) equals autograd through full log_softmax + gather, values and both gradients —
    recomputing every chunk (keep 0), keeping the first 2 chunks' softmax, or all 4 (the last is 1 token)."""
    from types import SimpleNamespace

    from preftune.models.logprobs import LogitTransform, _chunk_logps, chunked_token_logps

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).to(dtype)
    transform = LogitTransform(SimpleNamespace(logit_scale=2.0), temperature=0.7)
    hidden = torch.randn(13, 16, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 50, (13,))
    weights = torch.linspace(-1.0, 2.0, 13, dtype=torch.float32)

    keep = keep_chunks * 4 * 50 * 4  # bytes of that many chunks' float32 softmax (4 tokens × 50)
    out = chunked_token_logps(hidden, targets, head, transform, chunk_tokens=4, keep_bytes=keep)
    assert "HeadLogps" in type(out.grad_fn).__name__
    kept = [t for t in out.grad_fn.saved_tensors if t.shape[-1] == 50 and t.shape[0] <= 4]
    assert len(kept) == keep_chunks
    got = torch.autograd.grad((out * weights).sum(), [hidden, head.weight], retain_graph=True)
    if keep_chunks:  # backward wrote G over the kept p: a second backward is refused, never wrong
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            torch.autograd.grad((out * weights).sum(), [hidden, head.weight])
    else:  # nothing kept, nothing overwritten: backward runs again, bit for bit
        again = torch.autograd.grad((out * weights).sum(), [hidden, head.weight])
        assert all(torch.equal(g, g2) for g, g2 in zip(got, again))
    ref_out = _chunk_logps(hidden, targets, head, transform)  # one chunk, plain autograd
    ref = torch.autograd.grad((ref_out * weights).sum(), [hidden, head.weight])
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    for g, r in zip(got, ref):
        assert g.dtype == r.dtype and (g - r).abs().max() <= 1e-5
    with torch.no_grad():  # a reference / evaluation pass: the same arithmetic, bit for bit
        plain = chunked_token_logps(hidden, targets, head, transform, chunk_tokens=4, keep_bytes=keep)
    assert torch.equal(plain, out.detach())


def test_softcapped_or_biased_heads_keep_the_checkpointed_path():
    from types import SimpleNamespace

    from preftune.models.logprobs import LogitTransform, chunked_token_logps

    hidden = torch.randn(5, 8, requires_grad=True)
    capped = LogitTransform(SimpleNamespace(final_logit_softcapping=30.0))
    for head, transform in (
        (torch.nn.Linear(8, 20, bias=False), capped),
        (torch.nn.Linear(8, 20, bias=True), LogitTransform(SimpleNamespace())),
    ):
        out = chunked_token_logps(hidden, torch.arange(5), head, transform, chunk_tokens=2)
        assert "HeadLogps" not in type(out.grad_fn).__name__


def _head_micro_batches(weight: torch.nn.Parameter, n: int = 3, chunk: int = 4) -> list[torch.Tensor]:
    """n micro-batches through `HeadLogps` (13 tokens in chunks of 4, the first 2 chunks' softmax kept,
    logit scale 1/0.7), each backward into `weight.grad`; the grad after each, cloned."""
    from preftune.models.head_logps import HeadLogps

    after = []
    for i in range(n):
        g = torch.Generator().manual_seed(10 + i)
        hidden = torch.randn(13, weight.shape[1], generator=g)
        targets = torch.randint(0, weight.shape[0], (13,), generator=g)
        coef = torch.linspace(-1.0, 2.0, 13) * (i + 1)
        out = HeadLogps.apply(hidden, targets, weight, 1 / 0.7, chunk, 2 * chunk * weight.shape[0] * 4)
        (out * coef).sum().backward()
        after.append(weight.grad.clone())
    return after


def _float64_head_grad(weight: torch.Tensor, n: int = 3) -> torch.Tensor:
    """Σ over the n micro-batches of ∂/∂W of Σ coef · log softmax(h Wᵀ / 0.7)[y], in float64 autograd."""
    w = weight.detach().double().requires_grad_()
    total = torch.zeros((), dtype=torch.float64)
    for i in range(n):
        g = torch.Generator().manual_seed(10 + i)
        hidden = torch.randn(13, weight.shape[1], generator=g).double()
        targets = torch.randint(0, weight.shape[0], (13,), generator=g)
        coef = torch.linspace(-1.0, 2.0, 13).double() * (i + 1)
        logp = (hidden @ w.t() / 0.7).log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
        total = total + (logp * coef).sum()
    (grad,) = torch.autograd.grad(total, w)
    return grad


def test_head_weight_gradient_goes_straight_into_grad_and_accumulates_exactly():
    """Under `grads_into_params` the head's backward adds ∂W into the existing `.grad` (and hands
    autograd nothing for W); the first micro-batch (no `.grad` yet) is the old path bit for bit, the
    later ones equal autograd's `.grad += fresh` to float32 rounding, and three micro-batches equal
    the float64 gradient of their sum."""
    from preftune.models.direct_grads import grads_into_params
    from preftune.models.head_logps import HeadLogps

    torch.manual_seed(0)
    start = torch.randn(50, 16)
    old_w, new_w = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    old = _head_micro_batches(old_w)
    with grads_into_params():
        new = _head_micro_batches(new_w)
        grad_buffer = new_w.grad
        # the node itself: no gradient for W returned, W.grad raised by exactly what the old path returns
        hidden, targets = torch.randn(5, 16), torch.randint(0, 50, (5,))
        out = HeadLogps.apply(hidden, targets, new_w, 1.0, 4, 0)
        before = new_w.grad.clone()
        with torch.no_grad():
            returned = out.grad_fn.apply(torch.ones(5))
        assert returned[2] is None and new_w.grad is grad_buffer
        added = new_w.grad - before
    assert torch.equal(new[0], old[0])
    scale = float(old[-1].abs().max())
    for n, o in zip(new, old):
        assert (n - o).abs().max() <= 1e-6 * scale
    exact = _float64_head_grad(start)
    assert (new[-1].double() - exact).abs().max() <= 2e-6 * float(exact.abs().max())
    out = HeadLogps.apply(hidden, targets, old_w, 1.0, 4, 0)
    (fresh,) = torch.autograd.grad(out.sum(), old_w)  # the old path's gradient of the same call
    torch.testing.assert_close(added, fresh, atol=1e-6 * float(fresh.abs().max()), rtol=0)


def test_head_weight_gradient_keeps_autograd_where_direct_is_not_safe():
    """The old path (a fresh gradient returned to autograd) outside `grads_into_params`, for a weight
    with a post-accumulate hook (what DDP/FSDP-style reducers use: it must see every gradient), and
    for a float64 weight; `torch.autograd.grad` never touches `.grad`."""
    from preftune.models.direct_grads import grads_into_params
    from preftune.models.head_logps import HeadLogps

    def call(weight: torch.nn.Parameter) -> torch.Tensor:
        out: torch.Tensor = HeadLogps.apply(
            torch.randn(6, 8, dtype=weight.dtype), torch.arange(6), weight, 1.0, 4, 0
        )
        return out

    hooked = torch.nn.Parameter(torch.randn(20, 8))
    seen = []
    hooked.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.clone()))
    wide = torch.nn.Parameter(torch.randn(20, 8, dtype=torch.float64))
    with grads_into_params():
        for weight in (hooked, wide):
            for _ in range(2):
                call(weight).sum().backward()
                node = call(weight).grad_fn
                with torch.no_grad():
                    returned = node.apply(torch.ones(6))
                assert returned[2] is not None  # W's gradient handed to autograd
    assert len(seen) == 2 and not torch.equal(seen[0], seen[1])
    plain = torch.nn.Parameter(torch.randn(20, 8))
    plain.grad = torch.zeros_like(plain)
    (grad,) = torch.autograd.grad(call(plain).sum(), plain)
    assert grad.abs().max() > 0 and torch.equal(plain.grad, torch.zeros_like(plain))
