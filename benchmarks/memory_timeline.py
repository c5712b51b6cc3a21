"""Where preftune's peak resident memory comes from: the RSS high-water mark of one DPO training run,
each rise attributed to the preftune function running at that moment.

    .bench-venv/bin/python benchmarks/memory_timeline.py --model-size 20m --shape balanced

Runs the same preftune child as dpo_vs_trl.py's `preftune` side (same model, data and settings; the
`--levers-off` of its `preftune_base` side) in this process, while a thread samples the resident set
(/proc/self/statm) every millisecond. Each time it passes its previous maximum by `--step-mib`, the
rise is charged to the innermost preftune frame of the main thread's Python stack (or to the torch
optimizer; "imports" for this script's own, torch included). The table lists those charges in order of time, with
the optimizer steps, and the process peak (`ru_maxrss`). A rise is where the high-water mark grew,
not what is alive there: memory freed earlier and kept by the allocator is reused before the mark
moves, so the charges add up to the peak. Under glibc each row also gives its allocator's own
accounting at the row's last rise (`mallinfo2`): MiB in live blocks (heap and mapped) and MiB of
freed blocks it keeps in its heap — the part of the resident set an allocator setting could return. Start it with `OMP_NUM_THREADS` and `OMP_WAIT_POLICY` set
as for the benchmark children. Results: benchmarks/results/memory_timeline_SHAPE.md (`_inthread` with
`--in-thread`, `_off_LEVERS` with `--levers-off`).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_utils as bu  # noqa: E402
import dpo_children  # noqa: E402
import dpo_vs_trl  # noqa: E402


def charge(frame: Any) -> str:
    """The innermost preftune (or torch.optim) function of a stack, as file:function."""
    for fr, _ in traceback.walk_stack(frame):
        name = fr.f_code.co_filename
        if "/preftune/" in name or "/torch/optim/" in name:
            return f"{Path(name).stem}.{fr.f_code.co_name}"
    return "other"


class MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks")
        + ("uordblks", "fordblks", "keepcost")
    ]


def glibc_heap() -> tuple[float, float] | None:
    """(MiB in live blocks, MiB of free blocks kept in the heap) from glibc's `mallinfo2`, or None."""
    from preftune.train.allocator import glibc

    libc = glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return (info.uordblks + info.hblkhd) / 2**20, info.fordblks / 2**20


class Sampler(threading.Thread):
    def __init__(self, step_mib: float) -> None:
        super().__init__(daemon=True)
        self.main, self.step, self.stop = threading.get_ident(), step_mib, False
        self.t0, self.label = time.perf_counter(), "imports"
        self.rises: list[tuple[float, float, str]] = []
        self.heap: list[tuple[float, float] | None] = []  # glibc's (live, kept free) at each rise

    def run(self) -> None:
        high = bu.rss_mb()
        self.rises.append((0.0, high, "start"))
        self.heap.append(glibc_heap())
        while not self.stop:
            now = bu.rss_mb()
            if now >= high + self.step:
                frame = sys._current_frames().get(self.main)
                where = charge(frame) if self.label == "train" else self.label
                self.rises.append((time.perf_counter() - self.t0, now, where))
                self.heap.append(glibc_heap())
                high = now
            time.sleep(0.001)


def own_high_water_mib(fd: int) -> float:
    """VmHWM of /proc/self/status (open as `fd`): this process's own resident high-water mark. Not
    `ru_maxrss`: a process started by subprocess inherits its parent's mark there (Linux keeps it
    across exec), so under a larger parent (a test run) it would never rise."""
    text = os.pread(fd, 4096, 0).decode()
    start = text.index("VmHWM:") + 6
    return int(text[start : text.index("kB", start)]) / 1024


class InThreadSampler:
    """The same rises without a second thread: `sys.setprofile` reads the process's own high-water mark
    (`own_high_water_mib`) at Python calls and returns of the main thread, at most every 0.2 ms. A
    sampling thread makes glibc give it a malloc arena of its own, so the process it measures is not
    quite the single-threaded benchmark child; this one is. The kernel keeps the mark, so a rise and
    fall inside one C call is still seen, and charged to the next Python event."""

    def __init__(self, step_mib: float) -> None:
        self.fd = os.open("/proc/self/status", os.O_RDONLY)
        self.step, self.stop, self.last = step_mib, False, 0.0
        self.t0, self.label = time.perf_counter(), "imports"
        self.high = own_high_water_mib(self.fd)
        self.rises: list[tuple[float, float, str]] = [(0.0, self.high, "start")]
        self.heap: list[tuple[float, float] | None] = [glibc_heap()]

    def hook(self, frame: Any, event: str, arg: Any) -> None:
        t = time.perf_counter()
        if t - self.last < 2e-4:
            return
        self.last = t
        now = own_high_water_mib(self.fd)
        if now >= self.high + self.step:
            where = charge(frame) if self.label == "train" else self.label
            self.rises.append((t - self.t0, now, where))
            self.heap.append(glibc_heap())
            self.high = now

    def start(self) -> None:
        sys.setprofile(self.hook)

    def join(self) -> None:
        sys.setprofile(None)
        os.close(self.fd)


def merged(rises: list[tuple[float, float, str]], heap: list[Any]) -> list[tuple[Any, ...]]:
    """Consecutive rises charged to the same function as one row: (start s, MiB before, MiB after,
    where, glibc's (live, kept free) at the row's last rise)."""
    rows: list[tuple[Any, ...]] = []
    for (_, before, _), (t, after, where), held in zip(rises, rises[1:], heap[1:]):
        if rows and rows[-1][3] == where:
            rows[-1] = (rows[-1][0], rows[-1][1], after, where, held)
        else:
            rows.append((t, before, after, where, held))
    return rows


def row_line(t: float, before: float, after: float, where: str, held: Any) -> str:
    glibc = f"{held[0]:.0f} | {held[1]:.0f}" if held else "– | –"
    return f"| {t:.2f} | {before:.0f} | {after:.0f} | +{after - before:.0f} | {where} | {glibc} |"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(dpo_vs_trl.SHAPES), default="balanced")
    ap.add_argument("--model-size", choices=sorted(bu.MODELS), default="20m")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--levers-off", default="", help="as dpo_vs_trl.py --base-levers-off")
    ap.add_argument("--step-mib", type=float, default=8.0, help="resolution of the high-water mark")
    ap.add_argument("--smoke", action="store_true", help="tiny model and lengths: the code path only")
    ap.add_argument(
        "--in-thread",
        action="store_true",
        help="sample through sys.setprofile in the main thread (no sampling thread, no second malloc "
        "arena); results in memory_timeline_SHAPE_inthread",
    )
    ap.add_argument("--prepare", metavar="DIR", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.smoke:
        a.model_size, a.scale, a.steps = "tiny", 0.05, 2
    if a.prepare:
        bu.save_model(bu.MODELS[a.model_size], Path(a.prepare) / "model")
        rows = bu.synth_pairs(dpo_vs_trl.SHAPES[a.shape].scaled(a.scale), a.batch, seed=1)
        bu.write_jsonl(rows, Path(a.prepare) / "d.jsonl")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # model and data are written by a child process, so that building them leaves nothing here
        subprocess.run([sys.executable, __file__, "--prepare", tmp, *(argv or sys.argv[1:])], check=True)
        sampler: Any = InThreadSampler(a.step_mib) if a.in_thread else Sampler(a.step_mib)
        sampler.start()
        stamps = bu.install_step_clock()
        ns = dpo_children.child_namespace(
            model=str(work / "model"),
            data=str(work / "d.jsonl"),
            batch=a.batch,
            steps=a.steps,
            levers_off=a.levers_off,
        )
        sampler.label = "train"
        out = dpo_children.child_preftune(ns)
    sampler.stop = True
    sampler.join()
    steps = [round(s[0] - sampler.t0, 2) for s in stamps]
    lines = [row_line(*row) for row in merged(sampler.rises, sampler.heap)]
    with open("/proc/self/status") as status:  # (not ru_maxrss: see own_high_water_mib)
        peak = own_high_water_mib(status.fileno())
    text = (
        f"preftune DPO, {a.model_size} model, {a.shape} × {a.scale}, batch {a.batch}, {a.steps} steps, "
        f"levers off: {a.levers_off or 'none'}; losses {[round(x, 4) for x in out['losses']]}\n"
        f"optimizer steps end at {steps} s; peak RSS (VmHWM) {peak:.0f} MiB; load average {bu.load_average()}\n\n"
        "| from s | MiB before | MiB after | rise | charged to | glibc live MiB | glibc kept free MiB |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n"
    )
    stem = f"memory_timeline_{a.shape}" + (f"_{a.model_size}" if a.model_size != "20m" else "")
    stem += "_inthread" if a.in_thread else ""
    stem += "_off_" + a.levers_off.replace(",", "_").replace("=", "") if a.levers_off else ""
    found = {"rises": sampler.rises, "glibc_heap": sampler.heap, "steps": steps, "peak_rss_mb": peak}
    bu.save_results(stem, found, text, quick=a.smoke)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
