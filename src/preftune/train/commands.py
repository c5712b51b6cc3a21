"""`preftune train METHOD`: every `TrainConfig` field is a flag, generated from the dataclass.

    preftune train dpo --model ./sft --data prefs.jsonl --out runs/dpo1 --beta 0.2
    preftune train simpo --config examples/simpo.yaml --model ./sft-model --data prefs.jsonl --out runs/simpo --gamma 0.5
    torchrun --nproc_per_node 2 -m preftune train dpo ...
    preftune train rm --model ./sft --data prefs.jsonl --out runs/rm --loss bt
    preftune train grpo --model ./sft --prompts prompts.jsonl --reward arithmetic --out runs/grpo
    preftune train dckd --model ./student --teacher ./dpo-model --data prefs.jsonl --out runs/dckd
    preftune train dpo --model ./pipeline --data image-pairs.jsonl --out runs/diffusion-dpo

METHOD is an offline preference loss or a weighted sum of them on --data (`preftune losses` lists
every method and `preftune losses NAME` explains one), or:
- an online RL preset (grpo, rloo, remax, ppo, raft, online_dpo, dno, xpo, ...) that samples its own
  responses to --prompts and scores them with --reward (docs/online.md);
- a distillation objective (adpa, dckd, aligndistil) from --teacher on preference pairs;
- on a diffusers pipeline folder as --model: the same offline losses on image pairs (Diffusion-DPO,
  MaPO, ...) or an online diffusion method (ddpo, dpok, d3po, spo, awm) (docs/diffusion.md);
- rm or prm, below.

METHOD rm trains a reward model (docs/reward_models.md): --loss bt | bt_margin | bt_scaled | center
or a weighted sum such as 'bt:1,center:0.01', or regression on rating data (prompt, response,
rating); the run folder, checkpoints and --resume work as for
the preference losses; OUT/final/ loads with AutoModelForSequenceClassification. --ensemble M trains
M seeds (OUT/member-i), --heads M trains M scalar heads on one trunk, and --aggregate mean | min |
uwo | median combines them in OUT/final. --head implicit (with --beta) trains the causal LM itself as
the reward r = β log π_θ/π_ref against a frozen copy of --model (also a PRM: partial sums at step ends;
--ensemble M with it trains M implicit RMs).
METHOD prm trains a process reward model on step labels: --loss prm_bce | pav_mse (data: prompt,
steps, labels or first_error; the ProcessBench rows too).

Precedence: dataclass defaults < `--config` YAML < command line. Loss hyper-parameters (`--beta`,
`--gamma`, ...) are added to the parser from the loss registry when the `train` command is parsed
(so `preftune --help` stays free of torch imports); `--TERM.KEY value` sets one term's value.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

from preftune.config import FIELDS, field_type
from preftune.errors import ConfigError
from preftune.trl_names import HELP as TRL_HELP

_SWITCH: dict[str, Any] = {"nargs": "?", "const": "true"}  # `--flag` alone means true
_HPARAM_GROUP = (
    "hyper-parameters of losses, online policy terms, estimators, builders and distillation terms "
    "(routed to every part of METHOD that declares them)"
)


class _TrainParser(argparse.ArgumentParser):
    """Adds the registry's loss flags on first use and collects unknown `--key value` pairs as overrides."""

    _loss_flags_added = False
    _reward_model_options = True  # `train rm` / `train prm`'s options in --help (not a sweep's)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:  # type: ignore[override]
        self._add_loss_flags()
        ns, extras = super().parse_known_args(args, namespace)
        ns.extra_overrides = self._pairs(list(extras))
        return ns, []

    _help_method: str | None = None  # METHOD given before --help: its own options follow the usual ones

    def format_help(self) -> str:
        self._add_loss_flags()
        text = super().format_help()
        if not self._help_method:
            return text
        from preftune.train.method_help import method_help

        return text + "\n" + method_help(self._help_method, argparse.HelpFormatter(self.prog))

    def _add_loss_flags(self) -> None:
        if self._loss_flags_added:
            return
        self._loss_flags_added = True
        users: dict[str, list[str]] = {}
        docs: dict[str, str] = {}
        switches: set[str] = set()
        for user, hparams in _hparam_owners():
            for key, hp in hparams.items():
                users.setdefault(key, []).append(user)
                docs.setdefault(key, f"{hp.doc} [{hp.range_text()}]")
                if hp.default is True or hp.default is False:
                    switches.add(key)
        group = self.add_argument_group(_HPARAM_GROUP)
        for key in sorted(users):
            if key in FIELDS:
                continue
            flags = [f"--{key.replace('_', '-')}"] + ([f"--{key}"] if "_" in key else [])
            group.add_argument(
                *flags,
                dest=f"hp__{key}",
                default=argparse.SUPPRESS,
                metavar="V",
                help=f"{docs[key]} (used by {', '.join(users[key])})".replace("%", "%%"),
                **(_SWITCH if key in switches else {}),
            )
        _add_diffusion_rl_options(self)  # after the loss flags: a shared key stays one flag
        if self._reward_model_options:
            _add_reward_model_options(self)

    def _pairs(self, extras: list[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        i = 0
        while i < len(extras):
            item = extras[i]
            if not item.startswith("--"):
                self.error(f"unexpected argument '{item}' (options are written --key value)")
            key, eq, value = item[2:].partition("=")
            if not eq:
                if i + 1 >= len(extras) or extras[i + 1].startswith("--"):
                    value = "true"  # a switch, e.g. --token-mean (a number-valued key then says so)
                else:
                    value = extras[i + 1]
                    i += 1
            out[key.replace("-", "_")] = value
            i += 1
        return out


class _MethodHelp(argparse.Action):
    """-h / --help of `preftune train`: the usual help, followed by METHOD's own options when METHOD (or
    --method) came before it (`preftune train dpo --help`)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        parser._help_method = getattr(namespace, "method_arg", None) or getattr(namespace, "method", None)
        parser.print_help()
        parser.exit()


def _add_field(parser: argparse._ActionsContainer, name: str, default_text: str | None = None) -> None:
    """The flag of config field `name` (absent from the namespace unless given); `default_text`
    replaces the field's default in the help (e.g. `preftune eval`'s "the run's")."""
    f = FIELDS[name]
    base, _ = field_type(name)
    flags = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])
    help_text = str(f.metadata["help"]).replace("%", "%%")
    default = None if f.default is dataclasses.MISSING else f.default
    if default_text is not None:
        help_text += f" (default: {default_text})"
    elif default is not None and default != "":
        help_text += f" (default: {default})"
    if base is bool:  # --fsdp, --fsdp true/false, --no-fsdp (TRL's habit: a bare flag is a switch)
        help_text += f"; a bare --{name.replace('_', '-')} is true, --no-{name.replace('_', '-')} false"
        parser.add_argument(
            *flags,
            dest=name,
            nargs="?",
            const=True,
            default=argparse.SUPPRESS,
            metavar="BOOL",
            help=help_text,
        )
        parser.add_argument(
            f"--no-{name.replace('_', '-')}",
            dest=name,
            action="store_const",
            default=argparse.SUPPRESS,
            const=False,
            help=argparse.SUPPRESS,
        )
    elif name == "resume":
        parser.add_argument(
            *flags,
            dest=name,
            nargs="?",
            const="latest",
            default=argparse.SUPPRESS,
            metavar="CHECKPOINT",
            help=help_text,
        )
    else:
        parser.add_argument(
            *flags, dest=name, default=argparse.SUPPRESS, metavar=name.upper(), help=help_text
        )


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `preftune train`."""
    p = sub.add_parser(
        "train",
        help="train with any method: preference losses (DPO, KTO, ...), online RL (GRPO, PPO, ...), "
        "distillation, reward models, diffusion alignment",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        usage="preftune train [METHOD] --model M --data D --out O [--config FILE.yaml] [--KEY VALUE ...]",
        add_help=False,
    )
    p.__class__ = _TrainParser
    p.add_argument("-h", "--help", action=_MethodHelp, help="show this help message and exit")
    p.add_argument(
        "method_arg",
        nargs="?",
        metavar="METHOD",
        help="loss or objective, e.g. dpo or 'dpo:1.0,sft:0.2' (same as --method); an online preset "
        "(grpo, ...), a distillation objective (adpa, ...), an online diffusion method (ddpo, ...); rm: a "
        "reward model; prm: a process reward model ('preftune losses' lists them all)",
    )
    p.add_argument("--config", help="YAML file of config keys (command-line values override it)")
    group = p.add_argument_group("run configuration (any key also works in --config YAML)")
    for name in FIELDS:
        if name != "hparams":
            _add_field(group, name)
    _add_trl_names(p)
    p.set_defaults(func=run)


def _hparam_owners() -> list[tuple[str, Any]]:
    """(who uses them, their HParams) for every registry whose hyper-parameters are `--key value`
    flags of `preftune train`: the offline losses, the online policy terms and advantage
    estimators, the online presets' example builders (by preset) and the distillation terms."""
    from preftune import losses
    from preftune.losses.distill_losses import DISTILL_LOSSES
    from preftune.losses.policy_losses import POLICY_LOSSES
    from preftune.online_methods import PRESETS
    from preftune.rl.builders import BUILDERS
    from preftune.rl.registry import REGISTRY as ESTIMATORS

    owners: list[tuple[str, Any]] = [(n, s.hparams) for n, s in sorted(losses.REGISTRY.items())]
    owners += [(f"policy term {n}", s.hparams) for n, s in sorted(POLICY_LOSSES.items())]
    owners += [(f"estimator {n}", s.hparams) for n, s in sorted(ESTIMATORS.items())]
    for name, spec in BUILDERS.items():
        presets = "/".join(sorted(m for m, p in PRESETS.items() if p.builder == name))
        owners.append((presets, spec.hparams))
    owners += [(n, s.hparams) for n, s in sorted(DISTILL_LOSSES.items())]
    return owners


_REWARD_MODEL_HELP = """\
--loss L        rm: bt (default) | bt_margin | bt_scaled | center, or a weighted sum such as
                'bt:1,center:0.01' (pairs); regression (rating data); ce (--head implicit, labels).
                prm: prm_bce (default) | pav_mse (step labels)
--head H        scalar (default: a new one-output head on --model) | implicit (r = β log π_θ/π_ref)
--beta B        the implicit reward's β (--head implicit; default 0.05)
--heads M       M scalar heads on one trunk (M ≥ 2; pairwise losses)
--ensemble M    M reward models of seeds S..S+M−1, S = --seed (OUT/member-i)
--aggregate A   how --heads / --ensemble members combine in OUT/final: mean (default) | min | uwo | median
--aggregation A prm: how step scores make one reward: min (default) | last | sum | mean | prod;
                --head implicit: outcome (rm default) or one of those
--separator S   prm: the text between steps (default a newline)
--step-value V  implicit prm: q (default: q_θ at the step's end) | delta (q_θ^{e_k} − q_θ^{e_(k−1)})
--lr is the preference losses' 1e-6 unless given: reward models usually train at 1e-5–1e-4
(TRL's RewardConfig: 1e-4). OUT/final/ loads with AutoModelForSequenceClassification (scalar heads)."""


def _add_reward_model_options(p: argparse.ArgumentParser) -> None:
    """The options of `train rm` / `train prm` (routed like every `--key value`, read by preftune.reward),
    listed in --help: they are no registry's hyper-parameters."""
    p.add_argument_group(
        "reward models: METHOD rm | prm (docs/reward_models.md)", _REWARD_MODEL_HELP.replace("%", "%%")
    )


def _add_diffusion_rl_options(p: argparse.ArgumentParser) -> None:
    """The options of the online diffusion methods (preftune.diffusion_methods), with their defaults;
    one that a loss flag already names (--beta, --sample-steps) is that flag (the same hparams key)."""
    from preftune.diffusion_methods import OPTIONS, help_text

    def defaults(key: str) -> str:
        values = OPTIONS[key].defaults
        if len(set(map(str, values.values()))) == 1:
            return f"{', '.join(values)}: {next(iter(values.values()))}"
        return ", ".join(f"{m} {v}" for m, v in values.items())

    shared = [k for k in OPTIONS if f"--{k.replace('_', '-')}" in p._option_string_actions]
    group = p.add_argument_group(
        "online diffusion RL: METHOD ddpo | dpok | d3po | spo | awm (docs/diffusion.md)",
        help_text() + "\n--batch-size prompts per step, --num-generations samples per prompt,"
        "\n--max-steps, --lr, --save-every, --resume as for every method. Loss flags that set"
        "\nthese methods' options too: "
        + "; ".join(f"--{k.replace('_', '-')} ({defaults(k)})" for k in shared),
    )
    for key, option in OPTIONS.items():
        if key in shared:
            continue
        group.add_argument(
            f"--{key.replace('_', '-')}",
            dest=f"hp__{key}",
            default=argparse.SUPPRESS,
            metavar="V",
            help=f"{option.help} (default: {defaults(key)})".replace("%", "%%"),
        )


def _add_trl_names(p: argparse.ArgumentParser) -> None:
    """TRL's flag names, same meaning (preftune.trl_names); YAML accepts them too."""
    group = p.add_argument_group(
        "TRL names (aliases with TRL's meaning; also accepted as YAML keys)",
        "The same in both tools: --max_length, --max_completion_length, --max_steps,\n"
        "--lora_r, --seed, --warmup_ratio, --beta. With method orpo, --beta is TRL's\n"
        "ORPO β = λ, the odds-ratio weight (odds_ratio_weight). --report_to none: no\n"
        "sinks. With an online method (GRPOConfig's names): --beta B adds the term kl:B\n"
        "(k3 to the reference; 0 = none), --epsilon is ppo_clip's clip range (eps_low,\n"
        "and eps_high unless --epsilon_high), --num_generations, --num_iterations,\n"
        "--temperature, --top_p, --top_k, --max_completion_length as in TRL.",
    )
    for name, text in TRL_HELP.items():
        if name == "beta":  # a loss flag already; its ORPO meaning is in the description
            continue
        switch = name in ("bf16", "use_peft", "sync_ref_model")
        group.add_argument(
            f"--{name}",
            dest=f"trl__{name}",
            default=argparse.SUPPRESS,
            metavar="BOOL" if switch else "V",
            help=text.replace("%", "%%"),
            **(_SWITCH if switch else {}),
        )


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The config values given on the command line (fields and loss hyper-parameters)."""
    values: dict[str, Any] = {}
    hparams: dict[str, Any] = {}
    for key, value in vars(args).items():
        if key in FIELDS:
            values[key] = value
        elif key.startswith("hp__"):
            hparams[key[4:]] = value
        elif key.startswith("trl__"):
            values[key[5:]] = value
    for key, value in getattr(args, "extra_overrides", {}).items():
        if key in FIELDS or key in TRL_HELP:  # TRL names are translated with the fields (sweep)
            values[key] = value
        else:
            hparams[key] = value
    positional = getattr(args, "method_arg", None)
    if positional:
        if "method" in values and str(values["method"]).strip() != positional.strip():
            raise ConfigError(
                f"two methods given: '{positional}' (METHOD) and '--method {values['method']}' — "
                "give one of them"
            )
        values["method"] = positional
    if hparams:
        values["hparams"] = hparams
    return values


def _check_file_method(path: str | None, positional: str | None) -> None:
    """METHOD and the config file's `method:` must agree (`--method` still overrides the file)."""
    if not path or not positional:
        return
    from pathlib import Path

    import yaml

    in_file = (yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}).get("method")
    if in_file is not None and str(in_file).strip() != positional.strip():
        raise ConfigError(
            f"two methods given: '{positional}' (METHOD) and 'method: {in_file}' in {path} — give "
            f"one of them (--method {positional} overrides the file's)"
        )


def _check_run_config_here(path: str | None, config: Any) -> None:
    """`--config RUN/config.yaml --resume` from another folder than the run's: its relative paths
    (out, data, prompts, ...) are read from the folder the run started in, so `out` would name
    another folder and the run would start over there. Refused, with the folder to run it from."""
    from pathlib import Path

    if path is None or not config.resume or not config.out:
        return
    run_dir = Path(path).resolve().parent
    out = Path(config.out)
    if out.resolve() == run_dir or not (run_dir / "checkpoints").is_dir() or out.is_absolute():
        return
    parts = out.parts
    start = run_dir.parents[len(parts) - 1] if run_dir.parts[-len(parts) :] == parts else None
    raise ConfigError(
        f"--config {path} is the config of the run in {run_dir}, whose paths are relative to the folder "
        f"it started in: from here its out '{config.out}' is {out.resolve()}, another folder — "
        + (
            f"run the command from {start} (cd {start})"
            if start
            else "run it from the folder the run started in"
        )
        + f", or pass --out {run_dir}"
    )


def run(args: argparse.Namespace) -> int:
    from preftune.config import load_config
    from preftune.train.api import train
    from preftune.train.logging import quiet_libraries

    quiet_libraries()
    overrides = overrides_from_args(args)
    config = load_config(args.config, overrides)
    _check_file_method(args.config, getattr(args, "method_arg", None))
    _check_run_config_here(args.config, config)
    from preftune.diffusion_methods import is_diffusion_rl

    if is_diffusion_rl(str(config.method)):  # a pipeline's denoiser on its own samples (docs/diffusion.md)
        from preftune.diffusion.online_run import train_online_diffusion

        result = train_online_diffusion(config)
    elif str(config.method).strip() == "rm":  # a reward model: scores, no reference (preftune.reward)
        from preftune.reward.training import train_rm

        result = train_rm(config)
    elif str(config.method).strip() == "prm":  # a process reward model: step scores (preftune.reward)
        from preftune.reward.prm_training import train_prm

        result = train_prm(config)
    else:
        result = train(config)
    shown = "  ".join(
        f"{k}={result.metrics[k]:.4g}"
        for k in (
            "loss",
            "rewards/accuracy",
            "rewards/margin",
            "accuracy",
            "eval/loss",
            "eval/rewards/accuracy",
            "eval/accuracy",
            "reward",
            "eval/reward",
            "eval/reward_gain",
        )
        if isinstance(result.metrics.get(k), float)
    )
    if os.environ.get("RANK", "0") == "0":
        print(
            f"done: {result.steps} steps; final model in {result.final_dir}"
            + (f"; {shown}" if shown else ""),
            flush=True,
        )
    return 0
