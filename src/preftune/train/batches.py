"""From examples to the losses' input: data-kind adaptation and `PreferenceBatch` assembly.

A loss declares the data it trains on (`LossSpec.kind`); the trainer adapts the data, never the loss:

    pairwise loss : pairwise data (ranked data is turned into pairs by the data pipeline, `ranked_pairs`)
    unpaired loss : unpaired data, or pairwise data with each pair → chosen (label 1) + rejected (label 0)
    listwise loss : ranked data, or pairwise data as a ranked list of two
    "any" (sft)   : any data (the term reads branch 0)

Losses that set `needs_mismatched` (KTO's z₀) get a second branch per unpaired example: the completion
of the next example (in data order) whose prompt differs, scored under this example's prompt.
The KTO paper takes y′ from the same micro-batch; TRL builds its "KL dataset" once, shifting completions
by one in dataset order before shuffling. We pair once in data order too (skipping same-prompt
neighbours, e.g. the two halves of a converted pair): the pairing is reproducible, so the reference
statistics of mismatched branches can be cached, and a step does not depend on its micro-batching.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from preftune.errors import ConfigError
from preftune.types import Example, PreferenceBatch, SequenceStats


def objective_kind(objective: Sequence[tuple[Any, float, dict[str, Any]]]) -> str:
    """The data kind of an objective: its terms' kind other than "any" (parse_objective ensures one)."""
    kinds = {spec.kind for spec, _, _ in objective} - {"any"}
    return kinds.pop() if kinds else "any"


def adapt_examples(
    examples: Sequence[Example], loss_kind: str, *, mismatched: bool = False, where: str = "data"
) -> list[Example]:
    """Examples in the layout a loss of `loss_kind` trains on (see the module docstring)."""
    out: list[Example] = []
    for ex in examples:
        if loss_kind == "pairwise":
            if ex.kind != "pairwise":
                fix = (
                    "set ranked_pairs to turn ranked lists into pairs"
                    if ex.kind == "ranked"
                    else "use an unpaired loss (kto, bco_unpaired; a reward model: --head implicit --loss ce), "
                    "or pairwise data"
                )
                raise ConfigError(
                    f"{where}: row {ex.source_row} is {ex.kind} data but the loss is pairwise — {fix}"
                )
            out.append(ex)
        elif loss_kind == "unpaired":
            if ex.kind == "unpaired":
                out.append(ex)
            elif ex.kind == "pairwise":
                chosen, rejected = ex.response_ids[0], ex.response_ids[1]
                out.append(
                    replace(ex, response_ids=[chosen], kind="unpaired", label=1.0, scores=None, margins=None)
                )
                out.append(
                    replace(
                        ex, response_ids=[rejected], kind="unpaired", label=0.0, scores=None, margins=None
                    )
                )
            else:
                raise ConfigError(
                    f"{where}: row {ex.source_row} is ranked data but the loss is unpaired — "
                    "use a listwise loss, or convert the lists to pairs"
                )
        elif loss_kind == "listwise":
            if ex.kind == "unpaired":
                raise ConfigError(
                    f"{where}: row {ex.source_row} is unpaired data but the loss is listwise — "
                    "use ranked or pairwise data"
                )
            out.append(ex)
        else:
            out.append(ex)
    if mismatched:
        out = add_mismatched(out)
    return out


def add_mismatched(examples: list[Example]) -> list[Example]:
    """Give each unpaired example a branch 1: the completion of the next example with another prompt."""
    n = len(examples)
    result = []
    for i, ex in enumerate(examples):
        j = next(
            (k % n for k in range(i + 1, i + n) if examples[k % n].prompt_ids != ex.prompt_ids), (i + 1) % n
        )
        result.append(replace(ex, response_ids=[ex.response_ids[0], examples[j].response_ids[0]]))
    return result


def build_batch(
    examples: Sequence[Example], policy: SequenceStats, reference: SequenceStats | None
) -> PreferenceBatch:
    """Group flat per-branch statistics (example-major order) into a [E, K] `PreferenceBatch`.

    Ragged K (ranked lists of different lengths) is padded; padded entries are False in `mask`.
    labels [E]: the example's label (unpaired 1/0, pairwise soft p; pairwise without one → 1.0).
    """
    counts = [len(e.response_ids) for e in examples]
    e_count, k_max = len(examples), max(counts)
    device = policy.logps.device
    index = torch.tensor([e * k_max + k for e, c in enumerate(counts) for k in range(c)], device=device)
    mask = torch.zeros(e_count * k_max, dtype=torch.bool, device=device)
    mask[index] = True

    def grid(flat: torch.Tensor) -> torch.Tensor:
        flat = flat.to(device)
        shape = (e_count * k_max,) + tuple(flat.shape[1:])
        out = flat.new_zeros(shape).index_copy(0, index, flat)  # index_copy keeps the autograd graph
        return out.view(e_count, k_max, *flat.shape[1:])

    def tokens(stats: SequenceStats | None) -> torch.Tensor | None:
        return None if stats is None or stats.token_logps is None else grid(stats.token_logps)

    labels = None
    if any(e.label is not None for e in examples):
        labels = torch.tensor([1.0 if e.label is None else float(e.label) for e in examples], device=device)
    scores = None
    if any(e.scores is not None for e in examples):
        scores = torch.zeros(e_count, k_max, device=device)
        for i, e in enumerate(examples):
            if e.scores is not None:
                scores[i, : len(e.scores)] = torch.tensor(e.scores, dtype=torch.float32)
    margins = None
    if any(e.margins is not None for e in examples):
        m = max(len(e.margins[0]) for e in examples if e.margins)
        margins = torch.zeros(e_count, k_max, m, device=device)
        for i, e in enumerate(examples):
            if e.margins is not None:
                margins[i, : len(e.margins)] = torch.tensor(e.margins, dtype=torch.float32)
    return PreferenceBatch(
        policy_logps=grid(policy.logps),
        lengths=grid(policy.lengths),
        ref_logps=None if reference is None else grid(reference.logps.to(device)),
        mask=None if all(c == k_max for c in counts) else mask.view(e_count, k_max),
        policy_token_logps=tokens(policy),
        ref_token_logps=tokens(reference),
        labels=labels,
        scores=scores,
        margins=margins,
    )


def data_only_batch(examples: Sequence[Example]) -> PreferenceBatch:
    """A batch with zero log-probs but the examples' lengths, labels and mask: what token counting needs."""
    lengths = torch.tensor([len(r) for e in examples for r in e.response_ids], dtype=torch.int64)
    stats = SequenceStats(logps=torch.zeros(len(lengths)), lengths=lengths)
    return build_batch(examples, stats, None)


def token_count(spec: Any, examples: Sequence[Example]) -> float:
    """Global token normaliser of a `reduction="token"` term over `examples` (the sft term's count)."""
    from preftune.losses import sft_token_count

    if not examples:
        return 0.0
    return float(sft_token_count(data_only_batch(examples)))


def shard(items: Sequence[Any], rank: int, size: int) -> list[Any]:
    """This rank's share of a global batch: items rank, rank+size, ... (any split is exact, see distributed)."""
    return list(items[rank::size])


def prompt_groups(examples: Sequence[Example]) -> list[int]:
    """A group id per example: examples with equal prompt ids share one (ids numbered by first use)."""
    ids: dict[tuple[int, ...], int] = {}
    return [ids.setdefault(tuple(e.prompt_ids), len(ids)) for e in examples]


def micro_batches(items: Sequence[Any], size: int) -> list[list[Any]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]
