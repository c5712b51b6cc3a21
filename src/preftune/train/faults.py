"""Failures a run can name before or while it trains: missing inputs, a tokenizer larger than the
model's embedding, and running out of memory (which step, what to lower, which checkpoint is intact)."""

from __future__ import annotations

import errno
import os
import traceback
from pathlib import Path
from typing import Any

import torch

from preftune.config import TrainConfig
from preftune.errors import ConfigError, PreftuneError, TrainingError

_FOLDERS = {
    "model": "model",
    "ref_model": "reference model",
    "tokenizer": "tokenizer",
    "teacher": "teacher model",
    "teacher_ref": "teacher reference model",
}


def check_inputs(config: TrainConfig) -> None:
    """Fail at once, naming the option, when a data file or model folder of `config` cannot be found
    (before the run folder is made or anything is loaded)."""
    from preftune.data.sources import resolve_source
    from preftune.paths import pretrained_source

    for name in ("data", "eval_data", "prompts"):
        value = getattr(config, name)
        if value:
            resolve_source(value, field=name)
    for name, what in _FOLDERS.items():
        value = getattr(config, name)
        if value:
            try:
                source = pretrained_source(value, what)
            except ConfigError as err:
                raise ConfigError(f"{name}: {err}") from None
            if what != "tokenizer":
                check_model_folder(source, name)


def check_model_folder(source: str, name: str) -> None:
    """A local folder given as a model holds a model: its config.json (a transformers model), a
    diffusers pipeline's model_index.json or a peft adapter's adapter_config.json — else the loader
    fails later with an unrelated tokenizer error ("install sentencepiece")."""
    folder = Path(source)
    marks = ("config.json", "model_index.json", "adapter_config.json")
    if folder.is_dir() and not any((folder / m).is_file() for m in marks):
        raise ConfigError(
            f"--{name.replace('_', '-')} {source}: not a model folder (no config.json in it) — give a folder "
            "written by save_pretrained (config.json, the weights and the tokenizer), a diffusers pipeline "
            "folder, or a hub id"
        )


def token_ids(tokenizer: Any) -> int:
    """How many token ids `tokenizer` can produce: its largest id + 1, added tokens included."""
    vocab = tokenizer.get_vocab()
    return max(len(tokenizer), max(vocab.values(), default=-1) + 1)


def embedding_rows(model_source: str) -> int | None:
    """Rows of the input embedding of the model at `model_source`, from its config (None if unknown)."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(model_source)
    except (OSError, ValueError):  # reported by the model loader, with its own message
        return None
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    rows = getattr(text, "vocab_size", None)
    return int(rows) if rows else None


def check_vocab(tokenizer: Any, config: TrainConfig) -> None:
    """Every token id the tokenizer can produce must have a row in the input embedding of the policy
    (and of `ref_model`): an id past the last row fails only later, as an index error in a forward."""
    from preftune.paths import pretrained_source

    ids = token_ids(tokenizer)
    for name in ("model", "ref_model"):
        value = getattr(config, name)
        rows = embedding_rows(pretrained_source(value)) if value else None
        if rows is not None and ids > rows:
            raise ConfigError(
                f"the tokenizer ({config.tokenizer or config.model}) has {ids} token ids (added tokens "
                f"included) but the input embedding of {name} '{value}' has {rows} rows — use the "
                f"model's own tokenizer, or resize the embedding (model.resize_token_embeddings({ids})) "
                "and save the model"
            )


def check_teachers(tokenizer: Any, config: TrainConfig) -> None:
    """A distillation teacher (`teacher`, `teacher_ref`) must score the student's token ids: the same
    vocabulary size as the student's head and, where its folder has a tokenizer, the same token → id
    map. Otherwise its distributions are over other tokens: a smaller vocabulary fails as an index
    error in its forward, a permuted one trains silently on wrongly indexed targets."""
    from preftune.paths import pretrained_source

    student = config.tokenizer or config.model
    rows = embedding_rows(pretrained_source(config.model))
    for name in ("teacher", "teacher_ref"):
        value = getattr(config, name, None)
        if not value:
            continue
        source = pretrained_source(value)
        theirs = embedding_rows(source)
        if rows is not None and theirs is not None and theirs != rows:
            raise ConfigError(
                f"{name} '{value}' has a vocabulary of {theirs} tokens, the student '{config.model}' "
                f"{rows}: distillation compares their next-token distributions token by token, so the "
                "student and its teachers need one tokenizer and one vocabulary — use a teacher trained "
                "with the student's tokenizer"
            )
        _check_same_tokens(tokenizer, student, source, f"{name} '{value}'")


def _check_same_tokens(tokenizer: Any, student: str, source: str, what: str) -> None:
    from transformers import AutoTokenizer

    try:
        other = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):  # a folder with weights only: the student's tokenizer is its own
        return
    ours, theirs = tokenizer.get_vocab(), other.get_vocab()
    if ours == theirs:
        return
    differ = sorted(t for t in set(ours) | set(theirs) if ours.get(t) != theirs.get(t))
    token = differ[0]
    raise ConfigError(
        f"{what} tokenizes differently from the student's tokenizer ({student}): {len(differ)} tokens "
        f"have other ids, e.g. {token!r} is {ours.get(token)} in the student's and {theirs.get(token)} "
        "in the teacher's — distillation compares distributions id by id, so use a teacher trained "
        "with the student's tokenizer"
    )


def is_out_of_memory(err: BaseException) -> bool:
    """A failed allocation: torch's OutOfMemoryError, MemoryError, or the CPU allocator's RuntimeError."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate" in text)


def out_of_memory(
    err: BaseException, *, config: TrainConfig, done: int, micro: int, last_good: Path | None
) -> TrainingError:
    """One line for an allocation that failed after `done` finished steps: where (the reference pass,
    an evaluation, or a training step), what to lower, and the checkpoint a `--resume` continues from."""
    frames = {frame.f_code.co_name for frame, _ in traceback.walk_tb(err.__traceback__)}
    length = f"max_length (now {config.max_length or 'unset: the longest example'})"
    eval_micro = config.eval_batch_size or micro
    if (
        "_forward_group" in frames
    ):  # CachedReference's forwards: the training micro-batches, the held-out set's
        where = f"in the reference pass before step {done + 1}"
        lower = f"micro_batch_size (now {micro}), eval_batch_size (now {eval_micro}) or {length}"
    elif "evaluate_examples" in frames:
        where = f"in the evaluation at step {done}"
        lower = f"eval_batch_size (now {eval_micro}) or {length}"
    else:
        where = f"at step {done + 1}"
        lower = f"micro_batch_size (now {micro}) or {length}" + (
            "" if config.gradient_checkpointing else ", or set gradient_checkpointing: true"
        )
    kept = (
        f"the last good checkpoint {last_good} is intact (continue with --resume)"
        if last_good
        else "no checkpoint was written yet"
    )
    what = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return TrainingError(f"out of memory {where} ({what[:160]}) — lower {lower}; {kept}")


def disk_full(err: BaseException, out: Path) -> TrainingError | None:
    """One line for a write that failed on a full disk (or past a file-size limit or a quota) anywhere
    in a run — config.yaml, the metrics log, final/, summary.json; a checkpoint says so itself (the
    partial one removed): the file, and the newest checkpoint, which `--resume` continues from. None
    for any other error."""
    from preftune.train.checkpoint import NO_SPACE, list_checkpoints, os_error_number

    code = os_error_number(err)
    if isinstance(err, PreftuneError) or code not in NO_SPACE:
        return None
    file = getattr(err, "filename", None)
    newest = list_checkpoints(out / "checkpoints")
    kept = f"the newest checkpoint {newest[-1]} is intact" if newest else "no checkpoint was written yet"
    return TrainingError(
        f"no space left on device while writing {file or f'to the run folder {out}'} "
        f"({os.strerror(code or errno.ENOSPC)}); {kept} — free disk space (or raise the file-size "
        "limit), then rerun with --resume"
    )
