"""Config checks of the samplers and of distillation (imports no torch: `preftune --help` reads config)."""

from __future__ import annotations

from typing import Any

from preftune.errors import ConfigError

DISTILL_METHODS = ("adpa", "dckd", "aligndistil")  # preftune.losses.distill_losses (+ "nll", no method)
DIFFUSION_LOSSES = ("diff_kto", "mapo", "smpo", "inpo", "seppo", "pso")  # preftune.losses.diffusion_losses
# a language loss whose diffusion form has another name (Diffusion-KTO: KTO on per-image statistics)
DIFFUSION_COUNTERPARTS = {"kto": "diff_kto"}
LANGUAGE_FORMS = {v: k for k, v in DIFFUSION_COUNTERPARTS.items()}  # diff_kto → kto
# an online language preset → the online diffusion method of the same idea (`diffusion_methods.METHODS`):
# DDPO's per-prompt standardised rewards with PPO-clip are GRPO's; DPOK's value baseline and KL to the
# pretrained model are PPO's; D3PO is DPO on the model's own sample pairs, as online DPO
ONLINE_DIFFUSION_COUNTERPARTS = {"grpo": "ddpo", "ppo": "dpok", "online_dpo": "d3po"}


def is_distill(method: str) -> bool:
    """Whether `method` is a distillation objective ("adpa", "dckd:1,adpa:0.5", "adpa:1,nll:0.1", ...)."""
    return any(part.partition(":")[0].strip() in DISTILL_METHODS for part in method.split(","))


def check_model_kind(config: Any, terms: list[tuple[Any, float, dict[str, Any]]], pipeline: bool) -> None:
    """The method fits the model: the diffusion-only losses need a diffusers pipeline folder, and on
    one only the offline losses run (the online LM presets sample text, distillation compares
    next-token distributions). Diffusion's online methods (ddpo, ...) check their model themselves."""
    from preftune.online_methods import is_online

    method = config.method.strip()
    if pipeline and (is_online(method) or is_distill(method)):
        what = "samples text from a language model" if is_online(method) else "distils a language model"
        raise ConfigError(
            f"method '{method}' {what}; --model {config.model} is a diffusers pipeline folder — "
            f"{online_counterpart(method)}its online methods are ddpo, dpok, d3po, spo and awm, its "
            "offline ones dpo, hinge, ipo and the diffusion losses (docs/diffusion.md)"
        )
    if pipeline:
        check_image_objective(terms, config.model)
    names = [spec.name for spec, _, _ in terms if spec.name in DIFFUSION_LOSSES]
    if names and not pipeline:
        raise ConfigError(
            f"'{names[0]}' is a diffusion loss (docs/diffusion.md): --model must be a diffusers pipeline "
            f"folder (model_index.json), not '{config.model}'; {language_loss_hint(names[0])}"
        )


def online_counterpart(method: str) -> str:
    """The hint "use M (what M is); " for an online language preset with an online diffusion method
    of the same idea (`ONLINE_DIFFUSION_COUNTERPARTS`), else ""."""
    from preftune.diffusion_methods import METHODS

    other = ONLINE_DIFFUSION_COUNTERPARTS.get(method.strip())
    return f"use {other}, its diffusion counterpart ({METHODS[other].partition(': ')[2]}); " if other else ""


def image_loss_problem(spec: Any, alone: bool = True) -> str:
    """Why the registered loss `spec` cannot train a denoiser on image data ("" when it can): a
    pipeline folder gives one denoising statistic per image (`diffusion.seam`), and image data holds
    pairs or single labelled images. `alone`: the loss is the whole objective (sft joins others)."""
    if spec.kind == "listwise":
        return "it trains on ranked lists of responses, and image data holds pairs or single images"
    if spec.kind == "any" and alone:
        return (
            "alone it has no image data layout; on a pipeline folder it is a term beside a pairwise or "
            "unpaired loss (e.g. dpo:1,sft:0.1)"
        )
    if spec.needs_mismatched:
        return (
            "its reference point z₀ scores completions of other prompts under each prompt, which a "
            "denoiser's per-image statistic does not give"
        )
    if spec.needs_token_logps:
        return "it reads per-token log-probs, and a denoiser gives one statistic per image"
    return ""


def image_losses() -> list[str]:
    """The offline losses `preftune train` trains a diffusers pipeline folder with, sorted."""
    from preftune.losses import REGISTRY

    return sorted(name for name, spec in REGISTRY.items() if not image_loss_problem(spec))


def image_loss_refusal(name: str, why: str, losses: list[str]) -> str:
    """The fix of a loss that cannot train a denoiser: its diffusion form when it has one under another
    name (`DIFFUSION_COUNTERPARTS`), else the losses that can (`losses`)."""
    other = DIFFUSION_COUNTERPARTS.get(name)
    if other:
        return f"{why} — use {other}, its diffusion form (docs/diffusion.md)"
    if not losses:  # (the caller lists them once)
        return f"{why} — use another loss"
    return f"{why} — use one of: {', '.join(losses)} (docs/diffusion.md)"


def language_loss_hint(name: str) -> str:
    """What a language model trains instead of the diffusion loss `name`: its language form where it
    has one (diff_kto → kto), else the usual losses."""
    other = LANGUAGE_FORMS.get(name)
    if other:
        return f"for a language model use {other}, its language form"
    return "for a language model use dpo, kto, simpo, ... ('preftune losses')"


def image_term_refusal(spec: Any, alone: bool = True, losses: list[str] | None = None) -> str:
    """ "why — the loss to use" for a term that cannot train a denoiser on image data, "" when it can;
    `losses`: the ones to name (default `image_losses()`; [] when the caller lists them)."""
    why = image_loss_problem(spec, alone)
    return image_loss_refusal(spec.name, why, image_losses() if losses is None else losses) if why else ""


def check_image_objective(terms: list[tuple[Any, float, dict[str, Any]]], model: str) -> None:
    """Each term of an offline objective on a diffusers pipeline folder trains a denoiser on image
    data; refused before anything loads, naming the term, why and the loss to use (was a failed first
    step: "needs branch 1 = a completion of a different prompt" for kto)."""
    for spec, _, _ in terms:
        refusal = image_term_refusal(spec, len(terms) == 1)
        if refusal:
            raise ConfigError(
                f"loss '{spec.name}' cannot train a diffusion pipeline (--model {model} is a diffusers "
                f"pipeline folder): {refusal}"
            )


def sweep_misfit(method: str, diffusion: bool) -> str:
    """Why the sweep method `method` (its names already known) cannot train the sweep's model, "" when
    it can: on a diffusers pipeline (`diffusion`) what `check_model_kind` refuses for a run, else a
    diffusion-only loss on a language model."""
    from preftune import losses
    from preftune.online_methods import is_online

    if is_online(method):
        if not diffusion:
            return ""
        return (
            f"'{method}' samples text from a language model — {online_counterpart(method)}the online "
            "diffusion methods (ddpo, dpok, d3po, spo, awm) run with preftune train on a pipeline folder, "
            "not in a sweep"
        )
    terms = losses.parse_objective(method)
    for spec, _ in terms:
        refusal = image_term_refusal(spec, len(terms) == 1, losses=[]) if diffusion else ""
        if refusal:
            return f"loss '{spec.name}' cannot train a diffusion pipeline: {refusal}"
        if not diffusion and spec.name in DIFFUSION_LOSSES:
            return (
                f"'{spec.name}' is a diffusion loss (docs/diffusion.md): it trains a diffusers pipeline folder "
                f"— sweep it with --task diffusion; {language_loss_hint(spec.name)}"
            )
    return ""


def check_sweep_methods(methods: list[str], diffusion: bool) -> None:
    """Every method of a sweep trains its model, checked before the task is prepared (a misfit was
    refused only when its run started, after the task's minutes of pretraining or SFT); each misfit is
    named with the method to use instead (`sweep_misfit`)."""
    misfits = [m for m in (sweep_misfit(method, diffusion) for method in methods) if m]
    if misfits:
        model = "the diffusion task's pipeline" if diffusion else "a language model"
        raise ConfigError(
            f"sweep: {len(misfits)} of --methods cannot train {model} (nothing was prepared): "
            + "; ".join(misfits)
            + (
                f" (the losses that train a pipeline: {', '.join(image_losses())}; docs/diffusion.md)"
                if diffusion
                else ""
            )
        )


def check_sampler(config: Any, estimator: str) -> None:
    """The online method's sampler exists and takes its options; the PPO family takes `uniform` only."""
    from preftune.online_methods import preset_sampler
    from preftune.rl.samplers import get_sampler

    name, args = preset_sampler(config.method, config.sampler, config.sampler_args)
    get_sampler(name).validate(args)
    if estimator == "gae" and name != "uniform":
        raise ConfigError(
            f"method '{config.method}': the PPO family takes sampler uniform only, not '{name}'"
        )


def check_distill(config: Any, objective: list[tuple[Any, float, dict[str, Any]]]) -> None:
    """Teachers are given exactly when the method distils; what distillation cannot combine with."""
    from preftune.config import FIELDS

    if not is_distill(config.method):
        if config.teacher or config.teacher_ref:
            raise ConfigError(f"teacher / teacher_ref are for distillation ({', '.join(DISTILL_METHODS)})")
        return
    if not config.teacher:
        raise ConfigError(f"method '{config.method}' needs 'teacher' — {FIELDS['teacher'].metadata['help']}")
    two = [spec.name for spec, _, _ in objective if getattr(spec.fn, "teachers", 1) == 2]
    if two and not config.teacher_ref:
        raise ConfigError(f"'{two[0]}' needs 'teacher_ref' — {FIELDS['teacher_ref'].metadata['help']}")
    if config.eval_data or config.stages > 1 or config.rounds > 1 or config.fsdp:
        raise ConfigError(
            f"method '{config.method}' (distillation) cannot use eval_data, stages, rounds or fsdp yet"
        )


def validate_online(config: Any, strategy: str) -> None:
    """What an online method (grpo, rloo, ...) needs and cannot combine with."""
    from preftune.config import FIELDS
    from preftune.online_methods import builder_of, expand

    if config.data and not config.prompts:  # TRL's dataset_name / train_dataset is a prompt dataset
        raise ConfigError(
            f"method '{config.method}' samples its own responses to prompts: give the prompt file as "
            f"--prompts {config.data} (rows with a 'prompt'; --data is the offline methods' preference data)"
        )
    for name in ("prompts", "reward"):
        if not getattr(config, name):
            raise ConfigError(f"method '{config.method}' needs '{name}' — {FIELDS[name].metadata['help']}")
    if config.data:
        raise ConfigError(
            f"method '{config.method}' samples its own responses to 'prompts'; remove 'data' "
            "(preference data is for the offline methods)"
        )
    if config.stages > 1 or config.rounds > 1 or config.apo_alpha or config.fsdp:
        raise ConfigError(
            f"method '{config.method}' (online) cannot use stages, rounds, apo_alpha or fsdp yet"
        )
    if strategy == "cache":
        raise ConfigError(
            f"method '{config.method}': the reference cache keys fixed examples, but online samples change "
            "every step — use reference=model (a frozen copy) or adapter (with lora), or auto"
        )
    mu = config.num_iterations
    if mu > 1 and config.save_every % mu:
        raise ConfigError(
            f"save_every = {config.save_every} must be a multiple of num_iterations = {mu}: a checkpoint "
            "falls between batches of rollouts, never inside one batch's μ steps"
        )
    if builder_of(config.method):
        from preftune.config import resolve_objective
        from preftune.rl.builders import builder_options, check_objective

        check_no_estimator(config)
        check_ppo_fields(config, "")
        builder_options(config.method, config.hparams)  # the builder's options, in range
        check_objective(config.method, resolve_objective(config), strategy)
        check_group_size(config, "")
        return
    from preftune.rl import get_estimator

    estimator = expand(config.method, config.estimator, config.objective)[0]
    get_estimator(estimator)
    _validate_ppo(config, estimator)
    check_gae_options(config, estimator)
    check_ppo_fields(config, estimator)
    check_sampler(config, estimator)
    check_group_size(config, estimator)


def check_no_estimator(config: Any) -> None:
    """A builder method (raft, copg, online_dpo, dno, xpo) uses no advantage estimator: `--estimator`
    is refused (it was ignored; `--estimator gae` even attached a value head that nothing trained)."""
    from preftune.online_methods import PRESETS
    from preftune.rl.builders import BUILDERS

    if not config.estimator:
        return
    method = config.method.strip()
    preset = PRESETS[method]
    raise ConfigError(
        f"--estimator {config.estimator}: method '{method}' is a builder method — it turns each step's "
        f"scored samples into offline {BUILDERS[preset.builder].kind} examples that its objective "
        f"('{config.objective or preset.objective}') trains on, so no advantage estimator is used; remove "
        "--estimator (the policy-gradient methods take one: grpo, rloo, ppo, ...)"
    )


def check_gae_options(config: Any, estimator: str) -> None:
    """The gae estimator's γ, λ and pooling are the fields `--gamma`, `--lam`, `--macro-pooling`, which
    the PPO family reads (`online_options.GAE_FIELDS`); the same names as hyper-parameters
    (`--pooling unit`, YAML `hparams: {lam: 0.9}`) were recorded as the estimator's and ignored. One
    that differs from its field is refused naming the flag; one equal to it (as config.yaml files
    written before recorded them) is the same value."""
    if estimator != "gae":
        return
    from preftune.online_options import GAE_FIELDS
    from preftune.rl import get_estimator

    options = get_estimator("gae").hparams
    for key, field in GAE_FIELDS.items():
        if key not in config.hparams:
            continue
        value = options[key].coerce(key, config.hparams[key], f"method '{config.method}'")
        if value != getattr(config, field):
            flag = f"--{field.replace('_', '-')}"
            raise ConfigError(
                f"hyper-parameter '{key}' = {value!r}: GAE's {key} is the field {field} ({flag}, now "
                f"{getattr(config, field)!r}), which method '{config.method}' reads — the hyper-parameter "
                f"would be ignored: give {flag} {value} instead (in YAML: {field}: {value})"
            )


def check_group_size(config: Any, estimator: str) -> None:
    """Refuse a number of samples per prompt that can teach nothing: a group baseline (GRPO, RLOO, ...)
    over one sample gives every advantage 0, and a pair builder needs two samples of a prompt (TRL's
    GRPOTrainer refuses fewer than 2 generations too). Samplers that set each prompt's count themselves
    (reinforce_ada, gvm) are not checked."""
    from preftune.online_methods import builder_of, preset_sampler
    from preftune.rl.builders import BUILDERS
    from preftune.rl.registry import REGISTRY
    from preftune.rl.samplers import get_sampler

    g = config.num_generations
    if not get_sampler(preset_sampler(config.method, config.sampler, config.sampler_args)[0]).fixed_groups:
        return
    builder = builder_of(config.method)
    if builder and g < BUILDERS[builder].min_samples:
        why = f"it needs {BUILDERS[builder].min_samples} samples of a prompt to build an example"
        other = "dno (its teacher's response is the other side of each pair) or raft"
    elif not builder and g < REGISTRY[estimator].min_group:
        why = (
            f"its estimator '{estimator}' compares each sample with the other samples of its prompt, so "
            "with one sample every advantage is 0"
        )
        other = "remax (the greedy response is the baseline), reinforce_pp or ppo"
    else:
        return
    raise ConfigError(
        f"method '{config.method}' with num_generations = {g}: {why} and nothing would be learned — use "
        f"--num-generations 2 or more (TRL's default is 8), or a method that learns from one sample per "
        f"prompt: {other}"
    )


# who reads the fields of each part of the PPO family (`config_fields.ppo_only_fields`)
_PPO_READERS = {
    "ppo": "the PPO family (ppo, ma_ppo, rto; any method with --estimator gae)",
    "macro": "MA-RLHF's macro actions (ma_ppo, or --macro with the PPO family)",
    "macro_fixed": "MA-RLHF's fixed macro actions (ma_ppo, or --macro fixed with the PPO family)",
    "rto": "RTO's DPO token rewards (rto, or --dpo-model with the PPO family)",
}


def check_ppo_fields(config: Any, estimator: str) -> None:
    """Refuse the fields only the PPO family reads (`--lam`, `--gamma`, `--kl-coef`, `--macro-n`,
    `--dpo-scale`, ...) where online `config.method` (with `estimator`; "" for a builder) would ignore
    them, naming each flag and who reads it: GAE's γ and λ, the KL penalty, the value head's learning
    rate, `--macro` and `--dpo-model` need estimator gae; `--macro-pooling` macro actions,
    `--macro-n` fixed ones; `--dpo-scale` / `--dpo-clip` a DPO model. A γ that the method's estimator
    or builder objective declares went to it (`config._route_shared_keys`)."""
    from preftune.config_fields import TrainConfig, ppo_only_fields
    from preftune.online_methods import PRESETS

    gae = estimator == "gae"
    macro = config.macro or PRESETS[config.method.strip()].macro
    reads = {"ppo": gae, "macro": gae and macro is not None, "macro_fixed": gae and macro == "fixed"}
    reads["rto"] = gae and bool(config.dpo_model)
    defaults = TrainConfig()
    ignored: dict[str, list[str]] = {}
    for name, reader in ppo_only_fields().items():
        if getattr(config, name) != getattr(defaults, name) and not reads[reader]:
            ignored.setdefault(reader, []).append(f"--{name.replace('_', '-')}")
    if not ignored:
        return
    parts = [f"{', '.join(flags)}: read only by {_PPO_READERS[reader]}" for reader, flags in ignored.items()]
    many = sum(map(len, ignored.values())) > 1
    how = f" (estimator {estimator})" if estimator else f" (builder {PRESETS[config.method.strip()].builder})"
    it = "them" if many else "it"
    raise ConfigError(
        f"{'; '.join(parts)} — method '{config.method}'{'' if gae else how} would ignore {it}: remove {it}"
    )


def _validate_ppo(config: Any, estimator: str) -> None:
    """The PPO family (estimator gae): a value head on a fully fine-tuned policy; RTO's DPO model."""
    if estimator != "gae":
        return
    if config.lora:
        raise ConfigError(f"method '{config.method}': the value head needs full fine-tuning, not lora (yet)")
    if config.method == "rto" and not config.dpo_model:
        raise ConfigError(
            "method 'rto' needs dpo_model (--dpo-model PATH): a DPO model trained from `model` "
            "(in a sweep: list dpo before rto in --methods and its run serves)"
        )


def check_quickstart_method(method: str) -> None:
    """ConfigError, before anything is written, for a method the arithmetic quickstart does not run:
    one of another family (distillation, reward models, diffusion RL) or a misspelled name, matched
    against every family (`grop`: did you mean 'grpo'?)."""
    from preftune.config import check_terms_known
    from preftune.losses.catalogue import FAMILIES, find

    for part in method.split(","):
        entry = find(part.partition(":")[0])
        if entry is not None:
            raise ConfigError(
                f"quickstart: '{part.strip()}' ({FAMILIES[entry.family][0]}) is not one of the quickstart's "
                f"methods (preference losses and online RL) — train it with 'preftune train {entry.name}' "
                f"({FAMILIES[entry.family][3]})"
            )
    check_terms_known(method)
