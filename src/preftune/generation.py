"""Batched sampling from a Hugging Face causal LM with a KV cache: the one generation helper.

Prompts of different lengths are left-padded into one batch; `position_ids` count real tokens only,
so a padded row gives the same tokens as the row alone. Each step feeds one token per row and the
model's `past_key_values`. Decoding: temperature τ scales the logits (τ = 0 is greedy argmax), then
nucleus (top-p) sampling keeps the smallest set of most-likely tokens whose probability sums to ≥ p
(Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration", §3.1). Rows stop at EOS.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from preftune.errors import ConfigError


def _eos_ids(tokenizer_or_eos: Any) -> list[int]:
    if isinstance(tokenizer_or_eos, int):
        return [tokenizer_or_eos]
    if isinstance(tokenizer_or_eos, Sequence) and not isinstance(tokenizer_or_eos, str):
        return [int(i) for i in tokenizer_or_eos]
    eos = getattr(tokenizer_or_eos, "eos_token_id", None)
    if eos is None:
        raise ConfigError("generate: the tokenizer has no eos_token_id; pass the EOS id(s) instead")
    return [int(eos)] if isinstance(eos, int) else [int(i) for i in eos]


def sample_next(
    logits: torch.Tensor, *, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Pick one token per row from logits [B, V] → ids [B] (greedy when temperature == 0)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens strictly more likely already reach top_p; the first is kept.
        drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _forward_params(model: torch.nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


# Decoding writes each step's keys and values into room reserved ahead (`reserve_kv`) instead of letting
# transformers' dynamic cache concatenate (False: its `torch.cat`; a benchmark lever).
_RESERVE_KV = True

try:  # transformers ≥ 4.56: a cache is a list of per-layer objects
    from transformers.cache_utils import DynamicLayer
except ImportError:  # pragma: no cover - older transformers: the cache concatenates
    DynamicLayer = None  # type: ignore[misc, assignment]


if DynamicLayer is not None:

    class _ReservedLayer(DynamicLayer):  # type: ignore[misc, valid-type]
        """A dynamic cache layer whose keys and values are the leading positions of a larger buffer.

        transformers' `DynamicLayer.update` concatenates the new token's keys and values to the cache, which
        copies the whole cache at every decoding step: O(L²) memory traffic for L positions, the bulk of
        a CPU rollout's time on long prompts. Here a step writes its position into the buffer and the cache
        is a view of the positions written so far (the attention sees the same values, in the same
        layout). When the buffer is full it grows to twice its size (at most `limit` positions), so the
        copies total O(L). A layer that something else replaced or resized falls back to concatenation.
        """

        def __init__(self, layer: Any, limit: int) -> None:
            super().__init__()
            self.device, self.is_initialized, self.limit = layer.keys.device, True, limit
            self._room(layer.keys, layer.values, min(limit, 2 * layer.keys.shape[-2]))

        def _room(self, keys: torch.Tensor, values: torch.Tensor, size: int) -> None:
            n = keys.shape[-2]
            self._k = keys.new_empty(*keys.shape[:-2], size, keys.shape[-1])
            self._v = values.new_empty(*values.shape[:-2], size, values.shape[-1])
            self._k[..., :n, :], self._v[..., :n, :] = keys, values
            self.keys, self.values = self._k[..., :n, :], self._v[..., :n, :]

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            keys, values = self.keys, self.values
            if (
                keys is None
                or values is None
                or keys.data_ptr() != self._k.data_ptr()
                or len(keys) != len(self._k)
            ):
                return super().update(key_states, value_states, *args, **kwargs)  # resized elsewhere
            n = keys.shape[-2]
            m = n + key_states.shape[-2]
            if m > self._k.shape[-2]:
                if m > self.limit:  # (more positions than reserved for: concatenate from here on)
                    return super().update(key_states, value_states, *args, **kwargs)
                self._room(keys, values, min(self.limit, max(m, 2 * self._k.shape[-2])))
            self._k[..., n:m, :], self._v[..., n:m, :] = key_states, value_states
            self.keys, self.values = self._k[..., :m, :], self._v[..., :m, :]
            return self.keys, self.values


def reserve_kv(cache: Any, new_tokens: int) -> Any:
    """Let `cache` (after the prefill) take up to `new_tokens` more positions per layer without
    concatenation (`_ReservedLayer`); layers of other kinds (sliding windows, quantized, ...) and caches
    of older transformers are left as they are. Returns `cache`."""
    layers = getattr(cache, "layers", None)
    if not _RESERVE_KV or DynamicLayer is None or not isinstance(layers, list) or new_tokens < 1:
        return cache
    for i, layer in enumerate(layers):
        keys = getattr(layer, "keys", None)
        if (
            type(layer) is DynamicLayer
            and isinstance(keys, torch.Tensor)
            and keys.dim() == 4
            and keys.numel()
        ):
            layers[i] = _ReservedLayer(layer, keys.shape[-2] + new_tokens)
    return cache


@torch.inference_mode()
def _generate_batch(
    model: torch.nn.Module,
    rows: list[list[int]],
    eos: torch.Tensor,
    pad_id: int,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
    keep_logits: bool,
    cache_arg: str,
) -> list[list[int]]:
    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    extra = {"logits_to_keep": 1} if keep_logits else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **extra)
    reserve_kv(_cache_of(out), max_new_tokens - 1)
    done = torch.zeros(len(rows), dtype=torch.bool, device=device)
    new_tokens: list[torch.Tensor] = []
    pos = pos[:, -1:]
    for _ in range(max_new_tokens):
        nxt = sample_next(out.logits[:, -1, :], temperature=temperature, top_p=top_p, generator=generator)
        nxt = nxt.to(device).masked_fill(done, pad_id)
        new_tokens.append(nxt)
        done = done | torch.isin(nxt, eos)
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = pos + 1
        out = model(
            input_ids=nxt[:, None],
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            **{cache_arg: _cache_of(out)},
        )
    if not new_tokens:
        return [[] for _ in rows]
    gen = torch.stack(new_tokens, dim=1).cpu()
    eos_set = set(eos.tolist())
    result = []
    for row in gen.tolist():
        cut = next((j + 1 for j, t in enumerate(row) if t in eos_set), len(row))
        result.append(row[:cut])
    return result


def generate(
    model: torch.nn.Module,
    tokenizer_or_eos: Any,
    prompts: list[list[int]],
    *,
    num_samples: int = 1,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    batch_size: int = 64,
) -> list[list[list[int]]]:
    """Sample `num_samples` continuations of each prompt; returns [prompt][sample] → new token ids.

    A continuation ends with the EOS id when the model emitted it (so it can be used directly as
    `Example.response_ids`), else it has `max_new_tokens` tokens. `tokenizer_or_eos` is a tokenizer
    (its eos_token_id) or an EOS id or list of ids. temperature = 0 is greedy. `seed` makes sampling
    reproducible for the same arguments (a private torch.Generator; the global RNG is untouched).
    The model is put in eval mode for the call and restored afterwards.
    """
    if num_samples < 1 or max_new_tokens < 0 or batch_size < 1:
        raise ConfigError("generate: num_samples and batch_size must be ≥ 1 and max_new_tokens ≥ 0")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ConfigError(f"generate: temperature={temperature} must be ≥ 0 and top_p={top_p} in (0, 1]")
    if any(len(p) == 0 for p in prompts):
        raise ConfigError("generate: every prompt needs at least one token (add BOS for empty prompts)")
    eos_list = _eos_ids(tokenizer_or_eos)
    pad = getattr(tokenizer_or_eos, "pad_token_id", None)
    # Pad ids are masked out (prompts) or ignored (finished rows): any id inside the vocabulary works.
    pad_id = int(pad) if isinstance(pad, int) else 0
    device = next(model.parameters()).device
    eos = torch.tensor(eos_list, dtype=torch.long, device=device)
    generator = None
    if seed is not None and temperature > 0:
        generator = torch.Generator(device=device.type)
        generator.manual_seed(seed)
    # Rows sorted by prompt length waste less padding; the order is restored at the end.
    flat = [(i, j) for i in range(len(prompts)) for j in range(num_samples)]
    order = sorted(range(len(flat)), key=lambda k: (len(prompts[flat[k][0]]), k))
    outputs: list[list[int]] = [[] for _ in flat]
    params = _forward_params(model)
    keep_logits = "logits_to_keep" in params
    # transformers ≥ 5.2x names the KV cache `cache`; earlier versions `past_key_values`.
    cache_arg = "cache" if "cache" in params else "past_key_values"
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            rows = [prompts[flat[k][0]] for k in chunk]
            gen = _generate_batch(
                model,
                rows,
                eos,
                pad_id,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                generator=generator,
                keep_logits=keep_logits,
                cache_arg=cache_arg,
            )
            for k, g in zip(chunk, gen):
                outputs[k] = g
    finally:
        model.train(was_training)
    result: list[list[list[int]]] = [[] for _ in prompts]
    for k, (i, _) in enumerate(flat):
        result[i].append(outputs[k])
    return result
