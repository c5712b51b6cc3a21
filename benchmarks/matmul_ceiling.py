"""The matmul ceiling of preftune's DPO step: the MFU it would reach if only its matmuls took time.

    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/matmul_ceiling.py --model-size 20m 45m
    PYTHONPATH=src .venv/bin/python benchmarks/matmul_ceiling.py --quick   # seconds, results/tmp/ only

For each model size and data shape it runs the preftune child of dpo_vs_trl.py (`best`: one pair per
forward, reference cache, fused AdamW, 3 steps of 2 pairs, the benchmark's data) twice over:

1. **Capture** (one child): the same run under a `TorchDispatchMode` that, over the last step only
   (step 3: end of step 2 to end of step 3; step 2 still runs the LM head's forward measurably
   slower), records every executed matmul — `aten.mm`, `addmm`, `addmm_`, `bmm`, `baddbmm` (`linear`
   and `matmul` are composite and arrive as these) and the fused CPU attention kernels
   (`_scaled_dot_product_flash_attention_for_cpu` and its backward: SDPA's QKᵀ and PV are not separate
   ops) — with shapes, strides, dtype, time in the step, group (a weight is recognised by its
   storage, a weight gradient by its shape or `.grad` storage) and phase; and every other op's time.
   Then each distinct call is replayed on its own (same op and layout; random operands, the attention
   kernels on copies of their real inputs) in bursts, each right after a burst of the 1024³ float32
   `torch.mm` that defines the peak, the order rotating between repetitions: call and peak are timed
   at the same moment, so load drift cancels in their ratio.
2. **Step time** (`--step-reps` children, no recording): the benchmark's own preftune child, timed
   by its optimizer-step clock (steps 2-3; step 3 alone beside it), with the benchmark's peak
   children (`bench_utils.matmul_peak`, best burst over 3 s) before and after: "MFU (executed)"
   exactly as dpo_vs_trl.py computes it.

Reported: the step's matmul FLOPs (each GEMM exactly; the attention kernels as flops.py counts them:
QKᵀ and PV over the cells computed, backward 2× forward) against flops.py's executed count; the
**matmul ceiling** = matmul FLOPs ÷ Σ (each call's replayed time) ÷ peak, each call's time taken
relative to its own peak burst (median over repetitions; wall and CPU time): the MFU of a step whose
non-matmul work took no time; per group, its FLOP share and rate as a fraction of the peak; the
measured step MFU beside it; and where the recorded step's CPU time went: matmuls (their in-step
time against the replayed one), every other op, and time outside any op. A replayed call runs with
its operands hot in cache: an upper bound.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_utils as bu  # noqa: E402

BENCH = Path(__file__).resolve().parent
SHAPES = {s.name: s for s in (bu.PROMPT_HEAVY, bu.BALANCED)}
GEMM_OPS = ("mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_", "addbmm", "addbmm_")
FLASH = "_scaled_dot_product_flash_attention_for_cpu"
ATTENTION_OPS = (FLASH, FLASH + "_backward")
# Op names that would be matmul work this script does not count: reported if any executes in the step.
SUSPECT = re.compile(r"mm|matmul|linear|conv|attention|einsum|dot|mv|addr|outer")
GROUPS = ("attention projections", "MLP", "LM head", "attention kernel", "other")
PHASES = ("forward", "input grad", "weight grad", "recompute", "backward")


# ---------------------------------------------------------------- what a call is and costs


def gemm_flops(op: str, shapes: list[tuple[int, ...]]) -> float:
    """2·m·k·n (× batch) of a GEMM call from its tensor operands' shapes (accumulation not counted)."""
    a, b = shapes[-2:]  # mm: (a, b); addmm/baddbmm/addbmm: (self, a, b)
    if op in ("mm", "addmm", "addmm_"):
        return 2.0 * a[0] * a[1] * b[1]
    return 2.0 * a[0] * a[1] * a[2] * b[2]  # bmm family: [B, m, k] @ [B, k, n]


def attention_flops(op: str, bound: dict[str, Any]) -> float:
    """QKᵀ and PV (4·cells·head_dim per head) over the score cells computed: the causal half of a
    square, else the full rectangle (as flops.tree_attention_flops counts them); backward 2× forward."""
    q, k = bound["query"].shape, bound["key"].shape  # [B, H, L, D], [B, H, S, D]
    causal = bool(bound.get("is_causal", False)) and q[-2] == k[-2]
    cells = q[-2] * (q[-2] + 1) / 2 if causal else float(q[-2] * k[-2])
    fwd = 4.0 * q[0] * q[1] * q[3] * cells
    return 2 * fwd if op.endswith("_backward") else fwd


Dims = tuple[int, ...]


def group_of(shape: Dims, dims: Dims) -> str:
    """The weight family of a weight-shaped tensor (`dims`: vocabulary, MLP width): the LM head, the
    MLP, else attention projections."""
    if dims[0] in shape:
        return "LM head"
    return "MLP" if dims[1] in shape else "attention projections"


def classify(
    op: str,
    weight: Dims | None,
    grad_of: Dims | None,
    out: Dims,
    backward: bool,
    shapes: set[Dims],
    dims: Dims,
) -> tuple[str, str]:
    """(group, phase) of a matmul call. `weight`: the shape of the parameter an operand views (if
    any); `grad_of`: the shape of the parameter whose `.grad` an operand views (an in-place weight
    gradient, `addmm_` into `.grad`); `out`: the result's shape; `backward`: inside autograd's
    backward; `shapes`: every parameter's shape; `dims`: (vocabulary, MLP width)."""
    if op in ATTENTION_OPS:
        return "attention kernel", "backward" if op.endswith("_backward") else "forward"
    if weight is not None:
        if not backward:
            return group_of(weight, dims), "forward"
        square = weight[0] == weight[1]
        return group_of(weight, dims), "recompute" if out[-1] == weight[0] and not square else "input grad"
    if grad_of is not None:
        return group_of(grad_of, dims), "weight grad"
    if backward and out in shapes:
        return group_of(out, dims), "weight grad"
    return "other", "backward" if backward else "forward"


# ---------------------------------------------------------------- capture


def _template(value: Any, keep: bool) -> Any:
    """An operand as replayable data: a tensor's (shape, stride, dtype) and, if `keep`, a copy of it."""
    import torch

    if isinstance(value, torch.Tensor):
        copy = None
        if keep:
            copy = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype)
            copy.copy_(value.detach())
        return ("T", tuple(value.shape), tuple(value.stride()), value.dtype, copy)
    if isinstance(value, list | tuple):
        return type(value)(_template(v, keep) for v in value)
    return value


def _materialise(template: Any) -> Any:
    """The operands of a replay: the kept copy, or a fresh tensor of the same layout (normal values)."""
    import torch

    if isinstance(template, tuple) and template and template[0] == "T":
        _, shape, stride, dtype, copy = template
        if copy is not None:
            return copy
        out = torch.empty_strided(shape, stride, dtype=dtype)
        return out.normal_() if dtype.is_floating_point else out.zero_()
    if isinstance(template, list | tuple):
        return type(template)(_materialise(v) for v in template)
    return template


def _shapes(args: Any) -> list[tuple[int, ...]]:
    import torch

    return [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]


def _scalars(args: Any, kwargs: dict[str, Any]) -> str:
    """Every operand of a call (tensors by shape) and keyword, as a key."""
    show = [f"T{tuple(v.shape)}" if hasattr(v, "shape") else repr(v) for v in [*args, *kwargs.values()]]
    return ",".join(show + list(kwargs))


def new_call(func: Any, args: Any, kwargs: dict[str, Any], where: tuple[str, str]) -> dict[str, Any]:
    """A distinct matmul call: what replays it, its FLOPs, its (group, phase) and its in-step totals."""
    import torch

    name = func.overloadpacket.__name__
    if name in ATTENTION_OPS:
        bound = dict(zip([x.name for x in func._schema.arguments], args))
        flops = attention_flops(name, {**bound, **kwargs})
    else:
        flops = gemm_flops(name, _shapes(args))
    keep = name in ATTENTION_OPS  # real inputs: the kernel's masks and log-sum-exps
    return {
        **{"op": name, "func": func, "args": _template(args, keep), "shapes": _shapes(args)},
        "kwargs": {k: _template(v, keep) for k, v in kwargs.items()},
        "dtypes": sorted({str(a.dtype) for a in args if isinstance(a, torch.Tensor)}),
        "strides": [list(a.stride()) for a in args if isinstance(a, torch.Tensor)],
        **{"group": where[0], "phase": where[1], "flops": flops, "count": 0},
        **{"insitu_wall_s": 0.0, "insitu_cpu_s": 0.0},
    }


def make_recorder(dims: tuple[int, int]) -> Any:
    """A TorchDispatchMode that, while `on`, records every matmul call (see the module docstring)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class MatmulRecorder(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.on = False
            self.calls: dict[Any, dict[str, Any]] = {}
            self.ops: Counter[str] = Counter()
            self.op_cpu: Counter[str] = Counter()
            self.weights: dict[int, tuple[int, ...]] = {}
            self.grads: dict[int, tuple[int, ...]] = {}

        def arm(self, params: list[Any]) -> None:
            """Recognise these parameters (and their current `.grad`) by storage from now on."""
            for p in params:
                self.weights[p.untyped_storage().data_ptr()] = tuple(p.shape)
                if p.grad is not None:
                    self.grads[p.grad.untyped_storage().data_ptr()] = tuple(p.shape)

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            if not self.on:
                return func(*args, **kwargs)
            name = func.overloadpacket.__name__
            t0, c0 = time.perf_counter(), time.process_time()
            out = func(*args, **kwargs)
            took = (time.perf_counter() - t0, time.process_time() - c0)
            self.ops[name] += 1
            self.op_cpu[name] += took[1]  # every op's own time: where the rest of the step goes
            if name in GEMM_OPS + ATTENTION_OPS:
                self._record(func, name, args, kwargs, out, took)
            return out

        def _record(self, func: Any, name: str, args: Any, kwargs: Any, out: Any, took: Any) -> None:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            ptrs = [t.untyped_storage().data_ptr() for t in tensors]
            in_backward = torch._C._current_autograd_node() is not None
            layout = tuple(
                (tuple(t.shape), t.stride(), p in self.weights, p in self.grads)
                for t, p in zip(tensors, ptrs)
            )
            key = (str(func), layout, _scalars(args, kwargs), in_backward)
            if key not in self.calls:
                first = out[0] if isinstance(out, tuple) else out
                weight = next((self.weights[p] for p in ptrs if p in self.weights), None)
                grad_of = next((self.grads[p] for p in ptrs if p in self.grads), None)
                shapes = set(self.weights.values())
                where = classify(name, weight, grad_of, tuple(first.shape), in_backward, shapes, dims)
                self.calls[key] = new_call(func, args, kwargs, where)
            call = self.calls[key]
            call["count"] += 1
            call["insitu_wall_s"] += took[0]
            call["insitu_cpu_s"] += took[1]

    return MatmulRecorder()


# ---------------------------------------------------------------- replay


PEAK_N = 1024
PEAK_FLOPS = 2.0 * PEAK_N**3  # one 1024³ float32 torch.mm


def _burst(fn: Any, n: int) -> list[float]:
    """[wall s, CPU s] per call of `fn`, over a burst of `n` calls."""
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        fn()
    return [(time.perf_counter() - t0) / n, (time.process_time() - c0) / n]


def replay_times(calls: list[dict[str, Any]], *, reps: int, min_s: float) -> list[list[list[float]]]:
    """Per call, per repetition: [wall s, CPU s] per call, then [wall s, CPU s] per 1024³ product of the
    peak burst timed just before it. Every callable is warmed up and timed in bursts of ≥ `min_s`;
    each repetition runs every call once, each after its own peak burst, the order rotating."""
    import torch

    a, b = torch.randn(PEAK_N, PEAK_N), torch.randn(PEAK_N, PEAK_N)
    fns: list[Callable[[], Any]] = [lambda: torch.mm(a, b)]
    for call in calls:
        args = _materialise(call["args"])
        kwargs = {k: _materialise(v) for k, v in call["kwargs"].items()}
        fns.append(functools.partial(call["func"], *args, **kwargs))
    sizes = []
    for fn in fns:  # warm-up, and the burst size
        fn()
        sizes.append(max(1, round(min_s / max(_burst(fn, 2)[0], 1e-7))))
    times: list[list[list[float]]] = [[] for _ in calls]
    for rep in range(reps):
        shift = rep * len(calls) // max(reps, 1)
        for i in list(range(shift, len(calls))) + list(range(shift)):
            peak = _burst(fns[0], sizes[0])
            times[i].append(_burst(fns[i + 1], sizes[i + 1]) + peak)
    return times


# ---------------------------------------------------------------- children


def child_ceiling(a: argparse.Namespace) -> dict[str, Any]:
    """Capture the last step's matmuls under the recorder, then replay each distinct call on its own."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    import dpo_children

    spec = bu.MODELS[a.model_size[0]]
    rec = make_recorder((spec.vocab_size, spec.intermediate_size))
    clock: list[tuple[float, float]] = []

    def toggle(opt: Any, *_: Any) -> None:  # on from the end of step N-1 to the end of step N, the last
        clock.append((time.perf_counter(), time.process_time()))
        if len(clock) == a.steps - 1:
            rec.arm([p for group in opt.param_groups for p in group["params"]])
        rec.on = len(clock) == a.steps - 1

    handle = register_optimizer_step_post_hook(toggle)
    ns = dpo_children.child_namespace(model=a.model, data=a.data, batch=a.batch, steps=a.steps)
    try:
        with rec:
            run = dpo_children.child_preftune(ns)
    finally:
        handle.remove()
    calls = list(rec.calls.values())
    times = replay_times(calls, reps=a.reps, min_s=a.min_burst)
    out = [
        {k: v for k, v in c.items() if k not in ("func", "args", "kwargs")} | {"times": times[i]}
        for i, c in enumerate(calls)
    ]
    suspect = {k: n for k, n in rec.ops.items() if SUSPECT.search(k) and k not in GEMM_OPS + ATTENTION_OPS}
    return {
        "calls": out,
        "suspect_ops": suspect,
        "recorded_step_s": [clock[-1][k] - clock[-2][k] for k in (0, 1)],  # under the recorder: slower
        "op_cpu_s": dict(rec.op_cpu.most_common()),
        "losses": run["losses"],
        "lengths": run["lengths"],
        "torch_threads": torch.get_num_threads(),
    }


def _peak(a: argparse.Namespace) -> tuple[float, float]:
    """The benchmark's peak (best burst of 1024³ torch.mm over --peak-seconds): a dpo_vs_trl.py peak
    child, in-process under --quick."""
    if a.quick:
        return bu.matmul_peak(seconds=a.peak_seconds)
    res = bu.run_child([str(BENCH / "dpo_vs_trl.py"), "--child", "peak", f"--peak-seconds={a.peak_seconds}"])
    return float(res["flops"]), float(res["cpu_flops"])


def measure(size: str, shape: bu.Shape, a: argparse.Namespace, model_dir: Path, work: Path) -> dict[str, Any]:
    """One model size × data shape: peak, the benchmark's timed preftune children, the capture
    child, peak again."""
    rows = bu.synth_pairs(shape.scaled(a.scale), a.batch, seed=a.seed + 1)
    data = bu.write_jsonl(rows, work / f"{shape.name}.jsonl")
    expected = [[p, c + 1, r + 1] for p, c, r in (row["_lengths"] for row in rows)]  # +1: EOS
    common = [f"--model={model_dir}", f"--data={data}", f"--batch={a.batch}", f"--steps={a.steps}"]
    step_child = [str(BENCH / "dpo_vs_trl.py"), "--child", "preftune", "--trl-variant", "best", *common]
    step_child += ["--lr", "1e-05", "--beta", "0.1", "--seed", str(a.seed), "--optimizer", "unfused"]
    peaks = [_peak(a)]
    steps = []
    for rep in range(a.step_reps):
        load0 = bu.load_average()
        res = bu.run_child(step_child, timeout=a.child_timeout)
        if res["lengths"] != expected:
            raise RuntimeError(f"preftune tokenized {shape.name} differently: {res['lengths']} vs {expected}")
        wall, cpu, n = bu.steps_rate(res["stamps"], skip=1)
        steps.append({"s_per_step": wall, "cpu_s_per_step": cpu, "timed_steps": n, "losses": res["losses"]})
        steps[-1]["last_step_cpu_s"] = res["stamps"][-1][1] - res["stamps"][-2][1]
        steps[-1]["load_average"] = [load0, bu.load_average()]
        print(f"  {size} {shape.name} step child {rep + 1}/{a.step_reps}: {wall:.3f} s/step", file=sys.stderr)
    load0 = bu.load_average()
    ceiling_child = [__file__, "--child", "ceiling", *common, "--model-size", size]
    cap = bu.run_child(
        ceiling_child + ["--reps", str(a.reps), "--min-burst", str(a.min_burst)], timeout=a.child_timeout
    )
    cap["load_average"] = [load0, bu.load_average()]
    if cap["lengths"] != expected:
        raise RuntimeError(f"the capture child tokenized {shape.name} differently")
    peaks.append(_peak(a))
    return summarise(cap, steps, peaks, bu.MODELS[size], expected)


# ---------------------------------------------------------------- parent


def _rate_of_peak(sel: list[dict[str, Any]], k: int) -> float:
    """The calls' replayed FLOP rate over the peak's (k = 0: wall, 1: CPU time): per repetition, each
    call's time over its own adjacent peak burst's; the median over repetitions."""
    flop = sum(c["count"] * c["flops"] for c in sel)
    reps = len(sel[0]["times"])
    at_peak = [sum(c["count"] * c["times"][r][k] / c["times"][r][2 + k] for c in sel) for r in range(reps)]
    return bu.median([flop / (x * PEAK_FLOPS) for x in at_peak])


def _median_time(c: dict[str, Any], k: int) -> float:
    return bu.median([t[k] for t in c["times"]])


def group_rows(calls: list[dict[str, Any]], peak: tuple[float, float]) -> list[dict[str, Any]]:
    """Per (group, phase): calls, FLOPs and their share, replayed and in-step rates over the peak
    (`peak`: the replay's median peak rates, wall and CPU)."""
    total = sum(c["count"] * c["flops"] for c in calls)
    replayed = sum(c["count"] * _median_time(c, 1) for c in calls)
    rows = []
    for group, phase in [(g, p) for g in GROUPS for p in PHASES]:
        sel = [c for c in calls if (c["group"], c["phase"]) == (group, phase)]
        if not sel:
            continue
        flop = sum(c["count"] * c["flops"] for c in sel)
        wall, cpu = (sum(c[f"insitu_{k}_s"] for c in sel) for k in ("wall", "cpu"))
        rows.append(
            {"group": group, "phase": phase, "calls": sum(c["count"] for c in sel), "gflop": flop / 1e9}
        )
        rows[-1] |= {"flop_share": flop / total, "rate_of_peak": _rate_of_peak(sel, 0)}
        rows[-1] |= {"rate_of_peak_cpu": _rate_of_peak(sel, 1)}
        rows[-1]["rate_of_peak_in_step"] = flop / wall / peak[0] if wall > 0 else float("nan")
        rows[-1]["rate_of_peak_in_step_cpu"] = flop / cpu / peak[1] if cpu > 0 else float("nan")
        rows[-1]["replayed_cpu_share"] = sum(c["count"] * _median_time(c, 1) for c in sel) / replayed
    return rows


Rec = dict[str, Any]


def summarise(cap: Rec, steps: list[Rec], peaks: list[Any], spec: bu.ModelSpec, expected: list[Any]) -> Rec:
    """Ceiling, groups, the formula's count and the measured step MFU of one size × shape."""
    import flops

    calls = cap["calls"]
    total = sum(c["count"] * c["flops"] for c in calls)
    recompute = sum(c["count"] * c["flops"] for c in calls if c["phase"] == "recompute")
    formula = flops.preftune_step(spec, expected, online_reference=False, micro_pairs=1)
    step = [bu.median([s[k] for s in steps]) for k in ("s_per_step", "cpu_s_per_step")]
    replayed = [sum(c["count"] * _median_time(c, k) for c in calls) for k in (0, 1)]
    in_step = [sum(c[f"insitu_{k}_s"] for c in calls) for k in ("wall", "cpu")]
    bursts = [t for c in calls for t in c["times"]]
    peak = (bu.median([PEAK_FLOPS / t[2] for t in bursts]), bu.median([PEAK_FLOPS / t[3] for t in bursts]))
    ceiling = (_rate_of_peak(calls, 0), _rate_of_peak(calls, 1))
    mfu = (formula / step[0] / max(p[0] for p in peaks), formula / step[1] / max(p[1] for p in peaks))
    other = {k: v for k, v in cap["op_cpu_s"].items() if k not in GEMM_OPS + ATTENTION_OPS}
    rec_cpu = cap["recorded_step_s"][1]
    gemm_only = _rate_of_peak([c for c in calls if c["group"] != "attention kernel"], 1)
    rows = group_rows(calls, peak)
    for c in calls:  # per-repetition times → per-call medians (a results file of a sensible size)
        c["replayed_s"], c["rate_of_peak_cpu"] = (
            [_median_time(c, 0), _median_time(c, 1)],
            _rate_of_peak([c], 1),
        )
        del c["times"]
    cap["op_cpu_s"] = dict(list(cap["op_cpu_s"].items())[:24])
    return {
        "lengths": expected,
        "matmul_gflop": total / 1e9,
        "recompute_gflop": recompute / 1e9,
        "formula_gflop": formula / 1e9,
        "matmul_over_formula": (total - recompute) / formula,
        "ceiling": ceiling[0],
        "ceiling_cpu": ceiling[1],
        "ceiling_gemm_only_cpu": gemm_only,
        "replay_peak_flops": peak[0],
        "replay_peak_cpu_flops": peak[1],
        "peaks": peaks,
        "s_per_step": step[0],
        "cpu_s_per_step": step[1],
        "mfu_executed": mfu[0],
        "mfu_cpu_time": mfu[1],
        "mfu_cpu_time_last_step": formula
        / bu.median([s["last_step_cpu_s"] for s in steps])
        / max(p[1] for p in peaks),
        "actual_over_ceiling": mfu[0] / ceiling[0],
        "actual_over_ceiling_cpu": mfu[1] / ceiling[1],
        "replayed_matmul_s": replayed,
        "in_step_matmul_s": in_step,
        "replayed_over_in_step_cpu": replayed[1] / in_step[1],
        # shares of the recorded step's own CPU time (same process, same moment; the recorder's own
        # overhead, ~10 % of a step, falls outside every op)
        "in_step_matmul_share_cpu": in_step[1] / rec_cpu,
        "other_ops_share_cpu": sum(other.values()) / rec_cpu,
        "outside_ops_share_cpu": 1 - (in_step[1] + sum(other.values())) / rec_cpu,
        "top_other_ops_share_cpu": {k: v / rec_cpu for k, v in list(other.items())[:8]},
        "groups": rows,
        "steps": steps,
        "capture": cap,
    }


SUMMARY_CELLS: tuple[Any, ...] = (("matmul_gflop", "formula_gflop"), ("ceiling", "ceiling_cpu"))
SUMMARY_CELLS += ("ceiling_gemm_only_cpu", ("mfu_executed", "mfu_cpu_time"), "mfu_cpu_time_last_step")
SUMMARY_CELLS += (("actual_over_ceiling", "actual_over_ceiling_cpu"), "replayed_over_in_step_cpu")
SUMMARY_CELLS += ("in_step_matmul_share_cpu", "other_ops_share_cpu", "outside_ops_share_cpu")
GROUP_CELLS: tuple[Any, ...] = ("group", "phase", "calls", "flop_share", ("rate_of_peak", "rate_of_peak_cpu"))
GROUP_CELLS += ("rate_of_peak_in_step_cpu", "replayed_cpu_share")


def _cells(r: dict[str, Any], keys: tuple[Any, ...]) -> list[Any]:
    """Table cells of `keys` in `r`; a pair of keys makes one "x / y" cell."""
    return [f"{r[k[0]]:.3g} / {r[k[1]]:.3g}" if isinstance(k, tuple) else r[k] for k in keys]


def render(res: dict[str, Any]) -> str:
    head = ["size", "shape", "matmul GFLOP/step: recorded / flops.py", "ceiling: wall / CPU"]
    head += ["GEMM-only ceiling (CPU)", "MFU (executed): wall / CPU", "MFU (CPU), last step alone"]
    head += ["actual ÷ ceiling: wall / CPU"]
    head += ["replayed ÷ in-step matmul time (CPU)", "recorded step (CPU): matmul share"]
    head += ["other ops' share", "outside any op (incl. recorder)"]
    rows, groups, tops = [], [], []
    for key, r in res["runs"].items():
        rows.append([*key.split("/"), *_cells(r, SUMMARY_CELLS)])
        top = ", ".join(f"{k} {v:.1%}" for k, v in r["top_other_ops_share_cpu"].items())
        tops.append(f"- {key}: {top}")
        groups += [[*key.split("/"), *_cells(g, GROUP_CELLS)] for g in r["groups"]]
    ghead = ["size", "shape", "group", "phase", "calls", "FLOP share", "rate ÷ peak, replayed: wall / CPU"]
    ghead += ["rate ÷ peak in step (CPU)", "share of replayed matmul CPU time"]
    runs = res["runs"].values()
    loads = [lv[0] for r in runs for s in [*r["steps"], r["capture"]] for lv in s["load_average"]]
    peaks = [p[k] / 1e9 for r in runs for p in r["peaks"] for k in (0, 1)]
    return (
        f"{bu.md_table(head, rows)}\n\nLargest other ops, share of the recorded step's CPU time:\n"
        + "\n".join(tops)
        + "\n\n"
        f"{bu.md_table(ghead, groups)}\n\n"
        f"Command: `{res['command']}`; {res['threads']} thread(s), OMP_WAIT_POLICY="
        f"{res['machine']['omp_wait_policy']}; step time: median of {res['step_reps']} preftune "
        f"children (dpo_vs_trl.py `best`, {res['steps']} steps of {res['batch']} pairs, the first not "
        f"timed); MFU over the benchmark's peak (best 1024³ burst, before and after: "
        f"{min(peaks[::2]):.1f}–{max(peaks[::2]):.1f} GFLOP/s, {min(peaks[1::2]):.1f}–{max(peaks[1::2]):.1f}"
        f" per CPU-s); ceiling over the peak burst timed before each replayed call ({res['reps']} "
        f"rotating repetitions, bursts of ≥ {res['min_burst']} s); 1-min load average "
        f"{min(loads):.2f}–{max(loads):.2f} (before/after each child).\n"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", choices=["ceiling"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--model-size", nargs="+", choices=sorted(bu.MODELS), default=["20m"])
    ap.add_argument("--shapes", nargs="+", default=["prompt_heavy", "balanced"], help="and/or balanced")
    ap.add_argument("--quick", action="store_true", help="tiny model, 1 short shape: seconds, results/tmp/")
    ap.add_argument("--reps", type=int, default=7, help="interleaved replay repetitions")
    ap.add_argument("--min-burst", type=float, default=0.05, help="seconds of calls per replay timing")
    ap.add_argument("--step-reps", type=int, default=3, help="timed preftune children per size × shape")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per child (the last is captured)")
    ap.add_argument("--batch", type=int, default=2, help="pairs per optimizer step")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every sequence length")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every child")
    ap.add_argument("--peak-seconds", type=float, default=3.0)
    ap.add_argument("--child-timeout", type=float, default=1800.0)
    ap.add_argument("--name", default="matmul_ceiling", help="results file stem")
    a = ap.parse_args(argv)
    a.shapes = [s.replace("-", "_") for s in a.shapes]
    if set(a.shapes) - set(SHAPES):
        ap.error(f"--shapes {' '.join(a.shapes)}: choose from {', '.join(SHAPES)}")
    if a.quick:
        a.model_size, a.shapes, a.scale, a.reps, a.min_burst = ["tiny"], ["prompt_heavy"], 0.05, 2, 0.002
        a.step_reps, a.steps, a.peak_seconds = 1, 2, 0.2
    if a.steps < 2:
        ap.error("--steps must be at least 2 (the first is never timed or captured)")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.child:
        print(json.dumps(child_ceiling(a)))
        return 0
    os.environ["OMP_NUM_THREADS"] = str(a.threads)  # every child's, and this process's torch
    import torch

    torch.set_num_threads(a.threads)
    t0 = time.time()
    runs: dict[str, Any] = {}
    bu.RESULTS_DIR.joinpath("tmp").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=bu.RESULTS_DIR / "tmp") as tmp:
        for size in a.model_size:
            model_dir = bu.save_model(bu.MODELS[size], Path(tmp) / f"model_{size}", seed=a.seed)
            for shape in a.shapes:
                print(f"[matmul_ceiling] {size} {shape}", file=sys.stderr, flush=True)
                runs[f"{size}/{shape}"] = measure(size, SHAPES[shape], a, model_dir, Path(tmp))
    res = {
        "command": "python benchmarks/matmul_ceiling.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": bu.machine_info(),
        "models": {size: bu.MODELS[size] for size in a.model_size},
        "params": {size: bu.param_counts(bu.MODELS[size]) for size in a.model_size},
        **{k: getattr(a, k) for k in ("threads", "reps", "min_burst", "step_reps", "steps", "batch")},
        "scale": a.scale,
        "runs": runs,
        "elapsed_s": time.time() - t0,
    }
    jp, _ = bu.save_results(a.name, res, render(res), quick=a.quick)
    print(render(res), file=sys.stderr)
    print(f"[matmul_ceiling] results: {jp}", file=sys.stderr)
    print(
        json.dumps(
            {key: [round(r[k], 3) for k in ("ceiling_cpu", "mfu_cpu_time")] for key, r in runs.items()}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
