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
