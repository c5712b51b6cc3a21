"""Reward-model scores, prefix-shared: a causal-LM trunk and a scalar head read at each response's last token.

    s(x, y) = w·h_T(x ⊕ y)        (Ouyang et al. 2022, §3.5; Stiennon et al. 2020, §3.4)

h_T is the trunk's final hidden state at the last token of x ⊕ y and w the scalar head of
`AutoModelForSequenceClassification(num_labels=1)` (`model.score`). The K responses to one prompt are
branches of one packed row (the tree mask and positions of `preftune.models.packing`): the prompt is
computed once, and each score equals the model's own forward on `prompt + response` in a row of its own.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from preftune.errors import ConfigError, DataError
from preftune.models.load import _check_source, resolve_dtype, unwrap_model
from preftune.models.logprobs import check_token_ids, trunk_hidden_states
from preftune.models.packing import RowBatch, build_packed, build_padded, packing_support


def load_scorer(
    path: str | Path,
    *,
    dtype: str | torch.dtype = "float32",
    attn_implementation: str | None = None,
    num_labels: int = 1,
) -> Any:
    """`AutoModelForSequenceClassification(num_labels=1)` from a folder or hub id, in eval mode.

    A causal-LM folder (e.g. an SFT model) loads too: its trunk is kept and a new scalar head is
    initialised from the global RNG (seed it first). `config.pad_token_id` falls back to the EOS id,
    which the model's own batched forward needs to find each row's last token. `num_labels` M > 1: M
    scalar heads on the one trunk (a heads ensemble, `preftune train rm --heads M`).
    """
    from transformers import AutoModelForSequenceClassification

    source = _check_source(path)
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype), "num_labels": num_labels}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    try:
        hf_logging.set_verbosity_error()  # its load report lists the new head as missing: by design
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model: Any = AutoModelForSequenceClassification.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(
            f"could not load a reward model (sequence classifier) from '{source}': {exc}; "
            "give a causal-LM folder whose architecture has a *ForSequenceClassification class"
        ) from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    if model.config.pad_token_id is None:
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    model.config.use_cache = False
    model.eval()
    return model


def _parts(model: Any) -> tuple[Any, Any, torch.nn.Module]:
    lm = unwrap_model(model)
    backbone = getattr(lm, getattr(lm, "base_model_prefix", ""), None)
    head = getattr(lm, "score", None)
    if backbone is None or not isinstance(head, torch.nn.Module):
        raise ConfigError(
            f"{type(lm).__name__} has no decoder body and scalar head 'score': load the reward model "
            "with preftune.reward.load_scorer (AutoModelForSequenceClassification, num_labels=1)"
        )
    return lm, backbone, head


def branch_scores(
    model: Any,
    prompts: list[list[int]],
    branches: list[list[list[int]]],
    *,
    pack: bool = True,
    max_tokens_per_row: int | None = None,
    source_rows: list[int] | None = None,
) -> torch.Tensor:
    """Scalar scores [N] float32 of every response branch, flat: prompt 0 branch 0, prompt 0 branch 1, …
    ([N, M] for a model with M heads, `load_scorer(..., num_labels=M)`).

    `pack=True` runs each prompt once with its K responses as branches of one packed row (falls back to
    padded rows, with a warning, where the architecture's attention takes no custom mask); `pack=False`
    runs one padded row per response. Both give the model's own score of `prompt + response`.
    Differentiable with respect to the model.
    """
    lm, backbone, head = _parts(model)
    device = next(lm.parameters()).device
    if not prompts:
        return torch.zeros(0, dtype=torch.float32, device=device)
    for i, bs in enumerate(branches):
        if any(not b for b in bs):
            row = source_rows[i] if source_rows is not None and source_rows[i] >= 0 else None
            raise DataError(
                f"{'' if row is not None else f'example {i}: '}empty response: a reward model scores a "
                "response's last token",
                row=row,
                field="response_ids",
                fix="drop the row or give the response at least one token",
            )
    check_token_ids(lm, prompts, branches)
    if pack and (reason := packing_support(lm.config)) is not None:
        warnings.warn(
            f"prefix-shared packing is off, using padded rows: {reason}", RuntimeWarning, stacklevel=2
        )
        pack = False
    if pack:
        batch = build_packed(
            prompts, branches, max_tokens_per_row=max_tokens_per_row, source_rows=source_rows
        )
    else:
        batch = build_padded(prompts, branches, source_rows=source_rows)
    hidden = trunk_hidden_states(backbone, lm.config, lm.dtype, batch)
    rows, cols = _last_tokens(batch, [len(bs) for bs in branches])
    return head(hidden[rows.to(device), cols.to(device)]).float().squeeze(-1)


def _last_tokens(batch: RowBatch, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) [N] of each response's last token, responses numbered flat as in `branch_scores`."""
    ex, br = batch.example_ids, batch.branch_ids
    if not batch.shared:  # one row per response, right-padded
        return torch.arange(ex.shape[0]), (ex >= 0).sum(1) - 1
    first = torch.tensor([0, *counts]).cumsum(0)
    r, c = ((ex >= 0) & (br > 0)).nonzero(as_tuple=True)  # every response token
    seq = first[ex[r, c]] + br[r, c] - 1
    n = sum(counts)
    rows = torch.zeros(n, dtype=torch.long).scatter(0, seq, r)
    cols = torch.zeros(n, dtype=torch.long).scatter_reduce(0, seq, c, "amax")
    return rows, cols
