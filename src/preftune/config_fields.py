"""The `TrainConfig` dataclass: its fields, their defaults and their help text — the one table that is the
defaults, the CLI `--help`, the logged run config and the config reference in docs/training.md
(`reference_markdown`). Reading, coercing and validating a config live in `preftune.config`.
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass, field
from typing import Any, Union, get_args, get_origin, get_type_hints

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


def _online(default: Any, help: str, **extra: Any) -> Any:
    """A field that only online methods read (`online_only_fields`)."""
    return _f(default, help, online=True, **extra)


def _ppo(default: Any, help: str, reader: str, **extra: Any) -> Any:
    """A field that only the PPO family reads (`ppo_only_fields`); `reader` says which part of it:
    `ppo` (estimator gae), `macro` (MA-RLHF's macro actions), `macro_fixed` (its fixed n-grams) or
    `rto` (RTO's DPO token rewards)."""
    return _online(default, help, ppo=reader, **extra)


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
    eval_data: str | None = _f(
        None,
        "Held-out data evaluated every `eval_every` steps and at the end (online methods: held-out "
        "prompts, the mean reward of greedy responses).",
    )
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
    malloc_mmap_threshold_mib: float = _f(
        0.0,
        "CPU memory (Linux/glibc): blocks of at least this many MiB are mapped from the system and "
        "returned to it when freed, instead of kept in glibc's heap, where one step's freed buffers "
        "do not fit the next step's and the heap grows. Sets mallopt(M_MMAP_THRESHOLD) for the rest "
        "of the process; 0: glibc's default (a threshold that rises up to 32 MiB); an environment "
        "MALLOC_MMAP_THRESHOLD_ wins. No effect elsewhere. Off by default: 1 MiB lowered a DPO "
        "benchmark's peak by 1 % at 9-28 % more CPU time (docs/performance.md).",
        low=0.0,
        high=32.0,
    )
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
    prompts: str | None = _online(
        None,
        "Online methods: prompt data (JSONL / JSON / Parquet / CSV, dataset folder or hub id) with "
        "'prompt' (text or a message list); every other column goes to the reward as a keyword argument.",
    )
    reward: str | None = _online(
        None,
        "Online methods: the reward — arithmetic | arithmetic_steps | module:function | file.py:function "
        "| a weighted sum 'a:1,b:0.5' (docs/online.md).",
    )
    num_generations: int = _online(8, "Online methods: samples per prompt, G (TRL's default 8).", low=1)
    estimator: str | None = _online(
        None, "Online methods: advantage estimator (grpo, dr_grpo, rloo, remax, ...); default: the method's."
    )
    objective: str | None = _online(
        None, "Online methods: policy objective, e.g. 'ppo_clip:1,kl:0.01'; default: the method's."
    )
    # --- distillation (adpa, dckd, aligndistil; docs/online.md, Distillation) ---
    teacher: str | None = _f(
        None, "Distillation: the aligned teacher π_dpo (a model folder; the student's vocabulary)."
    )
    teacher_ref: str | None = _f(
        None,
        "Distillation: the teacher's reference π_ref (adpa, aligndistil); aligndistil --contrast reverse: "
        "a reverse DPO model (DPO on the swapped pairs).",
    )
    sampler: str | None = _online(
        None, "Online methods: uniform | dapo_filter | reinforce_ada | gvm | vade; default: the method's."
    )
    sampler_args: dict[str, Any] = _online(
        {}, 'Online methods: the sampler\'s options as JSON, e.g. \'{"rounds": 4, "exit": "pos"}\'.'
    )
    temperature: float = _online(1.0, "Online methods: sampling temperature.", low=0.0, low_open=True)
    top_p: float = _online(
        1.0, "Online methods: nucleus sampling p (1: off).", low=0.0, high=1.0, low_open=True
    )
    top_k: int = _online(0, "Online methods: sample from the k most likely tokens (0: off).", low=0)
    # --- PPO family (ppo, ma_ppo, rto: estimator gae with a value head; TRL's PPOConfig names) ---
    kl_coef: float | None = _ppo(
        None,
        "PPO family: per-token KL penalty β·(log π − log π_ref) in the reward (ppo 0.05, rto 0.01).",
        "ppo",
        low=0.0,
    )
    value_lr: float | None = _ppo(
        None, "PPO family: learning rate of the value head (default: lr).", "ppo", low=0.0
    )
    gamma: float = _ppo(
        1.0,
        "PPO family: GAE discount γ. Where a term or estimator has its own γ, --gamma is that one "
        "instead: simpo's / alphapo's target margin (also as an online builder's objective), "
        "reinforce_pp's discount.",
        "ppo",
        low=0.0,
        high=1.0,
    )
    lam: float = _ppo(0.95, "PPO family: GAE λ.", "ppo", low=0.0, high=1.0)
    macro: str | None = _ppo(
        None, "MA-RLHF macro actions: fixed | randomized | ppl (ma_ppo: fixed).", "ppo", choices=MACROS
    )
    macro_n: int = _ppo(5, "MA-RLHF: tokens per fixed macro action (1 = PPO).", "macro_fixed", low=1)
    macro_pooling: str = _ppo(
        "equal", "MA-RLHF: value/reward pooling over a macro action.", "macro", choices=POOLINGS
    )
    dpo_model: str | None = _ppo(
        None, "RTO: the DPO model whose token log-ratio to `model` is a reward.", "ppo"
    )
    dpo_scale: float = _ppo(
        0.05, "RTO: scale s of the token reward s·(log π_dpo − log π_ref).", "rto", low=0.0
    )
    dpo_clip: float = _ppo(
        0.05, "RTO: clip c of each DPO token reward to [−c, c].", "rto", low=0.0, low_open=True
    )
    num_iterations: int = _online(
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


def reference_markdown() -> str:
    """The config reference as a Markdown table, generated from the field help (docs/training.md
    embeds it between markers; a test keeps the two in sync)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for name, f in FIELDS.items():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc,operator]
        text = str(f.metadata["help"]).replace("|", "\\|")
        rows.append(f"| `{name}` | `{default!r}` | {text} |")
    return "\n".join(rows)


def online_only_fields() -> frozenset[str]:
    """The TrainConfig fields only online methods read (prompts, reward, num_generations, ...): those
    declared with `_online`."""
    return frozenset(name for name, f in FIELDS.items() if f.metadata.get("online"))


def ppo_only_fields() -> dict[str, str]:
    """The TrainConfig fields only the PPO family reads (declared with `_ppo`), each with the part of
    it that reads the field: `ppo`, `macro`, `macro_fixed` or `rto` (`method_checks.check_ppo_fields`)."""
    return {name: str(f.metadata["ppo"]) for name, f in FIELDS.items() if f.metadata.get("ppo")}
