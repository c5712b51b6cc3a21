"""CLI commands of the eval package: `preftune report`, `preftune eval`, `preftune sweep`.

    preftune report runs/dpo1                          # rebuild runs/dpo1/report.html from its logs
    preftune eval runs/dpo1 --data heldout.jsonl       # §5 metrics of runs/dpo1/final → runs/dpo1/eval.json
    preftune sweep --methods dpo,ipo,simpo,rdpo,kto --out runs/sweep --max-steps 200
    preftune sweep --methods dpo,ipo --model ./sft --data prefs.jsonl --eval-data held.jsonl --out runs/s

Heavy imports (torch, matplotlib, transformers) happen inside the command functions so that
`preftune --help` stays fast.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path
from typing import Any

from preftune.errors import ConfigError
from preftune.eval.eval_options import (
    add_best_of_n_flags,
    add_heldout_data_flags,
    add_kl_flags,
    heldout_data_overrides,
)

SWEEP_DOC = """Train each of --methods on the same model and data (OUT/METHOD/ per run), sharing one
reference pass through the reference cache, then compare them: OUT/sweep.html and OUT/sweep.json hold
each method's final metrics, held-out task accuracy (built-in task only) and KL to the reference.

    preftune sweep --methods dpo,ipo,simpo,rdpo,kto --out runs/sweep            # built-in arithmetic task
    preftune sweep --methods dpo,ipo --model ./sft --data prefs.jsonl --eval-data held.jsonl --out runs/s
    preftune sweep --task diffusion --methods dpo,hinge,diff_kto,mapo --out runs/sweep-diffusion

Without --model and --data the sweep first runs the quickstart's preparation (SFT model, self-sampled
verifier-labelled pairs) into OUT/task/ and trains with the quickstart's schedule; any flag overrides it.
--task diffusion does the same with the diffusion quickstart (pretrained pipeline, reward-ranked image
pairs); its score is the held-out mean reward (no KL estimate). A method that fails is recorded in the report and the sweep goes on.
Ctrl-C (SIGINT) or SIGTERM stops the sweep: the running method saves a checkpoint, no further method
starts, the report shows what finished, and the printed command (this one with --resume) goes on."""


def _report(args: argparse.Namespace) -> int:
    from preftune.eval.report import write_report

    folder = Path(args.run_dir)
    if (folder / "sweep.json").is_file() and not (folder / "metrics.jsonl").is_file():
        from preftune.eval.sweep import read_sweep
        from preftune.eval.sweep_report import write_sweep

        print(f"wrote {write_sweep(read_sweep(folder))[1]}")
        return 0
    members = sorted(folder.glob("member-*/metrics.jsonl"))
    if members and not (folder / "metrics.jsonl").is_file():  # a reward-model ensemble: one per member
        for member in members:
            print(f"wrote {write_report(member.parent)}")
        return 0
    print(f"wrote {write_report(folder)}")
    return 0


def _print_table(title: str, rows: list[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)


def _eval(args: argparse.Namespace) -> int:
    from preftune.config import load_config
    from preftune.train.logging import quiet_libraries

    quiet_libraries()

    run = Path(args.run_dir)
    final = run / "final"
    if not (run / "config.yaml").is_file() or not final.is_dir():
        raise ConfigError(
            f"{run}: not a finished training run (needs config.yaml and final/) — pass the --out folder of "
            "a completed 'preftune train'"
        )
    from preftune.paths import is_pipeline_folder

    if is_pipeline_folder(final):
        raise ConfigError(f"{run} is a diffusion run (final/ is a diffusers pipeline folder): preftune eval "
                          f"scores language-model runs — sample and score its images with 'preftune sample --model {final} "
                          "--prompts PROMPTS --reward NAME' (samples.jsonl holds each image's reward); online "
                          "diffusion runs keep their held-out reward before and after in summary.json")  # fmt: skip
    reading = heldout_data_overrides(args)  # --kind, --columns, --on-invalid over the run's own
    config = load_config(run / "config.yaml", reading)
    from preftune.reward.implicit import holds_steps, is_implicit

    method = config.method
    if method in ("rm", "prm") and not args.data:
        raise ConfigError(f"preftune eval of a {method} run needs --data (held-out {method} data)")
    if method == "rm" and is_implicit(final) and holds_steps(args.data):
        method = "prm"  # an implicit outcome RM is a PRM too: ProcessBench metrics of step data
    if method == "prm" and reading:
        flags = ", ".join("--" + k.replace("_", "-") for k in reading)
        raise ConfigError(f"{flags}: for preference data; step data ({args.data}) is read as it is")
    if method == "rm":  # a reward model: pairwise accuracy, calibration, best-of-n
        return _eval_reward_model(run, config, args)
    if method == "prm":  # a process reward model: ProcessBench metrics (first wrong step)
        return _eval_process_reward_model(run, final, args)
    return _eval_policy(run, final, config, args)


def _eval_policy(run: Path, final: Path, config: Any, args: argparse.Namespace) -> int:
    """`preftune eval` of a policy run: preference metrics on --data, the held-out reward on --prompts
    (either or both), the sampled KL; one table, RUN/eval.json and the rebuilt report."""
    from preftune.eval.htmlkit import fmt, write_atomic

    if not args.data and not args.prompts:
        raise ConfigError(
            "preftune eval: pass --data (held-out preference pairs: the §5 metrics) and/or --prompts "
            "(held-out prompts: the reward of final/ against the starting model's)"
        )
    reference = args.ref_model or config.ref_model or config.model
    result: dict[str, Any] = {"run": str(run), "data": args.data or args.prompts, "method": config.method}
    result["reference"], metrics = reference, {}
    if args.data:
        eval_method, pref = _preference_metrics(final, config, reference, args)
        result["metrics_objective"], metrics = eval_method, pref
    models = _Models(final, reference, config)  # loaded once, for the held-out reward and the KL
    rows = _heldout_prompts(models.tokenizer, config, args) if args.prompts else None
    if rows is not None:
        metrics = {**metrics, **_heldout_reward(models, config, rows, args)}
        result["prompts"], result["reward"] = args.prompts, _reward_spec(config, args)
    result["metrics"] = dict(metrics)
    if args.kl_samples > 0:
        kl = _kl(models, args, config, rows)
        result["kl"] = kl
        metrics = {**metrics, "kl": kl["mean"], "kl_stderr": kl["stderr"]}
    scored = result.get("metrics_objective", config.method)
    title = config.method + (f" (metrics of {scored})" if scored != config.method else "")
    _print_table(f"{title} on {result['data']}", [(k, fmt(v)) for k, v in metrics.items()])
    path = run / "eval.json"
    write_atomic(path, json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    if (run / "metrics.jsonl").is_file():  # the run's report shows these results from now on
        from preftune.train.runfolder import write_run_report

        write_run_report(run, print)
    return 0


def _preference_metrics(
    final: Path, config: Any, reference: str, args: argparse.Namespace
) -> tuple[str, dict[str, float]]:
    from preftune.train.api import evaluate

    eval_method, eval_hparams = preference_objective(config.method, config.objective, config.hparams)
    if not _trains_pairwise(config.method, config.objective, eval_method):
        print(f"{config.method} trains no pairwise loss of its own: preference metrics with {eval_method}")
    metrics = evaluate(
        str(final),
        args.data,
        method=eval_method,
        ref_model=reference,
        tokenizer=config.tokenizer or str(final),
        hparams=eval_hparams,
        batch_size=args.batch_size,
        max_length=config.max_length,
        max_prompt_length=config.max_prompt_length,
        max_completion_length=config.max_completion_length,
        truncation=config.truncation,
        cache_dir=config.cache_dir,
        kind=config.kind,
        columns=config.columns,
        on_invalid=config.on_invalid,
    )
    return eval_method, metrics


def _reward_spec(config: Any, args: argparse.Namespace) -> str:
    """--reward, else the run's own reward (an online run's), else the built-in task's verifier."""
    return str(args.reward or config.reward or "arithmetic")


class _Models:
    """The tokenizer, final/ and the reference of a run, each loaded on first use and kept."""

    def __init__(self, final: Path, reference: str, config: Any) -> None:
        self.final, self.reference, self.config = final, reference, config

    @functools.cached_property
    def tokenizer(self) -> Any:
        from preftune.data.formatting import load_tokenizer

        return load_tokenizer(self.config.tokenizer or str(self.final))

    @functools.cached_property
    def policy(self) -> Any:
        from preftune.eval.sweep import load_policy_folder

        return load_policy_folder(self.final)

    @functools.cached_property
    def start(self) -> Any:
        from preftune.models.load import load_causal_lm

        return load_causal_lm(self.reference)


def _heldout_prompts(tokenizer: Any, config: Any, args: argparse.Namespace) -> list[Any]:
    from preftune.rl.phase import run_prompts

    return run_prompts(config, args.prompts, tokenizer)


def _heldout_reward(
    models: _Models, config: Any, rows: list[Any], args: argparse.Namespace
) -> dict[str, float]:
    from preftune.eval.heldout_reward import heldout_reward
    from preftune.reward.registry import load_reward

    temperature = 0.0 if args.temperature is None else args.temperature
    length = args.max_new_tokens or config.max_completion_length or 128
    return heldout_reward(
        models.policy,
        models.start,
        models.tokenizer,
        rows,
        load_reward(_reward_spec(config, args)),
        num_samples=args.num_samples,
        temperature=temperature,
        max_new_tokens=length,
        seed=args.seed,
    )


def preference_objective(
    method: str, objective: str | None, hparams: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """(objective, its hyper-parameters) that `preftune eval` scores a run's final policy with on
    held-out pairs: an offline run's own; for an online preset that trains a pairwise loss on the pairs
    it builds (online_dpo, dno; `--objective` as given) that loss; for any other run (a policy-gradient
    preset such as grpo, RAFT, CoPG, XPO's three-branch loss, distillation) `dpo` — the §5 metrics
    compare the policy with the reference on the pairs whatever trained it. Hyper-parameters the
    objective's terms do not declare (a builder's, an estimator's) are left out."""
    from preftune import losses
    from preftune.method_checks import is_distill
    from preftune.online_methods import PRESETS, is_online

    if not is_online(method) and not is_distill(method):
        return method, hparams  # an offline run: its own objective, as trained
    own = _own_objective(method, objective) if is_online(method) else ""
    try:
        terms = [spec for spec, _ in losses.parse_objective(own)] if own else []
    except ConfigError:
        terms = []
    pairwise = terms and all(spec.kind == "pairwise" and not spec.needs_mismatched for spec in terms)
    if not pairwise or PRESETS[method.strip()].builder not in ("best_worst", "dno"):
        own, terms = "dpo", [losses.get("dpo")]
    names = {spec.name for spec in terms}
    keys = {key for spec in terms for key in spec.hparams}
    kept = {k: v for k, v in hparams.items() if k in keys or k.partition(".")[0] in names}
    return own, kept


def _own_objective(method: str, objective: str | None) -> str:
    """The objective a run trained: an online preset's (`--objective` over the preset's), else `method`."""
    from preftune.online_methods import PRESETS, is_online

    return (objective or PRESETS[method.strip()].objective) if is_online(method) else method


def _trains_pairwise(method: str, objective: str | None, eval_method: str) -> bool:
    """Whether `eval_method` is the pairwise loss the run itself trained."""
    return _own_objective(method, objective) == eval_method


def _eval_reward_model(run: Path, config: Any, args: argparse.Namespace) -> int:
    """`preftune eval` of a reward model: pairwise accuracy, calibration and best-of-n into eval.json."""
    from preftune.eval.htmlkit import fmt, write_atomic
    from preftune.reward.evaluation import rm_eval_payload

    payload = rm_eval_payload(run, config, args)
    _print_table(f"reward model on {args.data}", [(k, fmt(v)) for k, v in payload["metrics"].items()])
    if "best_of_n" in payload:
        bon = payload["best_of_n"]
        rows = [
            (f"best-of-{n:g} (oracle)", f"{r:.3f} ({o:.3f})")
            for n, r, o in zip(bon["n"], bon["rm"], bon["oracle"])
        ]
        _print_table(f"gold '{bon['gold']}' of the RM's pick, {bon['prompts']} prompts", rows)
    path = run / "eval.json"
    write_atomic(path, json.dumps(payload, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


def _eval_process_reward_model(run: Path, final: Path, args: argparse.Namespace) -> int:
    """`preftune eval` of a process reward model: ProcessBench metrics (first wrong step) into eval.json."""
    from preftune.eval.htmlkit import fmt, write_atomic
    from preftune.reward.processbench import evaluate_prm_folder

    prm_metrics = evaluate_prm_folder(final, args.data, batch_items=args.batch_size)
    _print_table(f"process reward model on {args.data}", [(k, fmt(v)) for k, v in prm_metrics.items()])
    path = run / "eval.json"
    payload = {"run": str(run), "data": args.data, "method": "prm", "metrics": prm_metrics}
    write_atomic(path, json.dumps(payload, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


def _kl(
    models: _Models, args: argparse.Namespace, config: Any, rows: list[Any] | None = None
) -> dict[str, float]:
    import dataclasses

    from preftune.eval.kl import sequence_kl
    from preftune.eval.sweep import prompts_from_data

    if args.data:  # read as the preference metrics read it, which said what was dropped
        prompts = prompts_from_data(
            args.data,
            models.tokenizer,
            limit=args.kl_prompts,
            max_prompt_length=config.max_prompt_length,
            cache_dir=config.cache_dir,
            reading={"kind": config.kind, "columns": config.columns, "on_invalid": config.on_invalid},
            notices=False,
        )
    else:  # the held-out prompts of --prompts
        prompts = [r.ids for r in (rows or [])[: args.kl_prompts]]
    est = sequence_kl(
        models.policy,
        models.start,
        models.tokenizer,
        prompts,
        samples_per_prompt=args.kl_samples,
        max_new_tokens=args.kl_max_new_tokens,
        seed=0,
    )
    return dataclasses.asdict(est)


def _sweep(args: argparse.Namespace) -> int:
    """`preftune sweep`; a stop signal during its preparation (the built-in task's SFT model, the
    tokenized prompts) stops it before its first method, with the same line as a stop later on."""
    from preftune.train.signals import GracefulStop

    with GracefulStop("the sweep stops once its preparation ends; no method starts"):
        return _sweep_command(args)


def _sweep_command(args: argparse.Namespace) -> int:
    from preftune.train.logging import quiet_libraries

    quiet_libraries()
    from preftune.config import load_config
    from preftune.eval.builtin import builtin_task
    from preftune.eval.sweep import PolicyEvaluator, parse_methods, run_sweep
    from preftune.method_checks import check_sweep_methods
    from preftune.paths import is_pipeline_folder
    from preftune.train.commands import overrides_from_args

    builtin_diffusion = args.task == "diffusion" and not getattr(args, "model", None)
    methods = parse_methods(args.methods, diffusion=builtin_diffusion)
    out = Path(args.out)
    taken = [m for m in methods if (out / m / "metrics.jsonl").is_file()]
    if taken and not args.resume_sweep:  # checked before any work, not after the SFT model and the first runs
        raise ConfigError(
            f"sweep: {out / taken[0]} already holds a run — pass another --out, or --resume to go on"
            + (
                ""
                if getattr(args, "model", None)
                else f" (with --task-dir {out / 'task'} to reuse the prepared built-in task)"
            )
        )
    overrides = overrides_from_args(args)
    overrides.pop("method", None)
    file_values = load_config(args.config) if args.config else None
    model = overrides.get("model") or (file_values.model if file_values else "")
    data = overrides.get("data") or (file_values.data if file_values else "")
    prompts_file = overrides.get("prompts") or (file_values.prompts if file_values else "")
    if bool(model) != bool(data or prompts_file):
        raise ConfigError(
            "sweep: give --model with --data (online methods only: with --prompts and --reward), or "
            "neither (then the built-in arithmetic task is used)"
        )
    if not model or not is_pipeline_folder(model):  # (a pipeline folder of your own: each run checks)
        check_sweep_methods(methods, diffusion=args.task == "diffusion" and not model)
    if model:
        base = load_config(args.config, {**overrides, "method": methods[0], "out": str(out)})
        task = _own_task(base, methods, args.kl_prompts)
    else:
        task_dir = Path(args.task_dir) if args.task_dir else out / "task"
        seed = int(overrides.get("seed", file_values.seed if file_values else 0))
        if args.task == "diffusion":
            from preftune.tasks.diffusion_sweep import diffusion_sweep_task

            values, task = diffusion_sweep_task(task_dir, seed=seed, log=print)
        else:
            values, task = builtin_task(task_dir, seed=seed, log=print)
        in_file: dict[str, Any] = {}
        if args.config:  # precedence: built-in schedule < --config YAML < command line
            import yaml

            in_file = yaml.safe_load(Path(args.config).read_text(encoding="utf-8")) or {}
            values = {k: v for k, v in values.items() if k not in in_file}
        # the online methods' schedule yields to the same keys (--max-steps 20 shortens every run)
        task.online = {k: v for k, v in task.online.items() if k not in in_file and k not in overrides}
        base = load_config(args.config, {**values, **overrides, "method": methods[0], "out": str(out)})
        task.prompts = task.prompts[: args.kl_prompts]
    resume = _resume_options(args, out)
    if args.task == "diffusion" and not model:  # held-out mean reward; no KL estimate for images yet
        score = task.accuracy
        assert score is not None  # diffusion_sweep_task always gives one
        result = run_sweep(
            methods, base, out, task=task, evaluate_fn=lambda final, _: (score(final), None), **resume
        )
        return _sweep_status(out, result)
    evaluator = PolicyEvaluator(base, task, kl_samples=args.kl_samples, max_new_tokens=args.kl_max_new_tokens)
    if args.kl_samples <= 0:
        task.prompts = []  # no KL estimate; task accuracy, if any, is still measured
    result = run_sweep(methods, base, out, task=task, evaluate_fn=evaluator, **resume)
    return _sweep_status(out, result)


def _own_task(base: Any, methods: list[str], limit: int) -> Any:
    """The sweep task of a user's model: the KL prompts from --eval-data, else --data, else (online
    methods only) --prompts — preference data read as pairs, prompt data as an online run reads it."""
    from preftune.data.formatting import load_tokenizer
    from preftune.eval.sweep import SweepTask, prompts_from_data
    from preftune.online_methods import is_online
    from preftune.rl.prompts import load_prompts

    offline = [m for m in methods if not is_online(m)]
    if offline and not base.data:
        raise ConfigError(f"sweep: {', '.join(offline)} train on preference pairs — give --data")
    tokenizer = load_tokenizer(base.tokenizer or base.model)
    source = base.eval_data or base.data or base.prompts
    if source == base.data or offline:
        ids = prompts_from_data(source, tokenizer, limit=limit, max_prompt_length=base.max_prompt_length,
                                cache_dir=base.cache_dir)  # fmt: skip
    else:  # held-out or training prompts of online methods: `prompt` rows (with the reward's columns)
        rows = load_prompts(source, tokenizer, chat_template=base.chat_template,
                            max_prompt_length=base.max_prompt_length)  # fmt: skip
        ids = [list(p) for p in {tuple(r.ids): None for r in rows}][:limit]
    return SweepTask(prompts=ids, name=f"{len(ids)} prompts of {source}")


def _resume_options(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """run_sweep's `previous` (with --resume: the methods OUT/sweep.json holds as trained) and the
    command a stopped sweep prints: this one, with --resume."""
    import shlex

    from preftune.eval.sweep import finished_results

    argv = [a for a in getattr(args, "argv", None) or [] if a != "--resume"]
    hint = (
        f"preftune {shlex.join(argv)} --resume" if argv else "the same preftune sweep command with --resume"
    )
    return {"previous": finished_results(out) if args.resume_sweep else None, "resume_hint": hint}


def _sweep_status(out: Path, result: Any) -> int:
    failed = [r.method for r in result.results if r.status != "ok"]
    print(
        f"wrote {out / 'sweep.html'} and {out / 'sweep.json'}"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 1 if len(failed) == len(result.results) else 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `report`, `eval` and `sweep` to `preftune`."""
    p = sub.add_parser(
        "report",
        help="regenerate a run's HTML report (RUN/report.html) from its logs",
        description="Rebuild RUN_DIR/report.html from RUN_DIR/metrics.jsonl, summary.json, "
        "config.yaml and eval.json (when 'preftune eval' wrote one): one self-contained HTML file with "
        "plots of every logged metric. 'preftune train' writes it when a run ends.",
    )
    p.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="folder of a training run (holds metrics.jsonl) or of a sweep (sweep.json)",
    )
    p.set_defaults(func=_report)

    p = sub.add_parser(
        "eval",
        help="a trained run on held-out data: preference metrics on pairs, held-out reward on prompts (RUN/eval.json)",
        description="Evaluate RUN_DIR/final against its reference (the run's starting model) on held-out "
        "preference data: loss, implicit rewards and margin, reward accuracy, chosen/rejected log-probs, "
        "policy ranking accuracy, and a sampled KL to the reference. Prints a table, writes RUN_DIR/eval.json "
        "and rebuilds RUN_DIR/report.html with it. With --prompts, a policy run's held-out reward: final/'s "
        "responses and the starting model's to the same prompts, scored by the run's reward (paired gain "
        "± standard error). A reward model ('preftune train rm'): held-out pairwise "
        "accuracy, loss, mean score gap, calibration (ece, brier, reliability bins) and, with --best-of-n, "
        "the gold reward of the RM's pick among n = 1, 2, 4, ... samples.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of a finished 'preftune train'")
    p.add_argument(
        "--data",
        help="held-out preference data (same formats as training data, read with the run's --kind, "
        "--columns and --on-invalid unless given below); and/or --prompts below",
    )
    p.add_argument(
        "--ref-model", default=None, help="reference model folder (default: the run's ref_model or model)"
    )
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward pass (default 8)")
    add_heldout_data_flags(p)
    add_kl_flags(p, default_samples=2)
    add_best_of_n_flags(p)
    p.set_defaults(func=_eval)

    from preftune.config import FIELDS
    from preftune.train.commands import _add_field, _TrainParser

    p = sub.add_parser(
        "sweep",
        help="train several methods on the same model and data and compare them in one report",
        description=SWEEP_DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.__class__ = _TrainParser  # adds the loss hyper-parameter flags (--beta, ...) and --TERM.KEY overrides
    p._reward_model_options = False  # type: ignore[attr-defined]  # reward models are not swept
    p.add_argument("--methods", required=True, help="comma-separated losses, e.g. dpo,ipo,simpo,rdpo,kto")
    p.add_argument(
        "--out", required=True, help="sweep folder: OUT/METHOD/ per run, OUT/sweep.html, OUT/sweep.json"
    )
    p.add_argument("--config", help="YAML file of config keys shared by every method")
    p.add_argument(
        "--task",
        choices=("arithmetic", "diffusion"),
        default="arithmetic",
        help="built-in task when no --model/--data: arithmetic (a tiny Llama, default) or diffusion "
        "(the diffusion quickstart's pipeline and reward-ranked image pairs; score: held-out mean reward)",
    )
    p.add_argument(
        "--task-dir",
        help="folder of the built-in task's SFT model and pairs (default OUT/task); "
        "another sweep's OUT/task is reused when its seed and recipe match",
    )
    p.add_argument(
        "--resume",
        dest="resume_sweep",  # not the run field `resume` (a checkpoint): every method's is set here
        action="store_true",
        help="go on with a stopped sweep into OUT: the methods OUT/sweep.json holds as trained are kept, "
        "the others (stopped, not started or failed) resume from their newest checkpoint (same flags as "
        "the first command)",
    )
    add_kl_flags(p, default_samples=4)
    group = p.add_argument_group(
        "shared run configuration (without --model/--data: the built-in arithmetic task)"
    )
    for name in FIELDS:
        if name not in ("method", "out", "resume", "hparams"):
            _add_field(group, name)
    p.set_defaults(func=_sweep)
