"""`preftune sweep`: train several methods on the same model and data, then compare them in one report.

Every method trains from the same starting model with the same config except `method` and `out`
(`DIR/METHOD`), and all share one reference cache folder, so the reference log-probs are computed by
the first method that needs them and read from disk by the others (docs/training.md, "Reference strategies").
Whether a run reused the cache is observed, not assumed: the run's reference-cache files must be
unchanged by it (the trainer writes them only when it computes missing sequences).

After training, each policy is compared with the starting model (the reference) on held-out prompts:
task accuracy when a verifiable task is given, and the sequence-level KL(π_θ ‖ π_ref) of eval/kl.py.
A method that fails is recorded with its error and the sweep goes on with the next one.

SIGINT (Ctrl-C), SIGTERM or SIGHUP stops the sweep: the running method saves a checkpoint at its next
step boundary (as `preftune train` does) or finishes its evaluation, no further method starts, the
report of what finished is written, and `run_sweep` raises `Interrupted` (exit status 128 + the
signal's number) naming the command that resumes: the finished methods are kept, the interrupted one
resumes from its checkpoint. A second signal stops at once.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune.errors import ConfigError
from preftune.eval.kl import KLEstimate

Log = Callable[[str], None]


@dataclass
class SweepTask:
    """Held-out material shared by every method of a sweep.

    prompts:           held-out prompts as token ids (the KL estimate samples responses to them).
    accuracy:          model folder → held-out task accuracy in [0, 1]; None without a verifiable task.
    baseline_accuracy: that accuracy for the starting model, drawn as the line to beat.
    name:              what the held-out set is, for the report.
    metric:            what `accuracy` measures: "accuracy" (a fraction, shown in %) or the name of
                       another score shown as a number (the diffusion task: "mean reward").
    online:            config values of the online methods (grpo, rloo, ...): prompts, reward and
                       their schedule; their preference data is dropped.
    online_hparams:    per online method, options it takes on this task unless the command line
                       gives them (the built-in task: RAFT's `keep`/`min_reward`, the pair methods' β).
    online_overrides:  per online method, config values that replace those of `online` (the built-in
                       task: ReMax's G − 1 samples + its greedy response, the others' G).
    """

    prompts: list[list[int]]
    accuracy: Callable[[Path], float] | None = None
    baseline_accuracy: float | None = None
    name: str = "held-out prompts"
    metric: str = "accuracy"
    online: dict[str, Any] = field(default_factory=dict)
    online_hparams: dict[str, dict[str, Any]] = field(default_factory=dict)
    online_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class MethodResult:
    """The outcome of one method. status: "ok", or "failed" (training raised; `error` says why).

    status "interrupted": a stop signal ended the sweep during this method (`error` says where).
    settings: the method's own config values where they differ from the sweep's shared config (an
    online method's prompts, reward and schedule; a task option), as `method_settings` gives them.
    reference_cache: "computed" (this run filled the shared cache), "reused" (cache files untouched),
    "reference-free" (no reference), or the reference strategy when it is not the cache ("model", ...).
    eval_error: an error of the post-training evaluation (accuracy or KL); the trained run is kept.
    seconds, cpu_seconds: wall time and process CPU time (time.process_time) of the training call; on a
    shared machine the CPU time is the cost to compare.
    """

    method: str
    run_dir: str
    status: str = "ok"
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    steps: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    accuracy: float | None = None
    kl: dict[str, float] | None = None
    reference_cache: str = "unknown"
    error: str | None = None
    eval_error: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # its config values unlike the sweep's config


@dataclass
class SweepResult:
    """All methods' results, in the order run, and where the comparison was written."""

    out_dir: Path
    results: list[MethodResult]
    baseline_accuracy: float | None
    cache_dir: str
    task_name: str
    config: dict[str, Any]
    seconds: float = 0.0
    task_metric: str = "accuracy"
    stopped: str = ""  # a sweep a signal stopped: what finished, what was interrupted, what did not start

    def to_json(self) -> dict[str, Any]:
        reused = [r.method for r in self.results if r.reference_cache == "reused"]
        computed = [r.method for r in self.results if r.reference_cache == "computed"]
        return {
            "methods": [r.method for r in self.results],
            "task": self.task_name,
            "baseline_accuracy": self.baseline_accuracy,
            "task_metric": self.task_metric,
            "seconds": self.seconds,
            "stopped": self.stopped,
            "reference_cache": {"dir": self.cache_dir, "computed_by": computed, "reused_by": reused},
            "config": self.config,
            "results": [dataclasses.asdict(r) for r in self.results],
        }


def parse_methods(text: str, diffusion: bool = False) -> list[str]:
    """'dpo,ipo, simpo' → ['dpo', 'ipo', 'simpo'], each checked against the loss registry (or an
    online method: grpo, rloo, remax, ...); `diffusion` (the diffusion task): an unknown name is matched
    against the losses that train a pipeline folder only."""
    from preftune import losses
    from preftune.config import check_terms_known
    from preftune.losses.catalogue import FAMILIES, find
    from preftune.losses.registry import _did_you_mean
    from preftune.method_checks import image_losses
    from preftune.online_methods import is_online

    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods:
        raise ConfigError("sweep: --methods is empty — give a comma-separated list, e.g. dpo,ipo,simpo")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"sweep: --methods lists a method twice ({text}); each needs its own run folder")
    for m in methods:
        if is_online(m):
            continue
        entry = find(m)
        if entry is not None:  # a method of another family (distillation, reward models, diffusion RL)
            raise ConfigError(
                f"sweep: '{m}' ({FAMILIES[entry.family][0]}) cannot be swept yet — a sweep compares "
                f"preference losses and online RL methods on one model; train it with 'preftune train {m}'"
            )
        unknown = [n for n in (p.partition(":")[0].strip() for p in m.split(",")) if n not in losses.REGISTRY]
        if diffusion and unknown and unknown[0]:
            raise ConfigError(
                f"sweep --task diffusion: unknown loss '{unknown[0]}'{_did_you_mean(unknown[0], image_losses())} "
                f"(it trains one of: {', '.join(image_losses())})"
            )
        check_terms_known(m)  # an unknown name: matched against every family
        losses.parse_objective(m)  # the objective's other rules (weights, one data kind)
    return methods


def _needs_reference(config: Any) -> bool:
    from preftune.config import resolve_objective

    return any(spec.needs_reference for spec, _, _ in resolve_objective(config))


def method_config(
    base: Any,
    method: str,
    out: Path,
    cache_dir: Path,
    online: Mapping[str, Any],
    online_hparams: Mapping[str, Any] | None = None,
) -> Any:
    """The config of `method` in a sweep: `base` with its method and run folder. An online method
    (grpo, rloo, ...) drops the preference data and takes `online` (prompts, reward, its schedule)
    and `online_hparams` (its options on the task, under those of `base`: one that `base` sets, flat
    or as TERM.KEY, is left out); an offline one drops the online settings."""
    from preftune.online_methods import is_online

    changes: dict[str, Any] = {"method": method, "out": str(out / method), "cache_dir": str(cache_dir)}
    if is_online(method):
        given = {str(k).rpartition(".")[2] for k in base.hparams}  # flat or TERM.KEY: given wins
        task = {k: v for k, v in (online_hparams or {}).items() if k not in given}
        hparams = {**task, **base.hparams}
        changes.update(data=None, eval_data=None, eval_every=0, hparams=hparams, **online)
    else:
        changes.update(prompts=None, reward=None, estimator=None, objective=None, num_iterations=1)
    return dataclasses.replace(base, report=False, **changes)


def with_sweep_dpo_model(config: Any, results: Sequence[MethodResult]) -> Any:
    """RTO's token reward in a sweep: without `dpo_model`, the sweep's own `dpo` run (listed before
    rto in --methods) serves, as the quickstart's DPO model does for `quickstart --method rto`."""
    if config.method.strip() != "rto" or config.dpo_model:
        return config
    done = [r for r in results if r.method == "dpo" and r.status == "ok"]
    if not done:
        return config  # the run fails with the check's message (method_checks: rto needs dpo_model)
    return dataclasses.replace(config, dpo_model=str(Path(done[-1].run_dir) / "final"))


def cache_snapshot(cache_dir: Path) -> dict[str, tuple[int, int]]:
    """path → (size, mtime_ns) of the reference-cache files (the trainer's layout: CACHE/reference/**)."""
    folder = cache_dir / "reference"
    if not folder.is_dir():
        return {}
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _short_error(err: BaseException) -> str:
    frames = traceback.extract_tb(err.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(err).__name__}: {err}{where}"


def _default_train(config: Any) -> Any:
    from preftune.train.api import train

    return train(config)


def run_sweep(
    methods: Sequence[str],
    base: Any,
    out_dir: str | Path,
    *,
    task: SweepTask | None = None,
    train_fn: Callable[[Any], Any] | None = None,
    evaluate_fn: Callable[[Path, Any], tuple[float | None, KLEstimate | None]] | None = None,
    write: bool = True,
    log: Log = print,
    previous: Mapping[str, MethodResult] | None = None,
    resume_hint: str = "run_sweep(..., previous=finished_results(OUT))",
) -> SweepResult:
    """Train each of `methods` from `base` (a TrainConfig) into OUT/METHOD; return and write the comparison.

    train_fn(config) → an object with `final_dir`, `steps`, `metrics` (default: preftune.train.api.train).
    evaluate_fn(final_dir, config) → (task accuracy | None, KL estimate | None) (default: `PolicyEvaluator`
    built from `task`). Writes OUT/sweep.json and OUT/sweep.html when `write`.
    previous: the results of an earlier, interrupted sweep into OUT (`finished_results`); its trained
    methods are kept as they are and the others resume from their newest checkpoint.
    A stop signal raises `Interrupted` after the report is written (the module's docstring).
    """
    from preftune.train.signals import GracefulStop

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(base.cache_dir) if base.cache_dir else out / "cache"
    train_fn = train_fn or _default_train
    if evaluate_fn is None and task is not None:
        evaluate_fn = PolicyEvaluator(base, task, log=log)

    # a resumed sweep's wall time counts the earlier sweep's too (its kept runs are part of the report)
    earlier = read_sweep(out).seconds if previous and (out / "sweep.json").is_file() else 0.0
    started = time.perf_counter() - earlier
    results: list[MethodResult] = []

    def summarise(stopped: str = "") -> SweepResult:
        return SweepResult(
            out_dir=out,
            results=results,
            baseline_accuracy=task.baseline_accuracy if task else None,
            cache_dir=str(cache_dir),
            task_name=task.name if task else "none",
            config=_config_dict(base),
            seconds=time.perf_counter() - started,
            task_metric=task.metric if task else "accuracy",
            stopped=stopped,
        )

    stop = GracefulStop("no further method starts; the running one saves a checkpoint or ends its evaluation")
    interrupted: BaseException | None = None
    signum = 0  # the signal that stopped a run (the run's own handler had it)
    try:
        with stop:
            for i, method in enumerate(methods, start=1):
                if stop.signum or (results and results[-1].status == "interrupted"):
                    break
                if previous and method in previous:
                    log(f"sweep [{i}/{len(methods)}] {method}: finished before, kept")
                    results.append(previous[method])
                    continue
                log(f"sweep [{i}/{len(methods)}] {method} → {out / method}")
                online = {**task.online, **task.online_overrides.get(method, {})} if task else {}
                config = method_config(
                    base, method, out, cache_dir, online, task.online_hparams.get(method) if task else None
                )
                config = with_sweep_dpo_model(config, results)
                if previous is not None:
                    config = dataclasses.replace(config, resume="latest")
                results.append(
                    MethodResult(method, config.out, "interrupted", settings=method_settings(base, config))
                )
                signum = _run_method(results[-1], config, train_fn, evaluate_fn, log)
                if write:  # after every method, so an interrupted sweep still leaves its numbers
                    write_sweep_json(summarise())
                gc.collect()
    except KeyboardInterrupt as err:  # a second signal, or Ctrl-C where no handler could be installed
        interrupted = err
        if results and results[-1].status == "interrupted" and not results[-1].error:
            results[-1].error = "stopped at once (a second signal)"
    finally:
        signum = stop.signum or signum
        halted = interrupted is not None or signum or any(r.status == "interrupted" for r in results)
        note = _stop_note(methods, results, signum) if halted else ""
        result = summarise(note)
        if write and results:
            from preftune.eval.sweep_report import write_sweep

            write_sweep(result)
    _log_cache_use(results, cache_dir, log)
    if note:
        import signal

        from preftune.train.signals import Interrupted

        where = f"; {out / 'sweep.html'} shows the finished methods" if write and results else ""
        raise Interrupted(f"{note}{where} — resume with: {resume_hint}", signum or signal.SIGINT) from None
    return result


def _stop_note(methods: Sequence[str], results: list[MethodResult], signum: int) -> str:
    """What a sweep a signal stopped did: what finished, what was interrupted, what did not start."""
    import signal

    done = [r.method for r in results if r.status != "interrupted"]
    cut = [r for r in results if r.status == "interrupted"]
    rest = [m for m in methods if m not in {r.method for r in results}]
    name = signal.Signals(signum).name if signum else "a second signal"
    parts = [f"sweep stopped by {name}", f"finished: {', '.join(done) or 'none'}"]
    parts += [f"interrupted: {r.method} ({r.error or 'before its training began'})" for r in cut]
    parts.append(f"not started: {', '.join(rest) or 'none'}")
    return "; ".join(parts)


def finished_results(out_dir: str | Path) -> dict[str, MethodResult]:
    """The methods an earlier sweep into OUT trained (status "ok"), from OUT/sweep.json; {} when there
    is none. A resumed sweep keeps these and runs the others again from their newest checkpoint: one
    a signal stopped, one not started, and one that failed (its cause may be fixed by now)."""
    if not (Path(out_dir) / "sweep.json").is_file():
        return {}
    return {r.method: r for r in read_sweep(out_dir).results if r.status == "ok"}


def _run_method(
    res: MethodResult,
    config: Any,
    train_fn: Callable[[Any], Any],
    evaluate_fn: Callable[[Path, Any], tuple[float | None, KLEstimate | None]] | None,
    log: Log,
) -> int:
    """Train one method (`config`, from `method_config`: report=False, the sweep writes each run's
    report itself once its evaluation is in) and evaluate it into `res`; any exception is recorded in
    the result, never raised. A run a signal stopped stays "interrupted" with the run's message, and
    the signal's number is returned (0 otherwise)."""
    from preftune.config import reference_strategy
    from preftune.train.signals import Interrupted

    method, cache_dir = config.method, Path(config.cache_dir)
    try:
        strategy = reference_strategy(config, _needs_reference(config))
        before = cache_snapshot(cache_dir)
        t0, c0 = time.perf_counter(), time.process_time()
        run = train_fn(config)
        res.seconds, res.cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        res.steps = int(run.steps)
        res.metrics = {k: float(v) for k, v in dict(run.metrics).items()}
        if strategy == "none":
            res.reference_cache = "reference-free"
        elif strategy == "cache":
            res.reference_cache = "reused" if cache_snapshot(cache_dir) == before else "computed"
        else:
            res.reference_cache = strategy
        final_dir = Path(run.final_dir)
    except Interrupted as err:  # a stop signal: the run saved its checkpoint; the sweep stops
        res.error = str(err).split(" — resume with:")[0]
        _write_run_report(Path(res.run_dir), log)
        return int(getattr(err, "exit_code", 130)) - 128
    except Exception as err:  # one failing method must not lose the others
        res.status, res.error = "failed", _short_error(err)
        log(f"sweep: {method} failed — {res.error}; going on with the next method")
        _write_run_report(Path(res.run_dir), log)  # the curves up to the failure, when there are any
        return 0
    _write_run_report(Path(res.run_dir), log)
    if evaluate_fn is not None:
        try:
            accuracy, kl = evaluate_fn(final_dir, config)
            res.accuracy = accuracy
            res.kl = dataclasses.asdict(kl) if kl is not None else None
        except Exception as err:
            res.eval_error = _short_error(err)
            log(f"sweep: evaluating {method} failed — {res.eval_error}")
    res.status = "ok"
    return 0


def _log_cache_use(results: list[MethodResult], cache_dir: Path, log: Log) -> None:
    computed = [r.method for r in results if r.reference_cache == "computed"]
    reused = [r.method for r in results if r.reference_cache == "reused"]
    if len(computed) > 1:
        log(
            f"sweep: warning — the reference cache was written by {len(computed)} runs ({', '.join(computed)}), "
            "not one: their reference inputs differ (e.g. per-token log-probs or KTO's mismatched pairs)"
        )
    if reused:
        log(f"sweep: reference log-probs reused from the cache by {', '.join(reused)} ({cache_dir})")


def method_settings(base: Any, config: Any) -> dict[str, Any]:
    """`config`'s values that differ from `base`'s, by key (a loss option as `hparams.KEY`), leaving out
    what every run has of its own (method, out) and the bookkeeping (report, resume, cache_dir)."""
    ours, shared = _config_dict(config), _config_dict(base)
    hparams, base_hparams = ours.pop("hparams", None) or {}, shared.pop("hparams", None) or {}
    skip = ("report", "resume", "cache_dir")
    changed = {k: v for k, v in ours.items() if k not in skip and v != shared.get(k)}
    changed.update({f"hparams.{k}": v for k, v in hparams.items() if base_hparams.get(k, object()) != v})
    return changed


def _config_dict(config: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        data = dataclasses.asdict(config)
    else:
        data = dict(vars(config))
    return {k: v for k, v in data.items() if k not in ("method", "out")}


def _write_run_report(run_dir: Path, log: Log) -> None:
    if not (run_dir / "metrics.jsonl").is_file():
        return
    try:
        from preftune.eval.report import write_report

        write_report(run_dir)
    except Exception as err:  # a report is a convenience; the sweep's numbers do not depend on it
        log(f"sweep: could not write {run_dir / 'report.html'} — {_short_error(err)}")


class PolicyEvaluator:
    """Held-out accuracy and KL to the reference of a trained policy folder; the reference loads once."""

    def __init__(
        self,
        base: Any,
        task: SweepTask,
        *,
        kl_samples: int = 4,
        max_new_tokens: int = 64,
        seed: int = 0,
        log: Log = print,
    ) -> None:
        self.base, self.task, self.log = base, task, log
        self.kl_samples, self.max_new_tokens, self.seed = kl_samples, max_new_tokens, seed
        self._reference: Any = None

    def reference(self) -> Any:
        if self._reference is None:
            from preftune.models.load import load_causal_lm

            self._reference = load_causal_lm(self.base.ref_model or self.base.model)
        return self._reference

    def __call__(self, final_dir: Path, config: Any) -> tuple[float | None, KLEstimate | None]:
        from preftune.data.formatting import load_tokenizer
        from preftune.eval.kl import sequence_kl

        accuracy = self.task.accuracy(final_dir) if self.task.accuracy is not None else None
        kl = None
        if self.task.prompts:
            policy = load_policy_folder(final_dir)
            tokenizer = load_tokenizer(config.tokenizer or final_dir)
            kl = sequence_kl(
                policy,
                self.reference(),
                tokenizer,
                self.task.prompts,
                samples_per_prompt=self.kl_samples,
                max_new_tokens=self.max_new_tokens,
                seed=self.seed,
            )
            self.log(
                f"  KL(policy ‖ reference) = {kl.mean:.4g} ± {kl.stderr:.2g} nats ({kl.samples} samples)"
            )
        return accuracy, kl


def load_policy_folder(folder: Path) -> Any:
    """A run's OUT/final as a module: full weights, or a PEFT adapter folder on its base model."""
    if (folder / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        return AutoPeftModelForCausalLM.from_pretrained(str(folder)).eval()
    from preftune.models.load import load_causal_lm

    return load_causal_lm(folder)


def prompts_from_data(
    source: str,
    tokenizer: Any,
    *,
    limit: int,
    max_prompt_length: int | None = None,
    cache_dir: str | None = None,
    reading: dict[str, Any] | None = None,
    notices: bool = True,
) -> list[list[int]]:
    """The first `limit` distinct prompts of a preference data file, tokenized as the trainer does;
    `reading`: kind, columns and on_invalid as `prepare_examples` takes them; `notices=False` keeps
    the data summary's notices (dropped rows, ...) quiet when another pass over the file gave them."""
    import logging

    from preftune.data.pipeline import prepare_examples

    data_log = logging.getLogger("preftune.data")
    level = data_log.level
    if not notices:
        data_log.setLevel(logging.ERROR)
    try:
        prepared = prepare_examples(
            source,
            tokenizer=tokenizer,
            max_prompt_length=max_prompt_length,
            cache_dir=cache_dir,
            **(reading or {}),
        )
    finally:
        data_log.setLevel(level)
    seen: dict[tuple[int, ...], None] = {}
    for ex in prepared.examples:
        seen.setdefault(tuple(ex.prompt_ids))
        if len(seen) >= limit:
            break
    return [list(p) for p in seen]


def read_sweep(out_dir: str | Path) -> SweepResult:
    """A sweep's results back from OUT/sweep.json (to regenerate its report)."""
    out = Path(out_dir)
    data = json.loads((out / "sweep.json").read_text(encoding="utf-8"))
    return SweepResult(
        out_dir=out,
        results=[MethodResult(**r) for r in data["results"]],
        baseline_accuracy=data.get("baseline_accuracy"),
        cache_dir=data["reference_cache"]["dir"],
        task_name=data.get("task", "none"),
        config=data.get("config", {}),
        seconds=float(data.get("seconds", 0.0)),
        task_metric=data.get("task_metric", "accuracy"),
        stopped=data.get("stopped", ""),
    )


def write_sweep_json(result: SweepResult) -> Path:
    path = result.out_dir / "sweep.json"
    path.write_text(json.dumps(result.to_json(), indent=1, default=str), encoding="utf-8")
    return path
