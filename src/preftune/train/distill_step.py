"""The trainer's step for objectives of kind "distill" (ADPA, DCKD, AlignDistil): the student's and the
teachers' final hidden states on the same packed pairs, then each term's full-vocabulary per-position
loss through the chunked heads (`preftune.models.distill_head`), reduced exactly over micro-batches
and ranks.

    teachers = load_teachers(config, world)         # (π_dpo, π_ref or None), frozen, on the device
    sums = distill_on_batch(student, batch, objective=objective, world=world, micro_batch_size=4,
                            backward=True)           # objective.teachers = teachers

Each example is a pair (prompt, chosen, rejected) in the prefix-shared packed layout: the prompt is
computed once per model for both responses. Term t's loss is Σ (its positions' losses) / (the global
count of its positions), so summing micro-batch gradients gives the full-batch gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from preftune.errors import ConfigError
from preftune.models.direct_grads import grads_into_params
from preftune.models.load import unwrap_model
from preftune.models.logprobs import LogitTransform, _hidden_states
from preftune.models.packing import build_packed, build_padded, packing_support
from preftune.train.batches import micro_batches, shard
from preftune.train.distributed import World
from preftune.train.metrics import MetricSums
from preftune.types import Example

_BRANCH = {"chosen": (0,), "rejected": (1,), "both": (0, 1)}


def load_teachers(config: Any, world: World) -> tuple[Any, Any]:
    """(π_dpo, π_ref) of a distillation run: `teacher` and `teacher_ref` (None when no term needs it),
    frozen, in eval mode, on this rank's device. Their vocabulary must be the student's."""
    from preftune.models.load import load_causal_lm

    models: list[Any] = []
    for path in (config.teacher, config.teacher_ref):
        if not path:
            models.append(None)
            continue
        model = load_causal_lm(path, dtype=config.dtype).to(world.device)
        model.eval()
        model.requires_grad_(False)
        models.append(model)
    return models[0], models[1]


def _sequences(examples: Sequence[Example], on: str) -> list[int]:
    """Flat (example-major) numbers of the responses `on` selects: branch 0 chosen, 1 rejected."""
    out, start = [], 0
    for e in examples:
        out += [start + k for k in _BRANCH[on] if k < len(e.response_ids)]
        start += len(e.response_ids)
    return out


def _position_count(examples: Sequence[Example], on: str) -> float:
    lengths = [len(r) for e in examples for r in e.response_ids]
    return float(sum(lengths[n] for n in _sequences(examples, on)))


def _hidden(model: Any, batch: Any) -> torch.Tensor:
    """[M, H] final hidden states at the positions that predict the batch's response tokens."""
    hidden = _hidden_states(model, batch)
    return hidden[batch.pred_rows.to(hidden.device), batch.pred_cols.to(hidden.device)]


def _layout(models: list[Any], examples: Sequence[Example]) -> Any:
    """The packed prefix-shared batch when every model's architecture supports it, else padded rows."""
    prompts = [e.prompt_ids for e in examples]
    branches = [e.response_ids for e in examples]
    rows = [e.source_row for e in examples]
    if all(packing_support(unwrap_model(m).config) is None for m in models):
        return build_packed(prompts, branches, source_rows=rows)
    return build_padded(prompts, branches, source_rows=rows)


def distill_on_batch(
    model: Any,
    global_batch: Sequence[Example],
    *,
    objective: Any,
    world: World,
    micro_batch_size: int,
    backward: bool,
    autocast: torch.dtype | None = None,
    reference: Any = None,
) -> MetricSums:
    """Forward (and backward) this rank's share of the step's pairs; metric sums `loss`, `loss/TERM`
    (several terms), `tokens`, `examples`. `reference` is unused (the teachers are the objective's)."""
    from preftune.train.loop import compute

    teachers = [t for t in (objective.teachers or ()) if t is not None]
    if not teachers:
        raise ConfigError("distillation: no teacher model loaded (give --teacher PATH)")
    denominators = [max(_position_count(global_batch, hp["on"]), 1.0) for _, _, hp in objective.terms]
    lm = unwrap_model(model)
    student_t = LogitTransform(lm.config)
    sums = MetricSums()
    for micro in micro_batches(shard(global_batch, world.rank, world.size), micro_batch_size):
        batch = _layout([model, *teachers], micro)
        with torch.set_grad_enabled(backward), compute(autocast, world):
            student = _hidden(model, batch)
            with torch.no_grad():
                hidden = [_hidden(t, batch) for t in teachers]
            total = student.new_zeros((), dtype=torch.float32)
            parts = {}
            for (spec, weight, hp), denominator in zip(objective.terms, denominators):
                keep = torch.isin(
                    batch.seq_index, torch.tensor(_sequences(micro, hp["on"]), dtype=torch.long)
                )
                idx = keep.nonzero().squeeze(1).to(student.device)
                need = spec.fn.teachers
                if len(teachers) < need:
                    raise ConfigError(f"distillation term '{spec.name}' needs --teacher-ref (π_ref) as well")
                losses = spec.fn(
                    student[idx], lm.get_output_embeddings(), [h[idx] for h in hidden[:need]],
                    [unwrap_model(t).get_output_embeddings() for t in teachers[:need]],
                    transforms=[student_t, *(LogitTransform(unwrap_model(t).config) for t in teachers[:need])],
                    targets=batch.targets[idx.to(batch.targets.device)],
                    **{k: v for k, v in hp.items() if k != "on"},
                )  # fmt: skip
                parts[f"loss/{spec.name}"] = losses.sum() / denominator
                total = total + weight * parts[f"loss/{spec.name}"]
        if backward and total.requires_grad:
            with grads_into_params():  # (the head's weight gradient straight into .grad)
                total.backward()
        sums.add_total("loss", total)
        if len(objective.terms) > 1:
            for name, value in parts.items():
                sums.add_total(name, value)
        sums.add_total("tokens", float(sum(e.num_tokens for e in micro)))
        sums.add_total("examples", float(len(micro)))
    return sums
