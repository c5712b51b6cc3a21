"""The rollout engine: n samples per prompt with their sampling log-probs, from a KV-cached policy.

    engine = RolloutEngine(model, eos=tokenizer.eos_token_id)
    out = engine.generate(prompt_ids, n=8, sampling=Sampling(max_new_tokens=256, temperature=1.0))
    out.completion_ids, out.logps, out.mask, out.min_logits, out.weight_version
    engine.update_weights()          # after an optimizer step: the next rollouts are version + 1

Each prompt is prefilled once; its KV cache (and its last logits) are then repeated for its n samples
(`share_prefill=False` prefills every sample's copy of the prompt instead, for comparison). Prompts of
different lengths are left-padded; `position_ids` count real tokens only. In-process, the engine
samples from the policy module itself, so `update_weights` only records that the weights changed
(the version lets a trainer tell how stale a batch of rollouts is).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from preftune.errors import ConfigError
from preftune.generation import _cache_of, _eos_ids, _forward_params, reserve_kv
from preftune.rl.sampling import Sampling, sample_step


@dataclass
class Rollouts:
    """R = P·n sampled completions, row r = sample r % n of prompt r // n, padded to T tokens.

    completion_ids: [R, T] long, new tokens (EOS included when emitted), pad after the end.
    mask:           [R, T] bool, True on completion tokens.
    logps:          [R, T] float32, log-prob of each token under the distribution it was sampled
                    from (temperature-scaled, renormalised over the kept support); 0 off the mask.
    min_logits:     [R, T] float32, the kept support: tokens whose temperature-scaled logit is ≥ this
                    value (−inf: the whole vocabulary); pass to `sequence_logps(..., min_logits=)`.
    prompt_index:   [R] long, the prompt of each row.
    finished:       [R] bool, the completion ended with EOS.
    weight_version: the engine's weight version when sampling.
    temperature:    the sampling temperature (recompute log-probs at the same one).
    """

    completion_ids: torch.Tensor
    mask: torch.Tensor
    logps: torch.Tensor
    min_logits: torch.Tensor
    prompt_index: torch.Tensor
    finished: torch.Tensor
    weight_version: int
    temperature: float

    def completions(self) -> list[list[int]]:
        """Each row's token ids, cut at its end."""
        return [row[: int(m.sum())].tolist() for row, m in zip(self.completion_ids, self.mask)]

    def grouped(self, n: int) -> list[list[list[int]]]:
        """Completions as [prompt][sample] → ids (the layout of `sequence_logps`' responses)."""
        flat = self.completions()
        return [flat[i : i + n] for i in range(0, len(flat), n)]

    def align(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        """Per-prompt token matrices [n, T_i] (as `sequence_logps(..., token_logps=True)` returns them)
        → one [R, T] matrix aligned with these rollouts' rows and `mask` (differentiable)."""
        rows = [row for part in tokens for row in part]
        if len(rows) != self.mask.shape[0]:
            raise ConfigError(f"rollouts: {len(rows)} rows of log-probs for {self.mask.shape[0]} completions")
        width = self.mask.shape[1]
        return torch.stack([torch.nn.functional.pad(r, (0, width - r.shape[0])) for r in rows])

    def grouped_min_logits(self, n: int) -> list[torch.Tensor]:
        """`min_logits` per prompt, [n, T_i] (T_i its longest completion), for `sequence_logps`."""
        lengths = self.mask.sum(dim=1)
        out = []
        for i in range(0, len(lengths), n):
            width = int(lengths[i : i + n].max()) if n else 0
            out.append(self.min_logits[i : i + n, :width])
        return out


class RolloutEngine:
    """Samples completions from an in-process Hugging Face causal LM (see the module docstring)."""

    def __init__(
        self, model: torch.nn.Module, eos: Any, *, pad_id: int | None = None, batch_rows: int = 64
    ) -> None:
        if batch_rows < 1:
            raise ConfigError(f"rollout engine: batch_rows={batch_rows} must be ≥ 1")
        self.model = model
        self.eos_ids = _eos_ids(eos)
        tok_pad = getattr(eos, "pad_token_id", None)
        self.pad_id = pad_id if pad_id is not None else (int(tok_pad) if isinstance(tok_pad, int) else 0)
        self.batch_rows = batch_rows
        self.weight_version = 0

    def update_weights(self, model: torch.nn.Module | None = None) -> int:
        """Record a weight update (in-process: point at `model`, default the same module); returns the
        new weight version."""
        if model is not None:
            self.model = model
        self.weight_version += 1
        return self.weight_version

    def generate(
        self, prompt_ids: list[list[int]], n: int, sampling: Sampling, *, share_prefill: bool = True
    ) -> Rollouts:
        """Sample `n` completions of each prompt (rows grouped by prompt, see `Rollouts`)."""
        sampling.check()
        if n < 1:
            raise ConfigError(f"rollout engine: n={n} samples per prompt must be ≥ 1")
        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ConfigError("rollout engine: give at least one prompt, each with at least one token")
        model = self.model
        device = next(model.parameters()).device
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(device=device.type).manual_seed(sampling.seed)
        per_batch = max(1, self.batch_rows // n)
        parts = []
        was_training = model.training
        model.eval()
        try:
            for start in range(0, len(prompt_ids), per_batch):
                chunk = prompt_ids[start : start + per_batch]
                parts.append(self._batch(chunk, n, sampling, generator, share_prefill))
        finally:
            model.train(was_training)
        return self._assemble(parts, len(prompt_ids), n, sampling.temperature)

    def _prefill(self, rows: list[list[int]], repeats: int, extra: dict[str, Any]) -> tuple[Any, ...]:
        device = next(self.model.parameters()).device
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **extra)
        logits, cache = out.logits[:, -1, :], _cache_of(out)
        if repeats > 1:
            cache.batch_repeat_interleave(repeats)
            logits, mask, pos = (t.repeat_interleave(repeats, dim=0) for t in (logits, mask, pos))
        return logits, cache, mask, pos[:, -1:]

    @torch.inference_mode()
    def _batch(
        self,
        prompts: list[list[int]],
        n: int,
        sampling: Sampling,
        generator: torch.Generator | None,
        share_prefill: bool,
    ) -> tuple[torch.Tensor, ...]:
        params = _forward_params(self.model)
        extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        cache_arg = "cache" if "cache" in params else "past_key_values"
        if share_prefill:
            logits, cache, mask, pos = self._prefill(prompts, n, extra)
        else:
            logits, cache, mask, pos = self._prefill([p for p in prompts for _ in range(n)], 1, extra)
        reserve_kv(cache, sampling.max_new_tokens - 1)
        device = logits.device
        eos = torch.tensor(self.eos_ids, dtype=torch.long, device=device)
        done = torch.zeros(logits.shape[0], dtype=torch.bool, device=device)
        cols: list[tuple[torch.Tensor, ...]] = []
        for _ in range(sampling.max_new_tokens):
            ids, logp, thr = sample_step(logits, sampling, generator)
            live = ~done
            cols.append((ids.masked_fill(done, self.pad_id), logp.masked_fill(done, 0.0), thr, live))
            done = done | torch.isin(ids, eos)
            if bool(done.all()) or len(cols) == sampling.max_new_tokens:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = pos + 1
            out = self.model(
                input_ids=cols[-1][0][:, None],
                attention_mask=mask,
                position_ids=pos,
                use_cache=True,
                **{cache_arg: cache},
            )
            logits, cache = out.logits[:, -1, :], _cache_of(out)
        ids, logps, thr, live = (torch.stack(c, dim=1).cpu() for c in zip(*cols))
        return ids, logps.float(), thr.float(), live, done.cpu()

    def _assemble(
        self, parts: list[tuple[torch.Tensor, ...]], prompts: int, n: int, temperature: float
    ) -> Rollouts:
        width = max(p[0].shape[1] for p in parts)

        def cat(i: int, fill: float | int | bool) -> torch.Tensor:
            padded = [torch.nn.functional.pad(p[i], (0, width - p[i].shape[1]), value=fill) for p in parts]
            return torch.cat(padded)

        mask = cat(3, False)
        thr = cat(2, float("-inf"))
        return Rollouts(
            completion_ids=cat(0, self.pad_id),
            mask=mask,
            logps=cat(1, 0.0),
            min_logits=thr.masked_fill(~mask, float("-inf")),
            prompt_index=torch.arange(prompts).repeat_interleave(n),
            finished=torch.cat([p[4] for p in parts]),
            weight_version=self.weight_version,
            temperature=temperature,
        )
