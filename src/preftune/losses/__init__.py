"""The loss zoo: every direct-alignment method as a pure, registered function (docs/algorithms.md §1–§3).

from preftune import losses
spec = losses.get("dpo")                     # LossSpec: fn + metadata
out = spec(batch, state, beta=0.1)           # LossOutput(losses [E], metrics, state)
losses.parse_objective("dpo:1.0,sft:0.2")    # [(spec, weight), ...]
losses.pairwise("dpo", pc, pr, rc, rr, beta=0.1)   # functional API, per-pair losses [E]
"""

from __future__ import annotations

# Importing the method modules registers their losses.
from preftune.losses import (  # noqa: F401
    bco,
    diffusion_losses,
    divergences,
    listwise_losses,
    online_losses,
    pairwise_losses,
    reference_free,
    regularised,
    terms,
    unpaired_losses,
    variants,
)
from preftune.losses.functional import listwise, pairwise, unpaired
from preftune.losses.registry import (
    REGISTRY,
    HParam,
    LossOutput,
    LossSpec,
    get,
    parse_objective,
    register,
)
from preftune.losses.terms import sft_token_count

__all__ = [
    "REGISTRY",
    "HParam",
    "LossOutput",
    "LossSpec",
    "get",
    "parse_objective",
    "register",
    "listwise",
    "pairwise",
    "sft_token_count",
    "unpaired",
]
