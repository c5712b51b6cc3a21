"""`evaluate(...)`: the preference metrics (docs/algorithms.md §5) of a trained model on held-out data.

Used by `preftune eval`; the same code path as the evaluation inside `train` (same reference cache).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from preftune.config import TrainConfig, validate
from preftune.errors import ConfigError
from preftune.train.batches import objective_kind
from preftune.train.distributed import World
from preftune.train.loop import Objective, evaluate_examples
from preftune.train.setup import load_examples, setup_reference


def evaluate(
    model: Any,
    data: str | list[Any],
    *,
    method: str = "dpo",
    ref_model: str | None = None,
    tokenizer: Any = None,
    hparams: dict[str, Any] | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    max_completion_length: int | None = None,
    truncation: str = "truncate",
    cache_dir: str | None = None,
    kind: str | None = None,
    columns: str | None = None,
    on_invalid: str = "error",
) -> dict[str, float]:
    """Preference metrics (docs/algorithms.md §5) and the objective's loss of `model` on held-out `data`.

    model: a model folder (full weights or a PEFT adapter folder such as a LoRA run's OUT/final) or a
        loaded module. data: a data source path or a list of `Example`s (already tokenized), read with
        `kind`, `columns` and `on_invalid` as training reads its data (`prepare_examples`).
    ref_model: the reference folder (a run's base `model`); for a PEFT adapter it defaults to the base
        weights with adapters disabled. Reference log-probs go through the same on-disk cache as training.
    Returns e.g. {"loss", "rewards/accuracy", "rewards/margin", "logps/chosen", "policy_rank_accuracy", ...}.
    """
    from preftune.data.formatting import load_tokenizer
    from preftune.models.load import load_causal_lm

    path = None if isinstance(model, torch.nn.Module) else str(model)
    config = TrainConfig(
        method=method,
        model=path or "<module>",
        data="<eval>",
        out="<none>",
        ref_model=ref_model,
        cache_dir=cache_dir,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        max_completion_length=max_completion_length,
        truncation=truncation,
        kind=kind,
        columns=columns,
        on_invalid=on_invalid,
        hparams=dict(hparams or {}),
        micro_batch_size=batch_size,
    )
    objective = Objective(validate(config), "")
    objective.kind = objective_kind(objective.terms)
    world = World()
    if path is not None:
        if Path(path, "adapter_config.json").is_file():
            from peft import AutoPeftModelForCausalLM

            model = AutoPeftModelForCausalLM.from_pretrained(path)
            config.lora = True
        else:
            model = load_causal_lm(path)
    if isinstance(data, list):
        examples = data
    else:
        tok = load_tokenizer(tokenizer or path)
        examples = load_examples(data, config, objective, tok, split=None)
    if objective.needs_reference and ref_model is None and not hasattr(model, "disable_adapter"):
        raise ConfigError(
            f"evaluate: method '{method}' needs a reference — pass ref_model (the run's base model)"
        )
    ref = setup_reference(config, objective, model, 0, [examples], world, log=lambda _m: None)
    return evaluate_examples(
        model,
        examples,
        objective=objective,
        reference=ref.provider,
        loss_state={},
        world=world,
        batch_size=batch_size,
    )
