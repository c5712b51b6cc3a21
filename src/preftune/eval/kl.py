"""Sequence-level KL from a trained policy to its reference, estimated from the policy's own samples.

    KL(π_θ ‖ π_ref) = E_{x ~ D, y ~ π_θ(·|x)} [ log π_θ(y|x) − log π_ref(y|x) ]
                    ≈ (1/N) Σ_i ( logp_θ(y_i) − logp_ref(y_i) ),   y_i ~ π_θ(·|x_i)

(the KL term of the RLHF objective that DPO optimises implicitly, Rafailov et al. 2023, eq. 3; the
"sequence-level KL estimate to the reference on held-out prompts" of docs/algorithms.md §5).

The estimator is unbiased only when y is drawn from π_θ itself, so samples are taken at temperature 1
with top-p 1; both log-probs are recomputed by a forward pass over the same token ids rather than taken
from the sampler. A sample cut at `max_new_tokens` is a prefix: the estimate is then the KL between the
two models' distributions over prefixes of that length, which is a lower bound on the full KL.
Individual terms can be negative; their mean is ≥ 0 only in expectation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from preftune.errors import ConfigError


@dataclass(frozen=True)
class KLEstimate:
    """Monte-Carlo KL estimate in nats per response.

    mean:    (1/N) Σ_i (logp_θ(y_i) − logp_ref(y_i)).
    stderr:  standard error of that mean, sample std (N−1) / √N; 0 when N = 1.
    samples: N, the number of sampled responses used.
    mean_length: mean response length in tokens (to read the KL per token: mean / mean_length).
    """

    mean: float
    stderr: float
    samples: int
    mean_length: float


def kl_from_logps(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor, lengths: torch.Tensor | None = None
) -> KLEstimate:
    """KL estimate from summed log-probs [N] of N policy samples under the policy and the reference."""
    if policy_logps.shape != ref_logps.shape or policy_logps.ndim != 1 or policy_logps.numel() == 0:
        raise ConfigError(
            f"kl_from_logps: need two non-empty [N] tensors of equal shape, got "
            f"{tuple(policy_logps.shape)} and {tuple(ref_logps.shape)}"
        )
    diff = policy_logps.double() - ref_logps.double()
    n = diff.numel()
    stderr = float(diff.std(unbiased=True)) / math.sqrt(n) if n > 1 else 0.0
    mean_length = float(lengths.double().mean()) if lengths is not None else float("nan")
    return KLEstimate(mean=float(diff.mean()), stderr=stderr, samples=n, mean_length=mean_length)


GenerateFn = Callable[..., list[list[list[int]]]]
LogpsFn = Callable[..., Any]


def sequence_kl(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    tokenizer_or_eos: Any,
    prompts: Sequence[list[int]],
    *,
    samples_per_prompt: int = 4,
    max_new_tokens: int = 64,
    seed: int = 0,
    generate_fn: GenerateFn | None = None,
    logps_fn: LogpsFn | None = None,
) -> KLEstimate:
    """Estimate KL(π_θ ‖ π_ref) on `prompts` (token ids) from `samples_per_prompt` policy samples each.

    Uses `preftune.generation.generate` (temperature 1, top-p 1, seeded) and
    `preftune.models.logprobs.sequence_logps`; both can be replaced for tests. Empty samples are dropped.
    """
    if samples_per_prompt < 1 or max_new_tokens < 1 or not prompts:
        raise ConfigError(
            "sequence_kl: need at least one prompt, samples_per_prompt ≥ 1 and max_new_tokens ≥ 1"
        )
    if generate_fn is None:
        from preftune.generation import generate

        generate_fn = generate
    if logps_fn is None:
        from preftune.models.logprobs import sequence_logps

        logps_fn = cast(LogpsFn, sequence_logps)
    samples = generate_fn(
        policy,
        tokenizer_or_eos,
        list(prompts),
        num_samples=samples_per_prompt,
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        seed=seed,
    )
    kept_prompts = [p for p, ys in zip(prompts, samples) if any(ys)]
    kept = [[y for y in ys if y] for ys in samples if any(ys)]
    if not kept:
        raise ConfigError("sequence_kl: the policy produced only empty samples; raise max_new_tokens")
    with torch.no_grad():
        pol = torch.cat([t.detach().float().cpu() for t in logps_fn(policy, kept_prompts, kept)])
        ref = torch.cat([t.detach().float().cpu() for t in logps_fn(reference, kept_prompts, kept)])
    lengths = torch.tensor([len(y) for ys in kept for y in ys], dtype=torch.float64)
    return kl_from_logps(pol, ref, lengths)
