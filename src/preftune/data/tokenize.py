"""Validated records → token ids, truncated, in batches, on both cores for large inputs.

Length limits are applied by `lengths.truncate` (see there).

Results are held flat (`Tokenized`: one int32 array of all segments plus offsets), which is what
the worker processes send back and what the cache stores; `Tokenized.examples()` builds the
`Example`s the trainer reads.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np

from preftune.data.formatting import Formatter
from preftune.data.lengths import TRUNCATION_MODES as TRUNCATION_MODES
from preftune.data.lengths import Truncation as Truncation
from preftune.data.lengths import length_problem, truncate
from preftune.data.rows import Problem
from preftune.data.schema import Record
from preftune.errors import DataError
from preftune.types import Example

PARALLEL_MIN_ROWS = 20_000  # below this, starting a second process costs more than it saves
BATCH_ROWS = 512


@dataclass
class Tokenized:
    """Token ids of E examples, stored flat.

    tokens:   [T] int32, every segment back to back; example e's segments are its prompt, then
              its K_e responses (best first).
    offsets:  [S + 1] int64 segment boundaries, S = Σ_e (1 + K_e).
    branches: [E] int32 K_e.
    rows:     [E] int64 1-based source rows.
    extras:   per example, the optional label / scores / margins / margin ({} when none).
    """

    kind: str
    tokens: np.ndarray
    offsets: np.ndarray
    branches: np.ndarray
    rows: np.ndarray
    extras: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def build(
        cls,
        kind: str,
        segments: list[list[int]],
        branches: list[int],
        rows: list[int],
        extras: list[dict[str, Any]],
    ) -> Tokenized:
        lengths = np.fromiter((len(s) for s in segments), dtype=np.int64, count=len(segments))
        offsets = np.zeros(len(segments) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.fromiter(chain.from_iterable(segments), dtype=np.int32, count=int(offsets[-1]))
        return cls(
            kind,
            flat,
            offsets,
            np.asarray(branches, dtype=np.int32),
            np.asarray(rows, dtype=np.int64),
            extras,
        )

    @classmethod
    def concat(cls, kind: str, parts: list[Tokenized]) -> Tokenized:
        if not parts:
            return cls.build(kind, [], [], [], [])
        offsets = [parts[0].offsets]
        base = int(parts[0].offsets[-1])
        for p in parts[1:]:
            offsets.append(p.offsets[1:] + base)
            base += int(p.offsets[-1])
        return cls(
            kind,
            np.concatenate([p.tokens for p in parts]),
            np.concatenate(offsets),
            np.concatenate([p.branches for p in parts]),
            np.concatenate([p.rows for p in parts]),
            [e for p in parts for e in p.extras],
        )

    def examples(self) -> list[Example]:
        tokens = self.tokens.tolist()
        offs = self.offsets.tolist()
        out = []
        seg = 0
        for k, row, extra in zip(self.branches.tolist(), self.rows.tolist(), self.extras):
            prompt = tokens[offs[seg] : offs[seg + 1]]
            responses = [tokens[offs[s] : offs[s + 1]] for s in range(seg + 1, seg + 1 + k)]
            seg += 1 + k
            out.append(
                Example(
                    prompt,
                    responses,
                    kind=self.kind,  # type: ignore[arg-type]
                    label=extra.get("label"),
                    scores=extra.get("scores"),
                    margins=extra.get("margins"),
                    source_row=row,
                    margin=extra.get("margin"),
                )
            )
        return out

    def lengths(self) -> dict[str, np.ndarray]:
        """Prompt lengths [E], response lengths [Σ K], and prompt+response lengths [Σ K]."""
        seg_len = np.diff(self.offsets)
        if len(self.rows) == 0:
            empty = np.zeros(0, dtype=np.int64)
            return {"prompt": empty, "response": empty, "total": empty}
        starts = np.concatenate([[0], np.cumsum(1 + self.branches.astype(np.int64))[:-1]])
        is_prompt = np.zeros(len(seg_len), dtype=bool)
        is_prompt[starts.astype(np.int64)] = True
        prompt = seg_len[is_prompt]
        response = seg_len[~is_prompt]
        total = response + np.repeat(prompt, self.branches.astype(np.int64))
        return {"prompt": prompt, "response": response, "total": total}


@dataclass
class TokenizeResult:
    data: Tokenized
    problems: list[Problem] = field(default_factory=list)  # rows dropped (template or length)
    counts: Counter[str] = field(default_factory=Counter)  # truncated_prompt / truncated_response / truncated
    num_proc: int = 1  # processes that did the work


def _extras(rec: Record) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if rec.label is not None:
        out["label"] = rec.label
    if rec.scores is not None:
        out["scores"] = rec.scores
    if rec.margins is not None:
        out["margins"] = rec.margins
    if rec.margin is not None:
        out["margin"] = rec.margin
    return out


def tokenize_serial(
    records: list[Record], formatter: Formatter, trunc: Truncation, kind: str, path: str = "data"
) -> TokenizeResult:
    """Tokenize in this process, BATCH_ROWS records per tokenizer call."""
    segments: list[list[int]] = []
    branches: list[int] = []
    rows: list[int] = []
    extras: list[dict[str, Any]] = []
    problems: list[Problem] = []
    counts: Counter[str] = Counter()
    bos = formatter.tokenizer.bos_token_id
    for start in range(0, len(records), BATCH_ROWS):
        batch = records[start : start + BATCH_ROWS]
        prompts: list[str] = []
        responses: list[str] = []
        kept: list[Record] = []
        templated: list[bool] = []
        for rec, rendered in zip(batch, formatter.render_many(batch)):
            if isinstance(rendered, DataError):
                problems.append(
                    Problem(
                        rendered.problem,
                        row=rec.row,
                        field=rendered.field,
                        fix=rendered.fix,
                        path=path,
                        reason="chat template: "
                        + ("fails" if "fails" in rendered.problem else "prompt render is not a prefix"),
                    )
                )
                continue
            text, rs = rendered
            kept.append(rec)
            templated.append(formatter.templated(rec))
            prompts.append(text)
            responses.extend(rs)
        p_ids, r_ids = formatter.encode(prompts, responses, templated)
        j = 0
        for rec, p in zip(kept, p_ids):
            k = len(rec.responses)
            rs_ids = r_ids[j : j + k]
            j += k
            cut = truncate(p, rs_ids, trunc, bos)
            if cut is None:
                problems.append(length_problem(rec.row, p, rs_ids, trunc, path))
                continue
            p, rs_ids, cut_p, cut_r = cut
            counts["truncated_prompt"] += cut_p
            counts["truncated_response"] += cut_r
            counts["truncated"] += cut_p or cut_r
            segments.append(p)
            segments.extend(rs_ids)
            branches.append(k)
            rows.append(rec.row)
            extras.append(_extras(rec))
    return TokenizeResult(Tokenized.build(kind, segments, branches, rows, extras), problems, counts)


# Set in the parent just before forking workers, which inherit it (nothing large is pickled).
_JOB: tuple[list[Record], Formatter, Truncation, str, str] | None = None


PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when its parent dies (Linux)


def _exit_with_parent(parent: int) -> None:
    """Worker initializer: the worker ends when `parent` dies, so a killed parent (SIGKILL, out of
    memory) leaves no worker tokenizing on or blocked forever on its queue. Linux sends SIGKILL at
    once (prctl PR_SET_PDEATHSIG); elsewhere, or if that fails, a thread checks the parent's pid
    twice a second."""
    armed = False
    if sys.platform.startswith("linux"):
        try:
            armed = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL)) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)
    if not armed:

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(0.5)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()


def _run_chunk(bounds: tuple[int, int]) -> TokenizeResult:
    assert _JOB is not None
    records, formatter, trunc, kind, path = _JOB
    # One thread per worker: the workers already use the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    return tokenize_serial(records[bounds[0] : bounds[1]], formatter, trunc, kind, path)


def default_num_proc(n_rows: int) -> int:
    return 2 if n_rows > PARALLEL_MIN_ROWS and (os.cpu_count() or 1) >= 2 else 1


def tokenize_records(
    records: list[Record],
    formatter: Formatter,
    trunc: Truncation,
    kind: str,
    *,
    path: str = "data",
    num_proc: int | None = None,
) -> TokenizeResult:
    """Tokenize `records`; with num_proc > 1 (default: 2 above PARALLEL_MIN_ROWS rows on a machine with
    2+ cores) the records are split into contiguous chunks, one forked worker each. Where fork is
    unavailable, or a worker dies, it falls back to this process. Workers exit when this process dies."""
    n = num_proc if num_proc is not None else default_num_proc(len(records))
    if n <= 1 or len(records) < 2 or "fork" not in mp.get_all_start_methods():
        return tokenize_serial(records, formatter, trunc, kind, path)
    global _JOB
    _JOB = (records, formatter, trunc, kind, path)
    step = -(-len(records) // n)
    bounds = [(i, min(i + step, len(records))) for i in range(0, len(records), step)]
    try:
        with ProcessPoolExecutor(
            max_workers=len(bounds),
            mp_context=mp.get_context("fork"),
            initializer=_exit_with_parent,
            initargs=(os.getpid(),),
        ) as pool:
            parts = list(pool.map(_run_chunk, bounds))
    except (BrokenProcessPool, OSError):
        return tokenize_serial(records, formatter, trunc, kind, path)
    finally:
        _JOB = None
    counts: Counter[str] = Counter()
    for p in parts:
        counts.update(p.counts)
    return TokenizeResult(
        Tokenized.concat(kind, [p.data for p in parts]),
        [q for p in parts for q in p.problems],
        counts,
        num_proc=len(parts),
    )
