"""TRL's option names, accepted as aliases with TRL's meaning (on the command line and in YAML).

A user coming from TRL can keep writing `--model_name_or_path`, `--learning_rate`,
`--per_device_train_batch_size 4 --gradient_accumulation_steps 8`, `--loss_type robust`, ... Each alias
is translated to preftune's own field before validation, so `config.yaml` records preftune's names.
Names that are the same in both tools (`--max_length`, `--lora_r`, `--beta`, `--max_steps`, ...)
need no alias. Kept free of torch so that `preftune --help` stays fast.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from preftune.errors import ConfigError

# TRL / transformers name → preftune field with the same meaning
RENAMED: dict[str, str] = {
    "model_name_or_path": "model",
    "dataset_name": "data",
    "output_dir": "out",
    "learning_rate": "lr",
    "num_train_epochs": "epochs",
    "logging_steps": "log_every",
    "save_steps": "save_every",
    "eval_steps": "eval_every",
    "use_peft": "lora",
    "lr_scheduler_type": "scheduler",
    "per_device_eval_batch_size": "eval_batch_size",
    "ref_model_mixup_alpha": "ref_sync_alpha",
}

# TRL loss_type → preftune method, where the names differ (the others, e.g. ipo, hinge, sft, are the same)
LOSS_TYPES: dict[str, str] = {
    "sigmoid": "dpo",
    "robust": "rdpo",
    "bco_pair": "bco",
    "sigmoid_norm": "dpo_norm",
}

TRL_BATCH_DEFAULT = 8  # TRL's (transformers') per_device_train_batch_size default
TRL_SYNC_STEPS_DEFAULT = 512  # TRL's ref_model_sync_steps default (TR-DPO's τ)

# What `preftune train --help` lists under "TRL names"; every alias, with what it becomes.
HELP: dict[str, str] = {
    **{k: f"= --{v.replace('_', '-')}" for k, v in RENAMED.items()},
    "per_device_train_batch_size": "examples per forward per process: micro_batch_size = this, "
    f"batch_size = this × gradient_accumulation_steps × processes (TRL's default {TRL_BATCH_DEFAULT})",
    "gradient_accumulation_steps": "micro-batches per process per optimizer step (see above; default 1)",
    "loss_type": "= --method; TRL's names map to preftune's: "
    + ", ".join(f"{k}→{v}" for k, v in LOSS_TYPES.items())
    + "; a comma list is a sum (weights from --loss_weights, default 1 each). With an online method "
    "(grpo, rloo, ...) it is GRPOConfig's: the aggregation, grpo | dapo | dr_grpo",
    "epsilon_high": "online methods: ppo_clip's upper clip range eps_high (GRPOConfig; default: --epsilon)",
    "scale_rewards": "online methods, estimator grpo: scale advantages by the std of the group | batch | "
    "none (true = group, false = none)",
    "loss_weights": "comma list of weights for the --loss_type list",
    "label_smoothing": "ε of robust DPO (loss_type robust = rdpo) and cDPO (cdpo): the probability "
    "that a label is flipped (hyper-parameter epsilon)",
    "rpo_alpha": "RPO: add α × the NLL of the chosen responses (per token over the batch), i.e. "
    "method 'dpo' becomes 'dpo:1,sft:α'",
    "bf16": "switch: mixed_precision=bf16 (float32 weights, bfloat16 compute)",
    "sync_ref_model": "switch: TR-DPO, update the reference every ref_model_sync_steps steps "
    f"(default {TRL_SYNC_STEPS_DEFAULT}) = ref_sync_every",
    "ref_model_sync_steps": "TR-DPO's τ, with sync_ref_model",
    "beta": "with method orpo: TRL's ORPO β is λ, the odds-ratio weight (odds_ratio_weight)",
}

_SWITCHES = {"use_peft", "bf16", "sync_ref_model"}


def _bool(name: str, value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ConfigError(f"{where}: '{name}' = {value!r} is not true/false")


def _int(name: str, value: Any, where: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not number.is_integer() or number < 1:
        raise ConfigError(f"{where}: '{name}' = {value!r} must be a positive integer")
    return int(number)


def _methods(loss_type: Any, weights: Any, where: str) -> str:
    names = loss_type if isinstance(loss_type, list) else str(loss_type).split(",")
    names = [LOSS_TYPES.get(str(n).strip(), str(n).strip()) for n in names]
    if weights is None:
        return ",".join(names)
    ws = weights if isinstance(weights, list) else str(weights).split(",")
    if len(ws) != len(names):
        raise ConfigError(
            f"{where}: loss_weights has {len(ws)} weights for {len(names)} loss types ({', '.join(names)})"
        )
    return ",".join(f"{n}:{str(w).strip()}" for n, w in zip(names, ws))


def translate(values: Mapping[str, Any], where: str = "config") -> dict[str, Any]:
    """`values` with TRL's names replaced by preftune's (see HELP). A TRL name next to the preftune
    field it stands for, in the same source, is an error (which one should win?).

    `rpo_alpha` stays as it is: it changes the method, which may come from another source
    (`apply_rpo_alpha` runs once everything is merged)."""
    out: dict[str, Any] = {}
    given = {str(k).replace("-", "_"): v for k, v in values.items()}

    def put(field: str, value: Any, alias: str) -> None:
        if field in given or field in out:
            raise ConfigError(f"{where}: '{alias}' (TRL's name) and '{field}' both given; keep one")
        out[field] = value

    for key, value in given.items():
        if key in RENAMED:
            put(RENAMED[key], _bool(key, value, where) if key in _SWITCHES else value, key)
        elif key == "bf16":
            put("mixed_precision", "bf16" if _bool(key, value, where) else "no", key)
        elif key == "loss_type" and _grpo_loss_type(value, given.get("method")):
            out[key] = value  # an online method's aggregation (preftune.online_options)
        elif key == "loss_type":
            put("method", _methods(value, given.get("loss_weights"), where), key)
        elif key == "label_smoothing":
            put("epsilon", value, key)
        elif key == "report_to" and value in ("none", ["none"]):  # TRL's way of saying no sinks
            out[key] = []
        elif key in _LATER:
            continue
        else:
            out[key] = value
    if "loss_weights" in given and "loss_type" not in given:
        raise ConfigError(f"{where}: loss_weights needs loss_type (the losses it weighs)")
    _sync(given, put, where)
    per_device = given.get("per_device_train_batch_size")
    accumulation = given.get("gradient_accumulation_steps")
    if per_device is not None or accumulation is not None:
        micro = _int("per_device_train_batch_size", per_device or TRL_BATCH_DEFAULT, where)
        steps = _int("gradient_accumulation_steps", accumulation or 1, where)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        alias = "per_device_train_batch_size / gradient_accumulation_steps"
        put("micro_batch_size", micro, alias)
        put("batch_size", micro * steps * world, alias)
    return out


def _grpo_loss_type(value: Any, method: Any) -> bool:
    """Whether `loss_type` is GRPOConfig's (an aggregation): with an online method, or a name that
    only GRPO uses."""
    from preftune.online_methods import is_online

    grpo_only = ("dapo", "cispo", "sapo")
    return isinstance(value, str) and (value.strip() in grpo_only or is_online(str(method or "")))


_LATER = (
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "loss_weights",
    "sync_ref_model",
    "ref_model_sync_steps",
)


def _sync(given: Mapping[str, Any], put: Any, where: str) -> None:
    """TRL's TR-DPO switches: sync_ref_model with ref_model_sync_steps τ → ref_sync_every = τ."""
    steps = given.get("ref_model_sync_steps")
    if "sync_ref_model" in given and _bool("sync_ref_model", given["sync_ref_model"], where):
        every = TRL_SYNC_STEPS_DEFAULT if steps is None else _int("ref_model_sync_steps", steps, where)
        put("ref_sync_every", every, "sync_ref_model")
    elif steps is not None:
        raise ConfigError(
            f"{where}: ref_model_sync_steps takes effect with sync_ref_model (as in TRL) — add "
            "--sync_ref_model, or use ref_sync_every"
        )


def apply_rpo_alpha(values: dict[str, Any], where: str = "config") -> None:
    """TRL's `rpo_alpha` = α: the objective gains the term α × NLL(chosen), averaged over the chosen
    tokens of the batch (Pang et al. 2024, Iterative Reasoning Preference Optimization, eq. 1), which
    is preftune's `sft` term: method 'dpo' becomes 'dpo:1,sft:α'."""
    if "rpo_alpha" not in values:
        return
    alpha = values.pop("rpo_alpha")
    if alpha is None or str(alpha).lower() in ("none", "null"):
        return
    try:
        if float(alpha) == 0:  # TRL: no NLL term
            return
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: 'rpo_alpha' = {alpha!r} is not a number") from None
    method = str(values.get("method") or "dpo")
    if any(part.split(":")[0].strip() == "sft" for part in method.split(",")):
        raise ConfigError(
            f"{where}: rpo_alpha adds an sft term, but method '{method}' already has one; "
            "set its weight in the method instead"
        )
    values["method"] = f"{method},sft:{alpha}"
