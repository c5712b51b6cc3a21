"""The training configuration: one typed dataclass that is the defaults, the CLI `--help` and the logged
run config at once (cleanrl's habit).

`TrainConfig` fields carry their help text in `field(metadata={"help": ...})`; `preftune train --help`
is generated from it. A config comes from YAML (`load_config`), then command-line overrides; loss
hyper-parameters (`beta`, `gamma`, ...) may appear as flat keys and are routed to every term of the
objective that declares them, or as `TERM.KEY` (e.g. `sft.weight`) for one term. `validate` checks
everything that can be checked without a model: unknown keys (with a "did you mean"), ranges, choices,
the loss hyper-parameters through `LossSpec.validate`, and whether the method's reference can exist.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from preftune.errors import ConfigError
from preftune.method_checks import check_distill, is_distill, validate_online
from preftune.online_methods import PRESETS, builder_of, expand, is_online
from preftune.paths import is_pipeline_folder
from preftune.trl_names import HELP as TRL_HELP
from preftune.trl_names import apply_rpo_alpha, translate

REFERENCE_STRATEGIES = ("auto", "cache", "model", "adapter", "none")
SCHEDULERS = ("constant", "linear", "cosine")
DTYPES = ("float32", "bfloat16", "float16")
SINKS = ("tensorboard", "wandb", "mlflow", "trackio")
MACROS = ("fixed", "randomized", "ppl")  # rl.gae's MA-RLHF terminations (kept free of torch here)
POOLINGS = ("equal", "unit", "position")


def _f(default: Any, help: str, **extra: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    """Everything one `preftune train` run needs. Each field's help is its documentation."""

    # --- what to train ---
    method: str = _f(
        "dpo", "Loss or weighted objective, e.g. 'dpo' or 'dpo:1.0,sft:0.2' (see 'preftune losses')."
    )
    model: str = _f("", "Policy to train: a Hugging Face model folder or hub id (required).")
    data: str = _f(
        "", "Training data: JSONL / JSON / Parquet / CSV file, saved dataset folder or hub id (required)."
    )
    out: str = _f("", "Run folder: config.yaml, metrics.jsonl, checkpoints/, final/ (required).")
    eval_data: str | None = _f(None, "Held-out data evaluated every `eval_every` steps and at the end.")
    tokenizer: str | None = _f(None, "Tokenizer folder or hub id; default: the model's.")
    hparams: dict[str, Any] = _f(
        {}, "Loss hyper-parameters, e.g. {beta: 0.1}; flat keys such as --beta also land here."
    )
    # --- data ---
    split: str | None = _f(None, "Split or slice of `data`, e.g. 'train' or 'train[:1000]'.")
    eval_split: str | None = _f(None, "Split or slice of `eval_data`.")
    kind: str | None = _f(
        None, "Data kind (pairwise | unpaired | ranked); default: detected from the columns."
    )
    columns: str | None = _f(None, "Column mapping 'prompt=question,chosen=good,...' when names differ.")
    chat_template: str | None = _f(
        None, "Jinja chat template (a file, or the template text) replacing the tokenizer's own."
    )
    max_length: int | None = _f(
        1024,
        "Tokens of prompt + response (TRL's default 1024); 0 or null: no limit. A longer row is cut "
        "or dropped (see `truncation`).",
        low=0,
    )
    max_prompt_length: int | None = _f(
        None, "Truncate the prompt (from the left) to this many tokens.", low=1
    )
    max_completion_length: int | None = _f(
        None,
        "Truncate each response (from the right) to this many tokens; null: no separate limit. Online "
        "methods: the generation budget (null: 512, TRL's default).",
        low=1,
    )
    truncation: str = _f(
        "truncate",
        "A row over a length limit: 'truncate' keeps it cut (the prompt keeps its end, each response "
        "its start) or 'drop' skips it; both are counted in the data summary.",
        choices=("truncate", "drop"),
    )
    add_eos: bool = _f(
        True,
        "Append EOS to every response; false for responses cut mid-answer (step-level or "
        "first-error pairs), where an EOS would be a token the model never meant to emit.",
    )
    on_invalid: str = _f(
        "error",
        "What to do with an invalid record: 'error' or 'drop' (counted in the log).",
        choices=("error", "drop"),
    )
    ranked_pairs: str = _f(
        "best_vs_worst",
        "How a pairwise loss turns ranked data into pairs: best_vs_worst | best_vs_each | all_pairs.",
        choices=("best_vs_worst", "best_vs_each", "all_pairs"),
    )
    cache_dir: str | None = _f(
        None, "Cache of tokenized data and reference log-probs; default $PREFTUNE_CACHE or ~/.cache/preftune."
    )
    # --- model ---
    dtype: str = _f("float32", "Weights dtype: float32 | bfloat16 (| float16 for inference).", choices=DTYPES)
    mixed_precision: str = _f(
        "no",
        "bf16: forward and backward in bfloat16, weights, gradients and optimizer state in float32 "
        "(torch.autocast; under fsdp a MixedPrecisionPolicy that gathers bf16 and reduces float32). "
        "Needs dtype=float32. The reference is computed the same way (its cache entry says so).",
        choices=("no", "bf16"),
    )
    lora: bool = _f(False, "Train LoRA adapters instead of all weights.")
    lora_r: int = _f(8, "LoRA rank r.", low=1)
    lora_alpha: float = _f(16.0, "LoRA scale α (update multiplied by α/r).", low=0.0, low_open=True)
    lora_dropout: float = _f(0.0, "Dropout on the LoRA input.", low=0.0, high=1.0, high_open=True)
    lora_target_modules: str = _f("all-linear", "Comma-separated module names to adapt, or 'all-linear'.")
    merge_lora: bool = _f(
        False,
        "With lora: save final/ as the full model with the adapters merged into the weights "
        "(the adapter itself in final/adapter/).",
    )
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")
    fsdp: bool = _f(
        False,
        "Under torchrun: shard weights, gradients and optimizer state over the processes (FSDP2) "
        "instead of a full copy on each (data parallel). Works with LoRA, every reference strategy, "
        "TR-DPO, stages and rounds.",
    )
    # --- reference ---
    reference: str = _f(
        "auto",
        "Reference strategy: auto | cache | model | adapter | none. auto: none for "
        "reference-free losses, model with ref_sync_every, else cache (precomputed once, "
        "reused across runs).",
        choices=REFERENCE_STRATEGIES,
    )
    ref_model: str | None = _f(None, "Reference model folder; default: the policy's initial weights.")
    ref_sync_every: int = _f(0, "TR-DPO: every N steps set π_ref ← α π_θ + (1−α) π_ref (0: never).", low=0)
    ref_sync_alpha: float = _f(
        0.6, "TR-DPO mixing weight α (1.0 = hard copy).", low=0.0, high=1.0, low_open=True
    )
    stages: int = _f(
        1,
        "Curriculum stages (Curry-DPO): data split easy→hard; each stage's reference is the "
        "previous stage's policy.",
        low=1,
    )
    curriculum_pairs: str = _f(
        "best_vs_rest",
        "Curry-DPO pairs from each ranked record: best_vs_rest (the paper's main setting) or all.",
        choices=("best_vs_rest", "all"),
    )
    curriculum_order: str = _f(
        "per_prompt",
        "Curry-DPO stage assignment: per_prompt (the paper's: each prompt's k-th easiest pair in stage k) "
        "or global (all pairs sorted by score gap).",
        choices=("per_prompt", "global"),
    )
    rounds: int = _f(
        1, "Iterative rounds over the data; each round's reference is the policy at its start.", low=1
    )
    apo_alpha: float = _f(
        0.0,
        "Accelerated PO: after round t, θ ← θ̂_t + α(θ̂_t − θ̂_{t−1}) (θ̂: a round's result before extrapolation; 0: off).",
        low=0.0,
    )
    # --- optimisation ---
    epochs: float = _f(
        1.0, "Passes over the training data (ignored when max_steps > 0).", low=0.0, low_open=True
    )
    max_steps: int = _f(0, "Optimizer steps to run (0: from epochs).", low=0)
    batch_size: int = _f(
        8,
        "Global batch: examples (pairs, completions or lists; online methods: prompts, each with "
        "num_generations samples) per optimizer step.",
        low=1,
    )
    micro_batch_size: int = _f(0, "Examples per forward pass per process (0: batch_size / processes).", low=0)
    lr: float = _f(1e-6, "Peak learning rate.", low=0.0, low_open=True)
    optimizer: str = _f("adamw", "torch.optim optimizer by name: adamw, adam, sgd, rmsprop, ...")
    optimizer_args: dict[str, Any] = _f({}, "Extra optimizer keyword arguments, e.g. {betas: [0.9, 0.95]}.")
    weight_decay: float = _f(0.0, "Decoupled weight decay.", low=0.0)
    scheduler: str = _f("linear", "Decay after warmup: constant | linear | cosine.", choices=SCHEDULERS)
    warmup_steps: int = _f(0, "Linear warmup steps (overrides warmup_ratio when > 0).", low=0)
    warmup_ratio: float = _f(
        0.1, "Warmup as a fraction of the total steps.", low=0.0, high=1.0, high_open=True
    )
    min_lr_ratio: float = _f(0.0, "Final learning rate as a fraction of lr.", low=0.0, high=1.0)
    max_grad_norm: float = _f(1.0, "Clip the global gradient norm to this (0: no clipping).", low=0.0)
    seed: int = _f(0, "Seed of data order, initialisation and dropout.")
    group_by_prompt: bool = _f(
        False,
        "Keep the examples that share a prompt together in the data order (shuffle prompts, not pairs), "
        "so that pairs built from one prompt's K responses share batches and packed rows: the prompt and "
        "each distinct response are computed once. Batches then hold correlated pairs.",
    )
    on_nonfinite: str = _f(
        "error",
        "Non-finite loss or gradient: 'error' stops the run, 'skip' drops the step.",
        choices=("error", "skip"),
    )
    # --- online methods (grpo, dr_grpo, rloo, remax, reinforce_pp, bnpo) ---
    prompts: str | None = _f(
        None,
        "Online methods: prompt data (JSONL / JSON / Parquet / CSV, dataset folder or hub id) with "
        "'prompt' (text or a message list); every other column goes to the reward as a keyword argument.",
    )
    reward: str | None = _f(
        None,
        "Online methods: the reward — arithmetic | arithmetic_steps | module:function | file.py:function "
        "| a weighted sum 'a:1,b:0.5' (docs/online.md).",
    )
    num_generations: int = _f(8, "Online methods: samples per prompt, G (TRL's default 8).", low=1)
    estimator: str | None = _f(
        None, "Online methods: advantage estimator (grpo, dr_grpo, rloo, remax, ...); default: the method's."
    )
    objective: str | None = _f(
        None, "Online methods: policy objective, e.g. 'ppo_clip:1,kl:0.01'; default: the method's."
    )
    # --- distillation (adpa, dckd, aligndistil; docs/online.md, Distillation) ---
    teacher: str | None = _f(
        None, "Distillation: the aligned teacher π_dpo (a model folder; the student's vocabulary)."
    )
    teacher_ref: str | None = _f(None, "Distillation: the teacher's reference π_ref (adpa, aligndistil).")
    sampler: str | None = _f(
        None, "Online methods: uniform | dapo_filter | reinforce_ada | gvm | vade; default: the method's."
    )
    sampler_args: dict[str, Any] = _f(
        {}, 'Online methods: the sampler\'s options as JSON, e.g. \'{"rounds": 4, "exit": "pos"}\'.'
    )
    temperature: float = _f(1.0, "Online methods: sampling temperature.", low=0.0, low_open=True)
    top_p: float = _f(1.0, "Online methods: nucleus sampling p (1: off).", low=0.0, high=1.0, low_open=True)
    top_k: int = _f(0, "Online methods: sample from the k most likely tokens (0: off).", low=0)
    # --- PPO family (ppo, ma_ppo, rto: estimator gae with a value head; TRL's PPOConfig names) ---
    kl_coef: float | None = _f(
        None,
        "PPO family: per-token KL penalty β·(log π − log π_ref) in the reward (ppo 0.05, rto 0.01).",
        low=0.0,
    )
    value_lr: float | None = _f(None, "PPO family: learning rate of the value head (default: lr).", low=0.0)
    gamma: float = _f(1.0, "PPO family: GAE discount γ.", low=0.0, high=1.0)
    lam: float = _f(0.95, "PPO family: GAE λ.", low=0.0, high=1.0)
    macro: str | None = _f(
        None, "MA-RLHF macro actions: fixed | randomized | ppl (ma_ppo: fixed).", choices=MACROS
    )
    macro_n: int = _f(5, "MA-RLHF: tokens per fixed macro action (1 = PPO).", low=1)
    macro_pooling: str = _f("equal", "MA-RLHF: value/reward pooling over a macro action.", choices=POOLINGS)
    dpo_model: str | None = _f(None, "RTO: the DPO model whose token log-ratio to `model` is a reward.")
    dpo_scale: float = _f(0.05, "RTO: scale s of the token reward s·(log π_dpo − log π_ref).", low=0.0)
    dpo_clip: float = _f(0.05, "RTO: clip c of each DPO token reward to [−c, c].", low=0.0, low_open=True)
    num_iterations: int = _f(
        1, "Online methods: optimizer steps per batch of rollouts, μ (TRL's num_iterations).", low=1
    )
    # --- evaluation, checkpoints, logging ---
    eval_every: int = _f(0, "Evaluate on eval_data every N steps (0: only at the end).", low=0)
    eval_batch_size: int = _f(0, "Examples per evaluation forward (0: micro_batch_size).", low=0)
    save_every: int = _f(0, "Checkpoint every N steps (0: only at the end).", low=0)
    keep_last: int = _f(2, "Checkpoints kept on disk (oldest removed).", low=1)
    resume: str | None = _f(
        None,
        "Resume: 'latest' (newest checkpoint in OUT; with none yet, start over from step 0) or a checkpoint "
        "folder. Settings must equal the run's config.yaml but for a safe few (docs/training.md, Resume rules).",
    )
    log_every: int = _f(1, "Log train metrics every N steps.", low=1)
    report_to: list[str] = _f(
        [], "Extra metric sinks: tensorboard, wandb, mlflow, trackio (must be installed)."
    )
    run_name: str | None = _f(None, "Run name for the sinks; default: the out folder's name.")
    progress: bool = _f(
        True,
        "On a terminal, a live progress bar with ETA and key metrics; false, or when the output is "
        "not a terminal (nohup, CI, a pipe): one plain log line every log_every steps.",
    )
    report: bool = _f(
        True,
        "Write OUT/report.html when the run ends (plots of metrics.jsonl; `preftune report OUT` rebuilds it).",
    )


FIELDS: dict[str, dataclasses.Field[Any]] = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS: dict[str, Any] = get_type_hints(TrainConfig)


def field_type(name: str) -> tuple[type, bool]:
    """(base type, optional) of a config field: `int | None` → (int, True)."""
    hint = _HINTS[name]
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        return _base(args[0]), True
    return _base(hint), False


def _base(hint: Any) -> type:
    origin = get_origin(hint)
    return origin if origin is not None else hint  # type: ignore[no-any-return]


def did_you_mean(name: str, options: list[str]) -> str:
    """ "; did you mean 'X'?" for a likely typo of option X, else "". With the same number of
    '_'-separated words, every word must be a near-spelling of X's (so `save_steps` never suggests
    `max_steps`, nor `rpo_alpha` `apo_alpha`: different words, different meanings)."""
    words = name.split("_")
    for close in difflib.get_close_matches(name, options, n=5, cutoff=0.6):
        other = close.split("_")
        if len(other) == len(words):
            if all(difflib.SequenceMatcher(None, a, b).ratio() >= 0.75 for a, b in zip(words, other)):
                return f"; did you mean '{close}'?"
        elif difflib.SequenceMatcher(None, name, close).ratio() >= 0.8:
            return f"; did you mean '{close}'?"
    return ""


def coerce_value(name: str, value: Any, where: str = "config") -> Any:
    """Convert `value` (from YAML or the command line) to the type of field `name`."""
    base, optional = field_type(name)

    def bad(why: str) -> ConfigError:
        return ConfigError(f"{where}: '{name}' = {value!r} {why} — {FIELDS[name].metadata['help']}")

    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise bad("must be set")
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise bad("is not true/false")
    if base is int:
        if isinstance(value, bool):
            raise bad("is a boolean, expected an integer")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise bad("is not an integer") from None
        if not number.is_integer():
            raise bad("is not an integer")
        return int(number)
    if base is float:
        if isinstance(value, bool):
            raise bad("is a boolean, expected a number")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise bad("is not a number") from None
        if not math.isfinite(out):
            raise bad("is not finite")
        return out
    if base is str:
        if isinstance(value, (dict, list)):
            raise bad("is not a string")
        return str(value)
    if base is list:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            return [str(v) for v in value]
        raise bad("is not a list")
    if base is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise bad("is not a JSON object") from None
        if not isinstance(value, dict):
            raise bad("is not a mapping")
        return dict(value)
    raise bad(f"has an unsupported type {base}")  # pragma: no cover - all fields covered above


def config_from_dict(values: Mapping[str, Any], *, where: str = "config") -> TrainConfig:
    """Build a `TrainConfig` from a flat mapping. Keys that are not fields are loss hyper-parameters
    (checked by `validate` against the objective), so typos are reported there with a "did you mean"."""
    kwargs: dict[str, Any] = {}
    hparams: dict[str, Any] = {}
    values = translate(values, where)
    apply_rpo_alpha(values, where)
    for key, value in values.items():
        key = str(key).replace("-", "_") if str(key).replace("-", "_") in FIELDS else str(key)
        if key == "hparams":
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: 'hparams' must be a mapping such as {{beta: 0.1}}")
            hparams.update(value)
        elif key in FIELDS:
            kwargs[key] = coerce_value(key, value, where)
        else:
            hparams[key] = value
    config = TrainConfig(**kwargs)
    config.hparams = hparams
    return config


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Read a YAML config (optional), apply `overrides` (CLI values win), return the unvalidated config."""
    values: dict[str, Any] = {}
    where = "command line"
    if path is not None:
        p = Path(path)
        where = str(p)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of keys to values")
        values.update(translate(loaded, where))
    for key, value in translate(overrides or {}, "command line").items():
        if key == "hparams":
            values.setdefault("hparams", {})
            values["hparams"] = {**values["hparams"], **value}
        else:
            values[key] = value
    return config_from_dict(values, where=where)


def config_to_dict(
    config: TrainConfig, objective: list[tuple[Any, float, dict[str, Any]]] | None = None
) -> dict[str, Any]:
    """The config as a plain mapping. With `objective` (from `validate`), `hparams` holds every
    resolved loss hyper-parameter, defaults included — flat keys for a one-term method, `TERM.KEY`
    otherwise — so the mapping loads back (`load_config`) to the same objective."""
    values = dataclasses.asdict(config)
    if objective is not None:
        online = is_online(config.method)
        # online: TERM.KEY, apart from the estimator's keys (a builder's offline objective: as offline)
        one = len(objective) == 1 and (not online or bool(builder_of(config.method)))
        values["hparams"] = {
            (key if one else f"{spec.name}.{key}"): list(v) if isinstance(v, tuple) else v
            for spec, _, hp in objective
            for key, v in hp.items()
        }
        if online and builder_of(config.method):  # the builder's options (rl.builders)
            from preftune.rl.builders import builder_options

            values["hparams"].update(builder_options(config.method, config.hparams))
        elif online:
            from preftune.online_options import recorded_hparams

            extra = recorded_hparams(config.method, config.estimator, config.objective, config.hparams)
            values["hparams"].update(extra)
    return values


def save_config(
    config: TrainConfig, path: str | Path, objective: list[tuple[Any, float, dict[str, Any]]] | None = None
) -> None:
    """Write `config_to_dict(config, objective)` as YAML (a run's OUT/config.yaml)."""
    text = yaml.safe_dump(config_to_dict(config, objective), sort_keys=False, allow_unicode=True)
    Path(path).write_text(text, encoding="utf-8")


def _check_range(config: TrainConfig) -> None:
    for name, f in FIELDS.items():
        value = getattr(config, name)
        meta = f.metadata
        if value is None:
            continue
        if "choices" in meta and value not in meta["choices"]:
            raise ConfigError(
                f"'{name}' = {value!r} is not one of {', '.join(meta['choices'])}"
                f"{did_you_mean(str(value), list(meta['choices']))}"
            )
        low, high = meta.get("low"), meta.get("high")
        if low is not None and (value < low or (meta.get("low_open") and value == low)):
            raise ConfigError(
                f"'{name}' = {value} must be {'>' if meta.get('low_open') else '≥'} {low} — {meta['help']}"
            )
        if high is not None and (value > high or (meta.get("high_open") and value == high)):
            raise ConfigError(
                f"'{name}' = {value} must be {'<' if meta.get('high_open') else '≤'} {high} — {meta['help']}"
            )


def resolve_objective(config: TrainConfig) -> list[tuple[Any, float, dict[str, Any]]]:
    """[(LossSpec, weight, validated hyper-parameters)] of the config's objective.

    Flat keys go to every term that declares them; `TERM.KEY` to one term. A key no term declares is
    an error with a "did you mean" over config fields and the terms' hyper-parameters.
    """
    from preftune import losses

    defaults: dict[str, Any] = {}
    given: Mapping[str, Any] = config.hparams
    builder_keys: set[str] = set()
    if is_online(config.method):  # a preset: its policy objective (kind "policy"), overridable
        from preftune.losses.policy_losses import parse_policy_objective
        from preftune.online_options import resolve_online

        if builder_of(config.method):  # sampled groups → offline examples: an offline objective
            from preftune.rl.builders import BUILDERS

            _, text, defaults, _ = expand(config.method, config.estimator, config.objective)
            terms = losses.parse_objective(text)
            builder_keys = set(BUILDERS[builder_of(config.method)].hparams)
        else:
            online = resolve_online(config.method, config.estimator, config.objective, config.hparams)
            terms = parse_policy_objective(online.objective)
            given, defaults = online.term_hparams, online.defaults  # the estimator's keys went to it
    elif is_distill(config.method):  # teacher distributions (kind "distill")
        from preftune.losses.distill_losses import parse_distill_objective

        terms = parse_distill_objective(config.method)
    else:
        terms = losses.parse_objective(config.method)
    per_term: dict[str, dict[str, Any]] = {spec.name: {} for spec, _ in terms}
    known = sorted(
        ({k for spec, _ in terms for k in spec.hparams} | set(FIELDS) | set(TRL_HELP) | builder_keys)
        - {"hparams"}
    )
    for key, value in given.items():
        if key in builder_keys:  # an option of the online method's example builder (rl.builders)
            continue
        term, dot, name = str(key).rpartition(".")
        if dot:
            if term not in per_term:
                raise ConfigError(
                    f"hyper-parameter '{key}': '{term}' is not a term of method '{config.method}'"
                )
            per_term[term][name] = value
            continue
        takers = [spec.name for spec, _ in terms if key in spec.hparams]
        if key == "beta" and not takers and "orpo" in per_term:
            # TRL's ORPOConfig.beta is λ, the odds-ratio weight (Hong et al. 2024, ORPO, eq. 6)
            key, name, takers = "odds_ratio_weight", "odds_ratio_weight", ["orpo"]
        if not takers:
            hint = (
                " (TRL's label_smoothing is ε of rdpo, TRL's 'robust', and of cdpo)"
                if key == "epsilon"
                else ""
            )
            raise ConfigError(
                f"unknown option '{key}' for method '{config.method}'{did_you_mean(str(key), known)}{hint} "
                f"(config fields: see 'preftune train --help'; loss options: 'preftune losses')"
            )
        for t in takers:
            per_term[t].setdefault(name, value)
    for key, value in defaults.items():
        for spec, _ in terms:
            if key in spec.hparams:
                per_term[spec.name].setdefault(key, value)
    return [(spec, weight, spec.validate(per_term[spec.name])) for spec, weight in terms]


def reference_strategy(config: TrainConfig, needs_reference: bool) -> str:
    """The reference strategy a run uses: 'none', 'cache', 'model' or 'adapter' ('auto' resolved).

    Online methods score new samples every step, which a cache of fixed examples cannot key: their
    `auto` is the adapter-disabled policy under LoRA, else a frozen copy of the initial model."""
    if not needs_reference:
        return "none"
    if config.reference != "auto":
        return config.reference
    if is_online(config.method) or is_pipeline_folder(config.model):  # noise differs every step
        return "adapter" if config.lora else "model"
    return "model" if config.ref_sync_every > 0 else "cache"


def validate(config: TrainConfig) -> list[tuple[Any, float, dict[str, Any]]]:
    """Check `config` before any model loads; return the resolved objective (see `resolve_objective`)."""
    online = is_online(config.method)
    for name in ("model", "out") if online else ("model", "data", "out"):
        if not getattr(config, name):
            raise ConfigError(f"'{name}' is required — {FIELDS[name].metadata['help']}")
    if not online and (
        config.prompts
        or config.reward
        or config.estimator
        or config.objective
        or config.sampler
        or config.num_iterations > 1
    ):
        raise ConfigError(
            f"prompts / reward / estimator / objective / sampler / num_iterations are for the online methods "
            f"({', '.join(PRESETS)}), "
            f"not '{config.method}'"
        )
    _check_range(config)
    for sink in config.report_to:
        if sink not in SINKS:
            raise ConfigError(
                f"report_to: unknown sink '{sink}'{did_you_mean(sink, list(SINKS))} (known: {', '.join(SINKS)})"
            )
    _check_optimizer(config.optimizer)
    objective = resolve_objective(config)
    needs_ref = any(spec.needs_reference for spec, _, _ in objective)
    strategy = reference_strategy(config, needs_ref)
    if needs_ref and strategy == "none":
        raise ConfigError(
            f"method '{config.method}' needs a reference model but reference='none' — use "
            "reference=cache (default), model or adapter"
        )
    if not needs_ref and (
        config.ref_model or config.reference not in ("auto", "none") or config.ref_sync_every
    ):
        raise ConfigError(
            f"method '{config.method}' is reference-free: remove ref_model / reference / "
            "ref_sync_every (they would be ignored)"
        )
    if online:
        validate_online(config, strategy)
    check_distill(config, objective)
    if config.merge_lora and not config.lora:
        raise ConfigError("merge_lora merges LoRA adapters into the weights; it needs lora=true (--lora)")
    if strategy == "adapter" and not config.lora:
        raise ConfigError("reference='adapter' (the policy with LoRA adapters disabled) needs lora=true")
    if strategy == "adapter" and config.ref_model:
        raise ConfigError("reference='adapter' uses the policy's base weights; remove ref_model")
    if config.ref_sync_every and strategy != "model":
        raise ConfigError(
            f"ref_sync_every (TR-DPO) updates the reference during training, which needs "
            f"reference='model', not '{strategy}'"
        )
    if config.eval_every and not config.eval_data:
        raise ConfigError("eval_every > 0 needs eval_data")
    if config.apo_alpha and config.rounds < 2:
        raise ConfigError("apo_alpha (Accelerated PO) extrapolates between rounds: set rounds ≥ 2")
    if config.stages > 1 and config.rounds > 1:
        raise ConfigError("stages (Curry-DPO) and rounds (iterative / Accelerated PO) cannot be combined")
    if config.stages > 1 and any(spec.kind not in ("pairwise", "any") for spec, _, _ in objective):
        raise ConfigError("stages (Curry-DPO) build pairs from ranked data: use a pairwise loss")
    if (config.stages > 1 or config.rounds > 1) and strategy == "adapter":
        raise ConfigError(
            "stages / rounds move the reference to the policy of the previous phase; "
            "reference='adapter' cannot follow it — use reference=cache (default)"
        )
    if (
        (config.stages > 1 or config.rounds > 1 or config.ref_sync_every)
        and strategy == "model"
        and config.lora
    ):
        raise ConfigError(
            "a moving reference model (TR-DPO sync, stages, rounds) needs full fine-tuning, "
            "not lora — or use reference=cache for stages/rounds"
        )
    if config.mixed_precision != "no" and config.dtype != "float32":
        raise ConfigError(
            f"mixed_precision={config.mixed_precision} keeps float32 weights and computes in bfloat16; "
            f"dtype={config.dtype} would already hold the weights in low precision — set dtype=float32, "
            "or mixed_precision=no"
        )
    if (config.stages > 1 or config.rounds > 1) and not needs_ref:
        raise ConfigError("stages and rounds move the reference between stages; the method uses none")
    return objective


def _check_optimizer(name: str) -> None:
    import torch.optim

    if optimizer_class(name) is None:
        names = [
            n
            for n in dir(torch.optim)
            if isinstance(getattr(torch.optim, n), type)
            and issubclass(getattr(torch.optim, n), torch.optim.Optimizer)
            and n != "Optimizer"
        ]
        raise ConfigError(
            f"optimizer '{name}' is not a torch.optim optimizer"
            f"{did_you_mean(name.lower(), [n.lower() for n in names])} (known: {', '.join(names)})"
        )


def optimizer_class(name: str) -> Any:
    """The torch.optim class called `name`, case-insensitive ('adamw' → AdamW), or None."""
    import torch.optim

    for attr in dir(torch.optim):
        obj = getattr(torch.optim, attr)
        if attr.lower() == name.lower() and isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer):
            return obj
    return None


def reference_markdown() -> str:
    """The config reference as a Markdown table, generated from the field help (docs/training.md
    embeds it between markers; a test keeps the two in sync)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for name, f in FIELDS.items():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc,operator]
        text = str(f.metadata["help"]).replace("|", "\\|")
        rows.append(f"| `{name}` | `{default!r}` | {text} |")
    return "\n".join(rows)
