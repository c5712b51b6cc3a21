"""benchmarks/matmul_ceiling.py: its FLOP counts and call classes by hand, and its --quick run end to end.

The quick run (tiny model, one short shape) checks the code path and the invariants the full run's
numbers rest on: every matmul of the captured step is found (its FLOPs equal flops.py's executed
count), nothing matmul-like goes unrecorded, and only a temp folder is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))
import matmul_ceiling as mc  # noqa: E402

DIMS = (100, 24)  # vocabulary, MLP width of the hand-made cases


def test_gemm_and_attention_flops_by_hand() -> None:
    assert mc.gemm_flops("mm", [(5, 8), (8, 3)]) == 2 * 5 * 8 * 3
    assert mc.gemm_flops("addmm_", [(100, 8), (100, 5), (5, 8)]) == 2 * 100 * 5 * 8
    assert mc.gemm_flops("bmm", [(4, 5, 8), (4, 8, 3)]) == 2 * 4 * 5 * 8 * 3

    class T:
        def __init__(self, *shape: int) -> None:
            self.shape = shape

    q, k = T(1, 2, 6, 16), T(1, 2, 6, 16)
    causal = mc.attention_flops(mc.FLASH, {"query": q, "key": k, "is_causal": True})
    assert causal == 4 * 2 * 16 * (6 * 7 / 2)  # the causal half of the 6 × 6 square
    branch = {"query": T(1, 2, 3, 16), "key": T(1, 2, 9, 16), "is_causal": False}
    assert mc.attention_flops(mc.FLASH + "_backward", branch) == 2 * 4 * 2 * 16 * 3 * 9


def test_classify_by_weight_storage_and_shape() -> None:
    shapes = {(8, 8), (24, 8), (8, 24), (100, 8)}

    def where(weight: tuple[int, ...] | None, out: tuple[int, ...], backward: bool, grad: bool = False):
        return mc.classify(
            "mm", None if grad else weight, weight if grad else None, out, backward, shapes, DIMS
        )

    assert where((8, 8), (30, 8), False) == ("attention projections", "forward")
    assert where((8, 8), (30, 8), True) == ("attention projections", "input grad")  # square: not a recompute
    assert where((24, 8), (30, 8), True) == ("MLP", "input grad")
    assert where((100, 8), (30, 100), False) == ("LM head", "forward")
    assert where((100, 8), (30, 100), True) == ("LM head", "recompute")
    assert where((100, 8), (100, 8), True, grad=True) == ("LM head", "weight grad")  # addmm_ into .grad
    assert where(None, (8, 24), True) == ("MLP", "weight grad")  # a fresh gradient of a weight's shape
    assert where(None, (30, 30), False) == ("other", "forward")
    assert mc.classify(mc.FLASH + "_backward", None, None, (1,), True, shapes, DIMS)[1] == "backward"


def _tracked() -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in (BENCH / "results").glob("*")
        if p.is_file()
    }


def test_matmul_ceiling_quick(tmp_path: Path) -> None:
    before = _tracked()
    out = tmp_path / "results"
    env = {**os.environ, "PREFTUNE_BENCH_RESULTS": str(out), "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(BENCH / "matmul_ceiling.py"), "--quick"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _tracked() == before and not (out / "matmul_ceiling.json").exists()  # quick: tmp/ only
    res = json.loads((out / "tmp" / "matmul_ceiling.json").read_text())
    run = res["runs"]["tiny/prompt_heavy"]
    assert run["matmul_over_formula"] == pytest.approx(1.0, rel=1e-9)  # every matmul recorded, each once
    assert run["capture"]["suspect_ops"] == {}  # no matmul-like op outside the recorded ones
    assert {c["dtypes"][0] for c in run["capture"]["calls"]} == {"torch.float32"}
    groups = {(g["group"], g["phase"]) for g in run["groups"]}
    assert {("LM head", "forward"), ("MLP", "weight grad"), ("attention kernel", "backward")} <= groups
    assert sum(g["flop_share"] for g in run["groups"]) == pytest.approx(1.0)
    assert 0 < run["ceiling_cpu"] and 0 < run["mfu_cpu_time"]
    assert "_fused_adamw_" in run["capture"]["op_cpu_s"] and run["other_ops_share_cpu"] > 0
    assert run["capture"]["losses"][0] == pytest.approx(0.6931, abs=1e-3)  # log 2: policy = reference
    assert "ceiling: wall / CPU" in (out / "tmp" / "matmul_ceiling.md").read_text()
