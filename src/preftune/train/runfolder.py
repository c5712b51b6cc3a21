"""The run folder's lifecycle: claim it (lock), check a resume against the run's own config, and
finish it (summary.json, report.html). See docs/training.md, "Resume" and "Faults and recovery".

- `claim` (rank 0 only): `--out` must be a writable folder; an exclusive `flock` on `OUT/.lock`
  (holding the pid) keeps a second run out; a folder that holds a run is never overwritten without
  `--resume`; `--resume` from a checkpoint refuses setting changes that would break exactness.
- `RunLock.undo`: a run that fails before it has recorded anything (no metrics, checkpoint or other
  file written since the claim) puts OUT back as it was: what it made (config.yaml, .lock, empty
  folders, OUT itself) is removed, a config.yaml or .lock that was there is restored. A folder in
  which the run recorded anything is left as it is, so a failed run never loses work.
- `resume_checkpoint`: the checkpoint to resume from, or None (no `--resume`, or none written yet:
  the run starts from step 0 in the same folder).
- `finish`: summary.json (atomic; its eval block rebuilt from metrics.jsonl when the final
  evaluation ran before a kill) and report.html.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preftune.config import TrainConfig, config_to_dict, load_config, resolve_objective
from preftune.errors import ConfigError, PreftuneError, TrainingError
from preftune.online_methods import builder_of, is_online
from preftune.train import checkpoint as ckpt

# Settings a resumed run may change: they decide what is logged, saved, shown or kept, or how the C
# allocator holds memory, never a weight. Every other field must equal the run's own value
# (config.yaml), or the resume is refused.
RESUME_SAFE = (
    "save_every",
    "keep_last",
    "log_every",
    "eval_every",
    "eval_batch_size",
    "report_to",
    "run_name",
    "progress",
    "report",
    "on_nonfinite",
    "malloc_mmap_threshold_mib",
)
# The run's length: changeable when no step's learning rate depends on it (see `length_fixed_lr`).
RESUME_LENGTH = ("max_steps", "epochs")
_NOT_COMPARED = ("resume", "out", "hparams")
LOCK_NAME = ".lock"
CONFIG_NAME = "config.yaml"
_OWN = (CONFIG_NAME, LOCK_NAME)  # what claiming a folder writes (the files `RunLock.undo` puts back)


def _recorded(out: Path) -> frozenset[tuple[str, int, int]]:
    """(path, size, mtime) of every file under OUT but the claim's own (config.yaml, .lock and their
    temporary files): what a run has recorded, or what an earlier run left."""
    if not out.is_dir():
        return frozenset()
    found = set()
    for p in out.rglob("*"):
        rel = p.relative_to(out)
        own = len(rel.parts) == 1 and (p.name in _OWN or p.name.startswith(f".{CONFIG_NAME}.tmp-"))
        if not own and p.is_file() and not p.is_symlink():
            st = p.stat()
            found.add((str(rel), st.st_size, st.st_mtime_ns))
    return frozenset(found)


@dataclass
class FolderBefore:
    """What OUT held before a run claimed it: the topmost folder the claim creates (OUT or a parent;
    None when OUT existed), its sub-folders, the bytes of config.yaml and .lock (None: absent), and
    every other file (`_recorded`, taken once partial checkpoints are removed)."""

    made: Path | None
    folders: frozenset[Path]
    own: dict[str, bytes | None]
    files: frozenset[tuple[str, int, int]] = frozenset()

    @classmethod
    def take(cls, out: Path) -> FolderBefore:
        made = None
        for p in (out, *out.parents):
            if p.exists() or p.is_symlink():
                break
            made = p
        folders = frozenset(p for p in out.rglob("*") if p.is_dir()) if out.is_dir() else frozenset()
        own = {n: (out / n).read_bytes() if (out / n).is_file() else None for n in _OWN}
        return cls(made, folders, own)


class RunLock:
    """An exclusive `flock` on OUT/.lock, which holds the owner's pid. The kernel drops the lock when
    the process ends, however it ends, so a lock file left by a dead process never blocks."""

    before: FolderBefore | None = None  # set by `lock_folder`: what `undo` puts back

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = out / LOCK_NAME
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(self._fd)
            self._fd = None
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = self.path.read_text(encoding="utf-8").strip() or "unknown"
            raise ConfigError(
                f"run folder {out} is in use by process {holder} (another 'preftune train' writes to it) — "
                "wait for it to end, or pass another --out"
            ) from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def undo(self) -> None:
        """For a run that failed: release the lock, first putting OUT back as it was before the claim
        when the run recorded nothing in it (no file but config.yaml and .lock added or changed).
        Only what the claim wrote is removed or restored (config.yaml, .lock, new empty folders):
        never a checkpoint, metrics or any other file."""
        before, self.before = self.before, None
        try:
            if before is not None and self._fd is not None and _recorded(self.out) == before.files:
                self._put_back(before)
            else:
                before = None
        except OSError:  # a folder it cannot read or write back: left as it is
            before = None
        finally:
            self.release()
        if before is not None:
            _remove_new_folders(self.out, before)

    def _put_back(self, before: FolderBefore) -> None:
        for name, data in before.own.items():
            path = self.out / name
            if name == LOCK_NAME and data is not None and self._fd is not None:
                os.ftruncate(self._fd, 0)
                os.pwrite(self._fd, data, 0)
            elif data is None:
                path.unlink(missing_ok=True)  # (.lock while still locked: a waiting run sees it in use)
            elif not path.is_file() or path.read_bytes() != data:
                tmp = path.with_name(f".{name}.tmp-{os.getpid()}")
                tmp.write_bytes(data)
                os.replace(tmp, path)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        """Release; on an exception, `undo` (the run failed)."""
        if kind is None:
            self.release()
        else:
            self.undo()


def _remove_new_folders(out: Path, before: FolderBefore) -> None:
    """Remove the empty folders a claim created (sub-folders, OUT and its parents up to `made`);
    a folder that holds anything stays."""
    new = [p for p in out.rglob("*") if p.is_dir() and p not in before.folders] if out.is_dir() else []
    chain = [out, *out.parents]
    made = chain[: chain.index(before.made) + 1] if before.made in chain else []
    for folder in [*sorted(new, key=lambda p: len(p.parts), reverse=True), *made]:
        try:
            folder.rmdir()
        except OSError:  # not empty (or gone): it stays
            if folder in made:
                break


def lock_folder(out: Path) -> RunLock:
    """Make OUT (see `_make_folder`), lock it and remove partial checkpoints a killed run left; the
    lock remembers what OUT held before, which `RunLock.undo` puts back if the run fails."""
    try:
        before: FolderBefore | None = FolderBefore.take(out)
    except OSError:  # a folder it cannot list: a failed run leaves it as it is
        before = None
    _make_folder(out)
    try:
        lock = RunLock(out)
    except OSError as err:  # EACCES, EROFS, or a file system without locks
        raise ConfigError(
            f"--out {out}: cannot write or lock {out / LOCK_NAME} ({err.strerror}) — make the folder "
            "writable or pass another --out"
        ) from None
    ckpt.remove_partial(out / "checkpoints")  # (errors ignored)
    try:
        if before is not None:
            before.files = _recorded(out)
            lock.before = before
    except OSError:
        lock.before = None
    return lock


def _make_folder(out: Path) -> None:
    """Create `out`, or say in one line why it cannot hold a run (a file, not writable)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(
            f"--out {out} is a file, not a folder — pass a folder for the run (created if missing)"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), out)
        raise ConfigError(f"--out {out}: {blocker} is a file, not a folder — pass another --out") from None
    except OSError as err:
        raise ConfigError(
            f"--out {out}: cannot create the run folder ({err.strerror}) — pass another --out"
        ) from None
    if not os.access(out, os.W_OK):
        raise ConfigError(
            f"--out {out}: the run folder is not writable (read-only) — make it writable or pass another --out"
        )


def claim(config: TrainConfig, log: Callable[[str], None]) -> RunLock:
    """Rank 0, before anything loads: make and lock the run folder, check what is in it, and write
    config.yaml (not on a resume from a checkpoint: that happens in `accept_resume`). Return the lock."""
    out = Path(config.out)
    lock = lock_folder(out)
    try:
        if config.resume and _checkpoint_given(out, config.resume):
            for saved in resume_configs(out, config.resume):
                check_resume_config(config, saved)
            return lock
        if not config.resume and has_run(out):
            newest = ckpt.list_checkpoints(out / "checkpoints")
            raise ConfigError(
                f"run folder {out} already has a run ("
                + (f"newest checkpoint {newest[-1].name}" if newest else "no checkpoint yet")
                + ") — pass --resume to continue it"
                + ("" if newest else " (it restarts from step 0 in this folder)")
                + ", or pass another --out"
            )
        if config.resume:
            log(f"resume: no checkpoint under {out / 'checkpoints'} yet — starting from step 0 in {out}")
        save_config_atomic(config, out / CONFIG_NAME)
    except BaseException:
        lock.undo()
        raise
    return lock


def has_run(out: Path) -> bool:
    """The folder holds (part of) a run that a fresh start would overwrite."""
    return (out / "metrics.jsonl").exists() or bool(ckpt.list_checkpoints(out / "checkpoints"))


def _checkpoint_given(out: Path, resume: str) -> bool:
    return resume != "latest" or bool(ckpt.list_checkpoints(out / "checkpoints"))


def resume_configs(out: Path, resume: str) -> list[Path]:
    """The config.yaml files a resume's settings must equal: for `--resume PATH` to a checkpoint of
    another run folder, that run's (PATH/../../config.yaml: its weights and optimizer state were
    trained under those settings), then OUT's when it has one (OUT's checkpoints and metrics are
    overwritten from PATH's step on, which only the same run may do)."""
    own = out / CONFIG_NAME
    found = [own] if own.is_file() else []
    if resume != "latest":
        theirs = Path(resume).resolve().parent.parent / CONFIG_NAME
        if theirs.is_file() and not (own.is_file() and own.samefile(theirs)):
            found.insert(0, theirs)
    return found


def resume_checkpoint(config: TrainConfig) -> Path | None:
    """The checkpoint a run resumes from; None to start from step 0 (no --resume, or none written)."""
    out = Path(config.out)
    if not config.resume or not _checkpoint_given(out, config.resume):
        return None
    return ckpt.find_resume(out, config.resume)


def save_config_atomic(config: TrainConfig, path: Path) -> None:
    import yaml

    # every loss hyper-parameter resolved (defaults included), so the file says what the run used
    text = yaml.safe_dump(
        config_to_dict(config, resolve_objective(config)), sort_keys=False, allow_unicode=True
    )
    write_atomic(path, text)


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and a rename: a reader (or a kill) never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def length_fixed_lr(config: TrainConfig) -> str | None:
    """None when the learning rate of every step is independent of the run's length (so a run can be
    extended exactly), else why not."""
    if config.stages > 1 or config.rounds > 1:
        return "stages/rounds split the steps over phases"
    if config.scheduler != "constant":
        return f"scheduler={config.scheduler} decays over the total steps"
    if config.warmup_steps == 0 and config.warmup_ratio > 0:
        return "the warmup is a fraction of the total steps (warmup_ratio); set warmup_steps"
    return None


def _objective_values(config: TrainConfig) -> dict[str, Any]:
    """Every loss hyper-parameter as TERM.KEY → value, defaults filled in (so `{}` equals the defaults);
    an online method's estimator's as estimator.KEY."""
    values = {f"{spec.name}.{k}": v for spec, _, hp in resolve_objective(config) for k, v in hp.items()}
    if is_online(config.method) and builder_of(config.method):  # e.g. DNO's margin (rl.builders)
        from preftune.rl.builders import builder_options

        values.update({f"builder.{k}": v for k, v in builder_options(config.method, config.hparams).items()})
    elif is_online(config.method):
        from preftune.online_options import resolve_online

        online = resolve_online(config.method, config.estimator, config.objective, config.hparams)
        values.update({f"estimator.{k}": v for k, v in online.estimator_hparams.items()})
    return values


def config_changes(saved: TrainConfig, given: TrainConfig) -> list[tuple[str, Any, Any]]:
    """(field, saved value, given value) of every compared setting that differs."""
    old, new = config_to_dict(saved), config_to_dict(given)
    changes = [(k, old[k], new[k]) for k in new if k not in _NOT_COMPARED and old.get(k) != new[k]]
    if saved.method == given.method:
        a, b = _objective_values(saved), _objective_values(given)
        changes += [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    return changes


def check_resume_config(config: TrainConfig, saved_path: Path) -> None:
    """Refuse a resume whose settings differ from the run's (config.yaml) in anything but RESUME_SAFE
    (and the length, when `length_fixed_lr`); config.yaml is left as it is."""
    if not saved_path.is_file():
        return  # a checkpoint copied without its run folder: its trainer state is checked later
    try:
        saved = load_config(saved_path)
        changes = config_changes(saved, config)
    except PreftuneError as err:
        raise ConfigError(f"resume: cannot read the run's config {saved_path}: {err}") from None
    why_not = length_fixed_lr(config)
    refused = [c for c in changes if c[0] not in RESUME_SAFE and (c[0] not in RESUME_LENGTH or why_not)]
    if not refused:
        return
    listed = "; ".join(f"{k}: {old!r} → {new!r}" for k, old, new in refused)
    length = [k for k, _, _ in refused if k in RESUME_LENGTH]
    raise ConfigError(
        f"resume: these settings differ from the run's ({saved_path}) and would break an exact resume: "
        f"{listed}"
        + (f" ({', '.join(length)}: {why_not})" if length else "")
        + f". Resume with the run's own settings — preftune train --config {saved_path} --resume "
        f"(only {', '.join(RESUME_SAFE)} may change, and max_steps/epochs with a constant learning rate) "
        "— or start a new run with another --out"
    )


def check_resume_data(config: TrainConfig, state: dict[str, Any], digest: str, path: Path) -> None:
    """Refuse a resume whose training data is not what the checkpoint was trained on (`run.data_digest`:
    the file was rewritten under the same path, or tokenizes otherwise); a checkpoint that does not
    record it (written before it was) is not checked."""
    saved = state.get("data_digest")
    if not saved or saved == digest:
        return
    field = "prompts" if config.prompts and not config.data else "data"
    raise TrainingError(
        f"resume: {field} '{getattr(config, field)}' now gives other examples than the run was trained "
        f"on (checkpoint {path}: data digest {saved}, now {digest}): the file changed since the run "
        "started, or it tokenizes otherwise — put the data back as it was to continue the run exactly, "
        "or start a new run with another --out"
    )


def check_resume_images(config: TrainConfig, state: dict[str, Any], now: str, path: Path) -> None:
    """Refuse a resume of an offline diffusion run whose images or captions are not the ones the
    checkpoint was trained on (`digests.image_rows_digest`: an image file rewritten under the same
    path), naming the first such row; a checkpoint that does not record them is not checked."""
    from preftune.train.digests import changed_image_row

    row = changed_image_row(state.get("image_rows") or "", now)
    if row:
        raise TrainingError(
            f"resume: data '{config.data}' row {row}: its images or caption are not the ones the run was "
            f"trained on (checkpoint {path}): an image file was rewritten under the same path, or the "
            "caption changed, since the run started — put the data back as it was to continue the run "
            "exactly, or start a new run with another --out"
        )


def resume_position(
    state: dict[str, Any], *, total: int, config: TrainConfig, path: Path
) -> tuple[int, int, int]:
    """(phase, step in phase, global step) to continue from, checked against this run's length: a
    different total is allowed only where it changes no step's learning rate (one phase)."""
    phase, step_in_phase, step = int(state["phase"]), int(state["step_in_phase"]), int(state["step"])
    saved_total = state.get("total_steps")
    if saved_total == total:
        return phase, step_in_phase, step
    why_not = length_fixed_lr(config)
    if why_not or step > total:
        raise TrainingError(
            f"resume: {path} belongs to a run of {saved_total} steps, this config gives {total} ("
            + (why_not if why_not else f"fewer than the checkpoint's step {step}")
            + f"); resume with the run's own config ({Path(config.out) / 'config.yaml'})"
        )
    return 0, step, step  # one phase: the position within it is the global step


def accept_resume(config: TrainConfig, state: dict[str, Any], path: Path, total: int, log: Any) -> None:
    """Rank 0, once the checkpoint is loaded and checked: say where the run continues and record the
    (possibly extended / safely changed) config."""
    step = int(state["step"])
    extended = state.get("total_steps") not in (None, total)
    log(
        f"resuming from step {step} of {total} ({path})"
        + (f"; extended from {state.get('total_steps')} steps" if extended else "")
    )
    save_config_atomic(config, Path(config.out) / "config.yaml")


def last_eval(metrics_path: Path, step: int) -> dict[str, float]:
    """The eval record logged at `step` in metrics.jsonl (without step/split), or {}."""
    found: dict[str, float] = {}
    if not metrics_path.is_file():
        return found
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("split") == "eval" and rec.get("step") == step:
            found = {k: v for k, v in rec.items() if k not in ("step", "split")}
    return found


def finish(
    config: TrainConfig,
    *,
    steps: int,
    train_metrics: dict[str, float],
    eval_metrics: dict[str, float],
    checkpoint: Path | None,
    log: Callable[[str], None],
    wrote: Callable[[str], None] = lambda _name: None,
) -> dict[str, float]:
    """Rank 0, after final/ is saved: summary.json (then `wrote("summary.json")`) and report.html.
    Returns the eval metrics (rebuilt from metrics.jsonl when this process did not run the final
    evaluation: it ran before a kill)."""
    out = Path(config.out)
    if not eval_metrics and config.eval_data:
        eval_metrics = last_eval(out / "metrics.jsonl", steps)
    summary = {
        "method": config.method,
        "steps": steps,
        "train": train_metrics,
        "eval": eval_metrics,
        "checkpoint": str(checkpoint) if checkpoint else None,
    }
    write_atomic(out / "summary.json", json.dumps(summary, indent=1))
    wrote("summary.json")
    if config.report:
        write_run_report(out, log)
    return eval_metrics


def write_run_report(out: Path, log: Callable[[str], None]) -> None:
    """OUT/report.html (with `preftune eval` results when OUT/eval.json exists). The run's results do
    not depend on it, so a failure is a warning, never a failed run."""
    from preftune.train.allocator import release_free_heap

    release_free_heap()  # (the report's imports then do not add to training's resident peak)
    try:
        from preftune.eval.report import write_report

        log(f"report: {write_report(out)}")
    except Exception as err:  # noqa: BLE001 - a report is a convenience (plots); the run has finished
        log(f"report: not written ({type(err).__name__}: {err}) — rebuild it with: preftune report {out}")
