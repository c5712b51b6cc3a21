"""Functional API: call a registered loss on plain tensors, without building a PreferenceBatch.

    losses.pairwise("dpo", pc, pr, rc, rr, beta=0.1)               # [E] per-pair losses
    losses.unpaired("kto", p, r, labels=l, mismatched_policy_logps=pm, mismatched_ref_logps=rm)
    losses.listwise("listwise_pl", p_EK, r_EK, mask=m_EK)

Response lengths are needed by length-normalised methods (ipo, dpo_norm, simpo, orpo, ...): pass
them, or per-token log-probs (then |y| is their width). A method that needs lengths and got none
raises ConfigError instead of silently using |y| = 1.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from preftune.errors import ConfigError
from preftune.losses.registry import LossOutput, get
from preftune.types import PreferenceBatch

Tensor = torch.Tensor


def _stack(items: list[Tensor | None]) -> Tensor | None:
    """Stack per-branch [E] tensors to [E, K]; None if all are None."""
    present = [t for t in items if t is not None]
    if not present:
        return None
    if len(present) != len(items):
        raise ConfigError("give either all branches of a statistic or none (e.g. both chosen and rejected)")
    return torch.stack([torch.as_tensor(t) for t in present], dim=1)


def _stack_tokens(items: list[Tensor | None]) -> Tensor | None:
    """Stack per-branch [E, T_k] per-token log-probs to [E, K, max T], zero-padded."""
    present = [t for t in items if t is not None]
    if not present:
        return None
    if len(present) != len(items):
        raise ConfigError("give per-token log-probs for all branches or none")
    width = max(t.shape[-1] for t in present)
    return torch.stack([F.pad(t, (0, width - t.shape[-1])) for t in present], dim=1)


def _lengths(given: Tensor | None, like: Tensor, token_logps: Tensor | None) -> Tensor:
    if given is not None:
        return torch.as_tensor(given).to(like.device)
    if token_logps is not None:
        return torch.full(like.shape, token_logps.shape[-1], dtype=torch.float32, device=like.device)
    # NaN marks "unknown": a loss that uses lengths turns it into a non-finite value we detect below.
    return torch.full(like.shape, float("nan"), dtype=torch.float32, device=like.device)


def run(
    name: str,
    batch: PreferenceBatch,
    state: dict[str, Tensor] | None,
    lengths_known: bool,
    hparams: dict[str, Any],
) -> LossOutput:
    """Validate, check the spec's needs against the batch, call the loss."""
    spec = get(name)
    if spec.needs_reference and batch.ref_logps is None:
        raise ConfigError(f"loss '{name}' needs reference log-probs (ref_*_logps)")
    out = spec(batch, state, **hparams)
    if not lengths_known and not bool(torch.isfinite(out.losses).all()):
        raise ConfigError(
            f"loss '{name}' normalises by response length: pass the lengths (chosen_lengths=...)"
        )
    return out


def pairwise(
    name: str,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    policy_chosen_token_logps: Tensor | None = None,
    policy_rejected_token_logps: Tensor | None = None,
    ref_chosen_token_logps: Tensor | None = None,
    ref_rejected_token_logps: Tensor | None = None,
    label: Tensor | None = None,
    margins: Tensor | None = None,
    state: dict[str, Tensor] | None = None,
    **hparams: Any,
) -> Tensor:
    """Per-pair losses [E] of the pairwise (or "any") loss `name`.

    Summed log-probs are [E]; per-token log-probs [E, T] (zero-padded); `label` [E] the soft label
    p (smooth_dpo); `margins` [E, 2, M] MODPO margin rewards; `state` a stateful loss's state (BCO's δ;
    not returned — use `preftune.losses.get(name)` for the full LossOutput).
    """
    logps = torch.stack([policy_chosen_logps, policy_rejected_logps], dim=1)
    tokens = _stack_tokens([policy_chosen_token_logps, policy_rejected_token_logps])
    known = chosen_lengths is not None and rejected_lengths is not None
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ConfigError("give both chosen_lengths and rejected_lengths, or neither")
    lengths = _lengths(_stack([chosen_lengths, rejected_lengths]), logps, tokens)
    batch = PreferenceBatch(
        policy_logps=logps,
        lengths=lengths,
        ref_logps=_stack([ref_chosen_logps, ref_rejected_logps]),
        policy_token_logps=tokens,
        ref_token_logps=_stack_tokens([ref_chosen_token_logps, ref_rejected_token_logps]),
        labels=label,
        margins=margins,
    )
    return run(name, batch, state, known or tokens is not None, hparams).losses


def unpaired(
    name: str,
    policy_logps: Tensor,
    ref_logps: Tensor | None = None,
    *,
    labels: Tensor,
    lengths: Tensor | None = None,
    mismatched_policy_logps: Tensor | None = None,
    mismatched_ref_logps: Tensor | None = None,
    state: dict[str, Tensor] | None = None,
    **hparams: Any,
) -> Tensor:
    """Per-example losses [E] of the unpaired loss `name` on single completions.

    `labels` [E] 1 desirable / 0 undesirable; `mismatched_*` [E] the log-probs of a completion of a
    different prompt under this prompt (KTO's z₀).
    """
    branches = [policy_logps] + ([mismatched_policy_logps] if mismatched_policy_logps is not None else [])
    logps = torch.stack(branches, dim=1)
    ref = None
    if ref_logps is not None:
        refs = [ref_logps] + ([mismatched_ref_logps] if mismatched_ref_logps is not None else [])
        if len(refs) != len(branches):
            raise ConfigError("give mismatched_ref_logps together with mismatched_policy_logps")
        ref = torch.stack(refs, dim=1)
    n = None if lengths is None else torch.stack([lengths] * len(branches), dim=1)
    batch = PreferenceBatch(
        policy_logps=logps, lengths=_lengths(n, logps, None), ref_logps=ref, labels=torch.as_tensor(labels)
    )
    return run(name, batch, state, lengths is not None, hparams).losses


def listwise(
    name: str,
    policy_logps: Tensor,
    ref_logps: Tensor | None = None,
    *,
    mask: Tensor | None = None,
    lengths: Tensor | None = None,
    scores: Tensor | None = None,
    state: dict[str, Tensor] | None = None,
    **hparams: Any,
) -> Tensor:
    """Per-list losses [E] of the listwise loss `name`; all tensors [E, K], best response first."""
    batch = PreferenceBatch(
        policy_logps=policy_logps,
        lengths=_lengths(lengths, policy_logps, None),
        ref_logps=ref_logps,
        mask=mask,
        scores=scores,
    )
    return run(name, batch, state, lengths is not None, hparams).losses
