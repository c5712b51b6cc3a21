"""Graceful stop: SIGTERM, SIGINT (Ctrl-C) and SIGHUP during training save a checkpoint at the next
step boundary, then the run exits non-zero saying how to resume — what a cluster scheduler's
pre-emption (SLURM sends SIGTERM, then SIGKILL after a grace period) expects.

A second signal stops at once (KeyboardInterrupt): the last checkpoint written stays the resume point.
Under torchrun every rank takes part in the decision (one all-reduce per step), so all ranks save and
stop at the same step.
"""

from __future__ import annotations

import os
import shlex
import signal
import threading
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import torch

from preftune.errors import TrainingError
from preftune.train.distributed import World

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Interrupted(TrainingError):
    """The run stopped on a signal after saving a checkpoint; `exit_code` is 128 + the signal number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class GracefulStop:
    """Within `with`: the stop signals set a flag instead of ending the process (main thread only;
    elsewhere signals keep their handlers). `requested(world)` is read at each step boundary."""

    def __init__(self, action: str = "saving a checkpoint after this step, then stopping") -> None:
        self.signum = 0
        self.action = action  # what the first signal does, for its message
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        """Nested stops (a training run inside `preftune sweep`) hand a signal on: one the outer stop
        received before this one began is this one's too (the run stops at its first step boundary)."""
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            outer = self._outer()
            if outer is not None and outer.signum and not self.signum:
                self.signum = outer.signum
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        """... and one received here is the outer stop's after this one ends (a run that finished in
        the meantime must not swallow it)."""
        outer = self._outer()
        if outer is not None and self.signum and not outer.signum:
            outer.signum = self.signum
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _outer(self) -> GracefulStop | None:
        owner = getattr(self._previous.get(signal.SIGINT), "__self__", None)
        return owner if isinstance(owner, GracefulStop) else None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum:
            raise KeyboardInterrupt  # a second signal: stop now, the last checkpoint stays the resume point
        self.signum = signum
        # os.write, not print: a handler may run in the middle of another write to the same stream
        os.write(
            2,
            f"\n{signal.Signals(signum).name} received: {self.action} "
            "(send it again to stop at once)\n".encode(),
        )

    def requested(self, world: World) -> int:
        """The signal number any rank received (0: none); the same on every rank."""
        if world.size <= 1:
            return self.signum
        import torch.distributed as dist

        flag = torch.tensor([self.signum], dtype=torch.int64, device=world.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


def resume_command(out: str, world: World) -> str:
    """The command that continues this run exactly: config.yaml holds every setting."""
    launcher = f"torchrun --nproc_per_node {world.size} -m preftune" if world.size > 1 else "preftune"
    here = (
        "" if os.path.isabs(out) else f"cd {shlex.quote(os.getcwd())} && "
    )  # its paths are relative to here
    return f"{here}{launcher} train --config {os.path.join(out, 'config.yaml')} --resume"


def stopped(signum: int, step: int, total: int, checkpoint: Any, out: str, world: World) -> Interrupted:
    """The error a stopped run raises: where it stopped, the checkpoint, and how to resume."""
    name = signal.Signals(signum).name
    return Interrupted(
        f"stopped by {name} after step {step} of {total}; checkpoint {checkpoint} saved — "
        f"resume with: {resume_command(out, world)}",
        signum,
    )


def stopped_at_once(step: int, checkpoint: Any, out: str, world: World) -> Interrupted:
    """The error of a run stopped in the middle of a step (a second signal): the resume point is the
    newest checkpoint written, or step 0 when there is none (`--resume` then starts over in OUT)."""
    where = (
        f"the newest checkpoint is {checkpoint}"
        if checkpoint
        else "no checkpoint was written yet, --resume starts over in the same folder"
    )
    return Interrupted(
        f"stopped at once during step {step + 1} (a second signal); {where} — "
        f"resume with: {resume_command(out, world)}",
        signal.SIGINT,
    )


class StepStops:
    """The graceful stop of a one-process loop that is not the main training loop (reward models,
    online diffusion): within `with`, a stop signal ends the loop at the next step boundary
    (`check(done, ...)`), after a checkpoint of that step, with `stopped`'s error and resume command;
    a second signal stops at once (`stopped_at_once`, the newest checkpoint written)."""

    def __init__(self, out: str, total: int) -> None:
        self.out, self.total, self.done = out, total, 0
        self.graceful = GracefulStop()

    def __enter__(self) -> StepStops:
        self.graceful.__enter__()
        return self

    def check(self, done: int, saved: Any, save: Any) -> None:
        """After step `done`: `saved` is the checkpoint written at this step (None: none), `save()`
        writes one."""
        self.done = done
        if self.graceful.signum:
            raise stopped(self.graceful.signum, done, self.total, saved or save(), self.out, World())

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.graceful.__exit__(kind, err, tb)
        if kind is KeyboardInterrupt:
            from preftune.train.checkpoint import list_checkpoints

            newest = list_checkpoints(Path(self.out) / "checkpoints")
            raise stopped_at_once(self.done, newest[-1] if newest else None, self.out, World()) from None


class Finishing:
    """After the last step, while a run evaluates and writes its results (final/, summary.json, the
    report): the stop signals, whose training handlers are gone by then, stop the run at once with
    `error()` — what is on disk (final/ written or not, the newest checkpoint) and how to write the
    rest — instead of "interrupted" (SIGINT) or no word at all (SIGTERM, SIGHUP). The run says what it
    finished writing with `wrote("final/")`, `wrote("summary.json")`. An outer stop (a sweep's) keeps
    the signals: it lets the run finish, then stops."""

    def __init__(self, out: str, step: int, total: int, world: World | None = None) -> None:
        self.out, self.step, self.total = out, step, total
        self.world = world or World()
        self.written: list[str] = []
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def wrote(self, name: str) -> None:
        self.written.append(name)

    def __enter__(self) -> Finishing:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                if not isinstance(getattr(signal.getsignal(sig), "__self__", None), GracefulStop):
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        raise KeyboardInterrupt

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        installed = bool(self._previous)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if kind is KeyboardInterrupt and installed:
            raise self.error() from None

    def error(self) -> Interrupted:
        """Where the run stopped, what of its results is on disk, and the command that writes the rest."""
        from preftune.train.checkpoint import list_checkpoints

        out = Path(self.out)
        newest = list_checkpoints(out / "checkpoints")
        point = f"the newest checkpoint is {newest[-1]}" if newest else "no checkpoint was written"
        resume = resume_command(self.out, self.world)
        if "final/" not in self.written:
            state = f"final/ was not written; {point}"
            fix = f"write final/ and summary.json from it with: {resume}" if newest else "train again"
        elif "summary.json" not in self.written:
            state = f"final/ is written ({out / 'final'}); summary.json was not; {point}"
            fix = f"write summary.json (and final/ again) from it with: {resume}" if newest else "train again"
        else:
            state = f"final/ and summary.json are written ({out}); the report was not"
            fix = f"write it with: preftune report {shlex.quote(self.out)}"
        name = signal.Signals(self.signum or signal.SIGINT).name
        return Interrupted(
            f"stopped by {name} after training finished (step {self.step} of {self.total}), while the "
            f"run wrote its results: {state} — {fix}",
            self.signum or signal.SIGINT,
        )
