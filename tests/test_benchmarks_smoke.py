"""Every benchmark script runs, at toy sizes, and writes its results to a temp folder only.

Timings at these sizes mean nothing; what is checked is that each script's code path works end to
end and that the numbers it reports hold their invariants (the first DPO loss is log 2 when policy
and reference start equal, the executed-FLOP count matches the formula). Scripts whose comparison
side needs TRL run their preftune side here; the TRL side runs only where `import trl` works (the
benchmark environment, benchmarks/setup_bench_env.sh). Scripts that start several child processes
per run (the 5-method reference-cache sweep, the 2-process FSDP launch) are `slow`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import runpy
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))
import bench_utils as bu  # noqa: E402
import flops  # noqa: E402

HAS_TRL = importlib.util.find_spec("trl") is not None
NO_TRL = "TRL is not installed here (run benchmarks/setup_bench_env.sh for the comparison side)"


def _tracked_results() -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((BENCH / "results").glob("*"))
        if p.is_file()
    }


@pytest.fixture
def results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Results go to a temp folder (this process and its children); the tracked files stay as they are."""
    before = _tracked_results()
    out = tmp_path / "results"
    monkeypatch.setenv("PREFTUNE_BENCH_RESULTS", str(out))
    monkeypatch.setattr(bu, "RESULTS_DIR", out)
    yield out
    assert _tracked_results() == before


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _in_process(script: str, *args: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", [script, *args])
    try:
        runpy.run_path(str(BENCH / script), run_name="__main__")
    except SystemExit as stop:
        assert stop.code in (0, None)


def test_child_env_waits_passively(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    env = bu.child_env(OMP_NUM_THREADS="1")
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # an explicit choice of the caller wins
    assert bu.child_env()["OMP_WAIT_POLICY"] == "ACTIVE"


def test_executed_flops_by_hand() -> None:
    spec = bu.ModelSpec(
        vocab_size=100, hidden_size=8, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=16
    )
    # body per layer: q,o 2·64 + k,v 2·8·4 + MLP 3·8·16 = 128 + 64 + 384 = 576; 2 layers: 1152
    assert flops.forward_flops(spec, 10, 3) == 2 * 1152 * 10 + 4 * 8 * 100 * 2 + 2 * 100 * 8 * 3
    pairs = [(5, 2, 3)]
    # preftune: one packed row of 10 tokens, 5 scored; trained (3×) + online reference (1×);
    # attention segment by segment: prompt 5·6/2 = 15 cells, responses 2·(5+2) + 3·(5+3) = 38 → 53
    segments = 2 * 1152 * 10 + 4 * 8 * 53 * 2 + 2 * 100 * 8 * 5
    assert flops.preftune_step(spec, pairs, online_reference=True) == 4 * segments
    # the dense tree mask (preftune_base with tree off): the row's whole 10 × 10 square
    dense = flops.preftune_step(spec, pairs, online_reference=True, tree=False)
    assert dense == 4 * flops.forward_flops(spec, 10, 5)
    # TRL: two rows of 5 + 3 = 8; on CPU every position but the last is scored, on GPU the completion
    cpu = flops.trl_step(spec, pairs, micro_pairs=1, online_reference=False, response_only=False)
    gpu = flops.trl_step(spec, pairs, micro_pairs=1, online_reference=False, response_only=True)
    assert cpu == 3 * 2 * flops.forward_flops(spec, 8, 7)
    assert gpu == 3 * (flops.forward_flops(spec, 8, 2) + flops.forward_flops(spec, 8, 3))
    # preftune one pair per forward: rows of 10 and 6 tokens, no padding; together (one micro-batch)
    # both rows are padded to 10: the 4 padding positions run through the body
    two = [(5, 2, 3), (2, 1, 3)]
    one_each = flops.preftune_step(spec, two[:1], online_reference=False)
    one_each += flops.preftune_step(spec, two[1:], online_reference=False)
    assert flops.preftune_step(spec, two, online_reference=False, micro_pairs=1) == one_each
    together = flops.preftune_step(spec, two, online_reference=False)
    assert together - one_each == 3 * 2 * 1152 * 4


def test_profile_step_namespace_has_every_child_field() -> None:
    import dpo_children

    ns = dpo_children.child_namespace(model="m", data="d")
    assert (ns.optimizer, ns.trl_variant, ns.batch) == ("unfused", "best", 2)
    assert dpo_children.trl_settings(ns)["optim"] == "adamw_torch_fused"
    plain = dpo_children.trl_settings(dpo_children.child_namespace(trl_variant="plain"))
    assert plain["precompute_ref_log_probs"] is False and plain["torch_compile"] is False
    with pytest.raises(TypeError, match="unknown child fields"):
        dpo_children.child_namespace(optimiser="fused")


def test_dpo_vs_trl_smoke_preftune_side(results: Path) -> None:
    _check_dpo_vs_trl(results, "preftune,preftune_base", "best")
    res = json.loads((results / "tmp" / "dpo_vs_trl_smoke.json").read_text())
    assert (
        res["base_levers_off"] == "keep,tree,lean,fill,direct,trim,finite,grads,lse"
    )  # the levers change the speed, not the losses:
    assert res["shapes"]["prompt_heavy"]["ratios"]["preftune_base"]["max_abs_loss_diff"] < 1e-5


def test_levers_off_sets_the_head_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    import dpo_children
    import preftune.models.logprobs as lp

    for name in ("_KEEP_WEIGHT_COPIES", "_CHUNK_ELEMENTS", "_TREE_ATTENTION"):
        monkeypatch.setattr(lp, name, getattr(lp, name))  # restored after the test
    dpo_children.levers_off("keep=1.5,chunk=64")
    assert (lp._KEEP_WEIGHT_COPIES, lp._CHUNK_ELEMENTS, lp._TREE_ATTENTION) == (1.5, 64 * 32000, True)
    assert dpo_children.levers_off("keep,tree") == {}
    assert (lp._KEEP_WEIGHT_COPIES, lp._TREE_ATTENTION) == (0.0, False)
    assert dpo_children.levers_off("micro=2") == {"micro_batch_size": 2}  # pairs per forward
    import preftune.models.direct_grads as dg

    monkeypatch.setattr(dg, "_DIRECT_GRADS", True)
    assert dpo_children.levers_off("direct") == {} and dg._DIRECT_GRADS is False
    import preftune.train.allocator as al

    monkeypatch.setattr(al, "release_free_heap", al.release_free_heap)
    assert dpo_children.levers_off("trim") == {} and al.release_free_heap() is False
    import preftune.train.guards as guards
    import preftune.train.run as run

    monkeypatch.setattr(guards, "_EXTREMES_ON_CPU", True)
    monkeypatch.setattr(run, "_KEEP_ACCUMULATED_GRADS", True)
    assert dpo_children.levers_off("finite,grads") == {}
    assert guards._EXTREMES_ON_CPU is False and run._KEEP_ACCUMULATED_GRADS is False
    import preftune.models.head_logps as hl

    monkeypatch.setattr(hl, "_LSE_IN_PLACE", True)
    assert dpo_children.levers_off("lse") == {} and hl._LSE_IN_PLACE is False
    with pytest.raises(ValueError, match="chunk=N"):
        dpo_children.levers_off("tree=1")


@pytest.mark.skipif(not HAS_TRL, reason=NO_TRL)
def test_dpo_vs_trl_smoke_trl_sides(results: Path) -> None:
    _check_dpo_vs_trl(results, "trl,trl_gpu,preftune", "plain")


def _check_dpo_vs_trl(results: Path, sides: str, variant: str) -> None:
    _run("dpo_vs_trl.py", "--smoke", "--sides", sides, "--trl-variant", variant)
    res = json.loads((results / "tmp" / "dpo_vs_trl_smoke.json").read_text())  # quick-like: tmp/
    shape = res["shapes"]["prompt_heavy"]
    for side, losses in shape["first_losses"].items():
        assert losses[0] == pytest.approx(math.log(2), abs=1e-4), side  # policy == reference at step 1
    assert res["machine"]["omp_wait_policy"] == "PASSIVE"
    assert shape["runs"]["preftune"][0]["load_average"][0][0] >= 0
    assert "MFU (executed)" in (results / "tmp" / "dpo_vs_trl_smoke.md").read_text()
    assert "MFU (CPU time)" in (results / "tmp" / "dpo_vs_trl_smoke.md").read_text()
    assert 0 < res["matmul_peak_cpu_flops"] and 0 < res["matmul_peak_flops"]


def test_grpo_vs_trl_smoke_preftune_side(results: Path) -> None:
    _check_grpo_vs_trl(results, "preftune")


@pytest.mark.skipif(not HAS_TRL, reason=NO_TRL)
def test_grpo_vs_trl_smoke_both_sides(results: Path) -> None:
    last = _check_grpo_vs_trl(results, "trl,trl_gpu,preftune")
    assert last["speedup"] > 0 and last["memory_ratio"] > 0 and last["speedup_gpu_path"] > 0


@pytest.mark.skipif(not HAS_TRL, reason=NO_TRL)
def test_grpo_vs_trl_sides_share_the_settings(tmp_path: Path) -> None:
    """The TRL child's GRPOConfig and the preftune child's TrainConfig agree on every setting that
    changes the work of a step. GRPOConfig turns gradient checkpointing on by default (a recomputed
    forward in every backward); preftune's side recomputes nothing, so TRL's must not either."""
    import argparse

    import grpo_children

    (tmp_path / "p.jsonl").write_text('{"prompt": "w4 w5"}\n')
    a = argparse.Namespace(
        model="m",
        prompts=str(tmp_path / "p.jsonl"),
        steps=3,
        lr=1e-6,
        generations=8,
        max_completion=64,
        seed=0,
    )
    trl = grpo_children._trl_config(a, 16, str(tmp_path / "trl"))
    ours = grpo_children._preftune_config(a, 16, tmp_path / "run")
    assert trl.gradient_checkpointing is False and ours.gradient_checkpointing is False
    assert (trl.per_device_train_batch_size, trl.num_generations) == (
        ours.batch_size * 8,
        ours.num_generations,
    )
    assert trl.gradient_accumulation_steps == 1 and ours.micro_batch_size == ours.batch_size
    pairs = [("max_completion_length",) * 2, ("temperature",) * 2, ("top_p",) * 2, ("top_k",) * 2,
             ("num_iterations",) * 2, ("learning_rate", "lr"), ("weight_decay",) * 2,
             ("max_grad_norm",) * 2, ("max_steps",) * 2, ("seed",) * 2]  # fmt: skip
    for t, o in pairs:
        assert getattr(trl, t) == getattr(ours, o), (t, getattr(trl, t), getattr(ours, o))
    assert (trl.beta, trl.loss_type, trl.bf16) == (0.0, "dapo", False) and ours.dtype == "float32"


def _check_grpo_vs_trl(results: Path, sides: str) -> dict[str, Any]:
    out = _run("grpo_vs_trl.py", "--smoke", "--sides", sides)
    last = json.loads(out.strip().splitlines()[-1])  # the --quick/--smoke headline
    assert {"speedup", "speedup_short", "memory_ratio"} <= set(last)
    res = json.loads((results / "tmp" / "grpo_vs_trl_smoke.json").read_text())  # quick-like: tmp/
    shape = res["shapes"]["prompt_heavy"]
    for side, m in shape["median"].items():
        # step 1 is on-policy (ρ = 1): the token mean of −A, with GRPO's advantages summing to 0 in
        # every group and (nearly) equal lengths, is 0 up to rounding on both sides
        assert abs(m["first_loss"]) < 1e-4, side
        assert 0 < m["completion_length"] <= shape["max_completion_length"], side
        assert m["completions_s"] > 0 and m["generate_s"] > 0 and m["rest_s"] > 0, side
    assert "completion tokens/s" in (results / "tmp" / "grpo_vs_trl_smoke.md").read_text()
    return dict(last)


def test_profile_step_smoke(results: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _in_process(
        "profile_step.py",
        *("--side", "preftune", "--model-size", "tiny", "--scale", "0.05", "--steps", "2", "--top", "3"),
        monkeypatch=monkeypatch,
    )
    text = (results / "profile_preftune_balanced.txt").read_text()
    assert "self-CPU share: matmul" in text and "load average" in text


@pytest.mark.skipif(not HAS_TRL, reason=NO_TRL)
def test_profile_step_trl_smoke(results: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = (
        "--side",
        "trl",
        "--trl-variant",
        "plain",
        "--model-size",
        "tiny",
        "--scale",
        "0.05",
        "--steps",
        "2",
    )
    _in_process("profile_step.py", *args, monkeypatch=monkeypatch)
    assert (results / "profile_trl_balanced.txt").exists()


def test_optimizer_step_smoke(results: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _in_process("optimizer_step.py", "--model-size", "tiny", "--reps", "1", monkeypatch=monkeypatch)
    res = json.loads((results / "optimizer_step.json").read_text())
    assert res["update_max_diff"] < 1e-6  # fused and foreach take the same step


def test_prefix_sharing_smoke(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    args = ("--pairs", "2", "--prompt-len", "16", "--response-len", "8", "--hidden", "32", "--layers", "1")
    _in_process("prefix_sharing.py", *args, "--vocab", "1000", "--reps", "1", monkeypatch=monkeypatch)
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["shared"]["row_slots"] < res["padded"]["row_slots"]  # the prompt once per pair, not twice


def test_rollout_prefill_smoke(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    args = ("--quick", "--model-size", "tiny", "--prompts", "2", "--samples", "2", "--prompt-len", "10")
    _in_process("rollout_prefill.py", *args, monkeypatch=monkeypatch)
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["same_tokens"] is True and res["new_tokens"] == 16


def test_rollout_kv_smoke(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import preftune.generation as generation

    args = ("--quick", "--model-size", "tiny", "--prompts", "2", "--samples", "2", "--prompt-len", "10")
    _in_process("rollout_kv.py", *args, monkeypatch=monkeypatch)
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["same_tokens_and_logps"] is True and res["new_tokens"] == 16 and res["reps"] == 1
    assert generation._RESERVE_KV is True  # the lever is restored for whatever runs next


def test_tokenize_speed_smoke(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _in_process("tokenize_speed.py", "--rows", "50", "--tokens-per-pair", "30", monkeypatch=monkeypatch)
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["rows"] == 50


SCALING = ["--model-size", "tiny", "--ks", "2", "--k-prompt", "8", "--response", "4", "--steps", "2"]


def test_scaling_smoke_k_sweep(results: Path) -> None:
    _run("scaling.py", "--sweep", "k", *SCALING)
    res = json.loads((results / "scaling_k.json").read_text())
    assert [p["k"] for p in res["k"]] == [2]


@pytest.mark.skipif(not HAS_TRL, reason=NO_TRL)
def test_scaling_smoke_prompt_sweep(results: Path) -> None:
    _run("scaling.py", "--sweep", "prompt", "--prompts", "8", *SCALING)
    res = json.loads((results / "scaling_prompt.json").read_text())
    assert [p["prompt"] for p in res["prompt"]] == [8]


@pytest.mark.slow
def test_ref_cache_smoke(results: Path) -> None:
    _run(
        "ref_cache.py",
        "--model-size",
        "tiny",
        "--scale",
        "0.05",
        "--pairs",
        "2",
        "--batch",
        "2",
        "--steps",
        "1",
    )
    res = json.loads((results / "ref_cache.json").read_text())
    assert set(res["runs"]) == {"sweep_cache", "independent_model", "independent_cache"}


@pytest.mark.slow
def test_fsdp_memory_smoke(results: Path) -> None:
    _run(
        "fsdp_memory.py",
        "--model-size",
        "tiny",
        "--steps",
        "2",
        "--batch",
        "4",
        "--micro",
        "2",
        "--pairs",
        "4",
    )
    res = json.loads((results / "fsdp_memory.json").read_text())
    assert set(res["median"]) == {"ddp", "fsdp"}


def test_head_logps_smoke(results: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = ("--tokens", "40", "--hidden", "16", "--vocab", "300", "--reps", "1")
    _in_process("head_logps.py", *args, monkeypatch=monkeypatch)
    res = json.loads((results / "head_logps.json").read_text())
    assert res["max_abs_diff"] < 1e-5  # same values and gradients on both paths


def test_prompt_groups_smoke(results: Path) -> None:
    args = ("--model-size", "tiny", "--ks", "3", "--prompts", "2", "--prompt", "8", "--response", "3")
    out = _run("prompt_groups.py", *args, "--steps", "2", "--reps", "1")
    res = json.loads(out.strip().splitlines()[-1])
    # policy == reference at the first step: the DPO loss is log 2 in both variants
    assert res["first_losses"] == pytest.approx([math.log(2)] * 2, abs=1e-4)
    assert (
        json.loads((results / "tmp" / "prompt_groups.json").read_text())["points"][0]["pairs_per_step"] == 3
    )


def test_diffusion_dpo_step_summary_by_hand() -> None:
    import diffusion_dpo_vs_diffusers as dd

    a = dd.parse(["--quick", "--batch", "4", "--warmup", "1", "--script", ""])
    # 5 optimizer steps at t = 10, 11, 13, 14, 18 s (CPU 1, 2, 3, 5, 6); start at t = 4 s
    stamps = [[10.0, 1.0], [11.0, 2.0], [13.0, 3.0], [14.0, 5.0], [18.0, 6.0]]
    phases = [{"unet_forward": 0.5}] * 2 + [{"unet_forward": 0.5, "vae_encode": 0.25}] * 3
    res = {"side": "script", "stamps": stamps, "train_start": [4.0, 0.0], "wall_s": 20.0, "peak_rss_mb": 9.0,
           "losses": [0.5], "phases": phases, "load_average": [1.0, 1.0, 1.0], "rss_after_imports_mb": 5.0}  # fmt: skip
    s = dd.step_summary(res, a)
    # intervals after the warm-up step: 2, 1, 4 s (median 2); CPU 1, 2, 1 (median 1)
    assert s["step_s"] == 2.0 and s["cpu_step_s"] == 1.0 and s["pairs_per_s"] == 2.0
    assert s["to_first_step_s"] == 6.0
    phases = {"vae_encode": 0.25, "text_encode": 0.0, "unet_forward": 0.5, "rest": 1.25}
    phases |= {"vae_encode_cpu": 0.0, "text_encode_cpu": 0.0, "unet_forward_cpu": 0.0, "rest_cpu": 1.0}
    assert s["phases_s"] == phases


@pytest.mark.slow
def test_diffusion_dpo_vs_diffusers_smoke_preftune_side(
    results: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PREFTUNE_DIFFUSERS_DPO_SCRIPT", raising=False)
    _run("diffusion_dpo_vs_diffusers.py", "--quick", "--steps", "3", "--warmup", "1", "--rates")
    res = json.loads((results / "tmp" / "diffusion_dpo_vs_diffusers.json").read_text())
    cold, warm = res["runs"]["preftune_cold"][0], res["runs"]["preftune_warm"][0]
    rates = res["rates"]
    assert rates["vae_encode"]["gflop_per_cpu_s"] > 0 and rates["unet_forward"]["cpu_s"] > 0
    assert 0 < sum(share for _, share, _ in rates["unet_top_ops"]) <= 1.0 + 1e-6
    assert set(res["runs"]) == {"preftune_cold", "preftune_warm"}  # the second run found the cache
    # LoRA's B starts at 0: policy = reference, so the first DPO loss is log 2 exactly
    assert cold["first_loss"] == pytest.approx(math.log(2), abs=1e-6)
    # the cached latents and embeddings are the ones the cold run encoded: the same losses, step by step
    assert warm["losses"] == pytest.approx(cold["losses"], rel=1e-6) and len(cold["losses"]) == 3
    assert cold["pairs_per_s"] > 0 and warm["peak_rss_mb"] > 0


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("PREFTUNE_DIFFUSERS_DPO_SCRIPT"),
    reason="set PREFTUNE_DIFFUSERS_DPO_SCRIPT to diffusers' train_diffusion_dpo.py (run from .bench-venv)",
)
def test_diffusion_dpo_vs_diffusers_first_step_equal(results: Path) -> None:
    _run("diffusion_dpo_vs_diffusers.py", "--quick")
    res = json.loads((results / "tmp" / "diffusion_dpo_vs_diffusers.json").read_text())
    check, script = res["first_step_check"], res["first_step_check"]["script_first_logs"]
    for key in ("loss", "raw_model_loss", "ref_loss"):
        assert check[key] == pytest.approx(script[key], rel=1e-5), key
    assert max(check["latent_gap_winners"], check["latent_gap_losers"], check["text_gap"]) < 1e-5


def test_verifier_trunk_quick(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from preftune.tasks.arithmetic import ArithmeticTask
    from preftune.tasks.quickstart import evaluate_accuracy

    _in_process("verifier_trunk.py", "--quick", "--out", str(tmp_path / "trunk"), monkeypatch=monkeypatch)
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # 4 steps cannot reach the 95 % target: every step runs, checked at steps 2 and 4
    assert res["steps"] == 4 and [step for step, _ in res["checks"]] == [2, 4]
    assert res["heldout_prompts"] == 8 and res["cpu_s"] > 0
    # the reported held-out accuracy is that of the saved folder on the first 8 held-out prompts
    held = [p.prompt for p in ArithmeticTask(level=2).problems(1000, seed=777)][:8]
    assert res["heldout_greedy"] == evaluate_accuracy(tmp_path / "trunk", ArithmeticTask(level=2), held)


def test_rm_best_of_n_flipped_swaps_a_seeded_fraction() -> None:
    import rm_best_of_n

    pairs = [{"prompt": str(i), "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(20)]
    out = rm_best_of_n.flipped(pairs, 0.25, seed=3)
    swapped = [r for r in out if r["chosen"].startswith("r")]
    assert len(swapped) == 5 and all(r["rejected"] == "c" + r["prompt"] for r in swapped)
    assert out == rm_best_of_n.flipped(pairs, 0.25, seed=3) and pairs[0]["chosen"] == "c0"  # input kept


def test_rm_best_of_n_training_prompts_avoid_every_held_out_prompt() -> None:
    import rm_best_of_n
    from preftune.tasks.arithmetic import ArithmeticTask

    held, train = rm_best_of_n.prompt_sets(400)
    assert held == [p.prompt for p in ArithmeticTask(level=2).problems(1000, seed=777)]
    # all 1000 avoided, not only the `--held-prompts` scored: the training prompts (and the cached
    # samples of WORK/train400.json) are the same whatever --held-prompts says
    assert len(train) == 400 and not set(train) & set(held)


@pytest.mark.parametrize("head", ["scalar", "implicit"])
def test_rm_best_of_n_quick_ensemble(
    head: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ("--quick", "--work", str(tmp_path), "--ensemble", "2", "--flip", "0.25", "--head", head)
    _in_process("rm_best_of_n.py", *args, monkeypatch=monkeypatch)
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    members = [tmp_path / res["run"] / f"member-{i}" / "final" / "implicit.json" for i in range(2)]
    assert [m.is_file() for m in members] == [head == "implicit"] * 2  # members of the asked head
    assert res["held_prompts"] == 8 and 0 < res["train_pairs"] <= 8 * 3 and 0 < res["held_pairs"] <= 8 * 2
    curves = res["best_of_n"]
    assert set(curves) == {"member0", "member1", "mean", "min", "uwo", "median", "paired"}
    for name in ("member0", "member1", "mean", "min", "uwo", "median"):
        c = curves[name]
        # each prompt's 4 samples: the reference solution first, then 3 wrong ones of the 10-step
        # policy: the oracle finds the one right sample in half the pairs and in every group of 4
        assert c["n"] == [1.0, 2.0, 4.0] and c["oracle"] == [0.25, 0.5, 1.0], name
        assert c["rm"][0] == 0.25 and c["se"][0] == 0.0, name  # n = 1: no choice, no spread
        assert all(r <= o for r, o in zip(c["rm"], c["oracle"])), name
    for how, d in curves["paired"].items():  # paired differences at n = 4 agree with the curves
        assert d["vs_member0"][0] == pytest.approx(curves[how]["rm"][-1] - curves["member0"]["rm"][-1])
        members = (curves["member0"]["rm"][-1] + curves["member1"]["rm"][-1]) / 2
        assert d["vs_members_mean"][0] == pytest.approx(curves[how]["rm"][-1] - members, abs=1e-4)


def test_prm_processbench_quick(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _in_process("prm_processbench.py", "--quick", "--work", str(tmp_path), monkeypatch=monkeypatch)
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    test = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert len(test) == res["items"] == 12
    # every third item (0, 3, 6, 9) is the dev split that picks τ; the other 8 are scored
    assert res["erroneous"] + res["correct"] == 8
    assert res["erroneous"] == sum(r["label"] >= 0 for i, r in enumerate(test) if i % 3)
    a, c = res["acc_err"], res["acc_corr"]
    assert res["f1"] == pytest.approx(2 * a * c / (a + c) if a + c else 0.0)
    assert 0 < res["threshold"] < 1  # a midpoint between σ step values
    # error kinds cover every erroneous item, dev split included; flagged ≤ items of each kind
    assert sum(n for _, n in res["flagged"].values()) == sum(r["label"] >= 0 for r in test)
    assert all(0 <= hit <= n for hit, n in res["flagged"].values())
    assert [step for step, _ in res["valid_f1"]] == [1, 2]  # a validation after each of the 2 steps


def test_rm_grpo_quick(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    _in_process("rm_grpo.py", "--quick", "--work", str(tmp_path), monkeypatch=monkeypatch)
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["heldout_prompts"] == 8 and res["grpo_steps"] == 2 and res["rm_train_pairs"] > 0
    # the per-prompt greedy check agrees with the quickstart's own greedy accuracy of the SFT model
    assert res["greedy_before"] == res["prepare_greedy"]
    assert res["gain"] == pytest.approx(res["greedy_after"] - res["greedy_before"])
    assert res["prompts_gained"] - res["prompts_lost"] == round(res["gain"] * 8)
    # GRPO's reward was the trained RM folder, and its logged rewards are RM scores, not 0/1 verdicts
    config = yaml.safe_load((tmp_path / "grpo-rm" / "config.yaml").read_text())
    assert config["reward"] == str(tmp_path / "rm-s2-lr0.0003" / "final")
    rows = [json.loads(x) for x in (tmp_path / "grpo-rm" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("reward") not in (None, 0.0, 0.5, 1.0) for r in rows)
    # the KL term and the curve: the same SFT model and RM (reused from WORK), a checkpoint per step
    _in_process("rm_grpo.py", "--quick", "--work", str(tmp_path), "--kl", "0.1", "--eval-every", "1",
                monkeypatch=monkeypatch)  # fmt: skip
    kl = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert kl["run"] == "grpo-rm-kl0.1" and kl["rm_train_pairs"] == res["rm_train_pairs"]
    assert kl["greedy_before"] == res["greedy_before"]
    config = yaml.safe_load((tmp_path / "grpo-rm-kl0.1" / "config.yaml").read_text())
    assert config["objective"] == "ppo_clip:1,kl:0.1"
    assert [p["step"] for p in kl["curve"]] == [0, 1, 2]
    # step 0 is the SFT model; the last checkpoint holds the final weights
    assert kl["curve"][0]["greedy"] == kl["greedy_before"] and kl["curve"][-1]["greedy"] == kl["greedy_after"]
    rows = [json.loads(x) for x in (tmp_path / "grpo-rm-kl0.1" / "metrics.jsonl").read_text().splitlines()]
    logged = [r["reward"] for r in rows if "reward" in r]
    assert [p["reward"] for p in kl["curve"][1:]] == pytest.approx(logged, abs=1e-4)


def test_rm_grpo_quick_given_rm_and_prm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--rm FOLDER` rewards GRPO with an RM trained elsewhere; `--reward prm --prm FOLDER` with a PRM's
    step values (here an implicit RM's q_θ at step ends, aggregated by min)."""
    import yaml

    _in_process(
        "rm_grpo.py", "--quick", "--work", str(tmp_path), "--head", "implicit", monkeypatch=monkeypatch
    )
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    folder = tmp_path / "rm-s2-lr0.0003-implicit0.05" / "final"
    given = ["--rm", str(folder)], "grpo-rm-rm-s2-lr0.0003-implicit0.05", str(folder)
    as_prm = (
        ["--reward", "prm", "--prm", str(folder)],
        "grpo-prm-min-rm-s2-lr0.0003-implicit0.05",
        f"prm:min:{folder}",
    )
    for extra, run, reward in (given, as_prm):
        _in_process("rm_grpo.py", "--quick", "--work", str(tmp_path), *extra, monkeypatch=monkeypatch)
        res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert res["run"] == run and res["rm_train_pairs"] == 0 and res["grpo_steps"] == 2
        assert res["greedy_before"] == trained["greedy_before"]  # the same SFT model, reused from WORK
        assert yaml.safe_load((tmp_path / run / "config.yaml").read_text())["reward"] == reward
        rows = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        assert any(r.get("reward") not in (None, 0.0, 0.5, 1.0) for r in rows)  # model scores, not verdicts
    monkeypatch.setattr(sys, "argv", ["rm_grpo.py", "--quick", "--work", str(tmp_path), "--reward", "prm"])
    with pytest.raises(SystemExit) as stop:  # --reward prm without --prm: a usage error, nothing run
        runpy.run_path(str(BENCH / "rm_grpo.py"), run_name="__main__")
    assert stop.value.code == 2 and "--prm FOLDER" in capsys.readouterr().err


@pytest.mark.parametrize("in_thread", [False, True])
def test_memory_timeline_smoke(results: Path, in_thread: bool) -> None:
    out = _run("memory_timeline.py", "--smoke", *(["--in-thread"] if in_thread else []))
    rows = [ln for ln in out.splitlines() if ln.startswith("| ") and not ln.startswith("| from")]
    assert rows, out
    first = float(rows[0].split("|")[2])  # | from s | MiB before | MiB after | rise | charged to |
    last = float(rows[-1].split("|")[3])
    rises = sum(float(r.split("|")[4].strip().lstrip("+")) for r in rows)
    assert rises == pytest.approx(last - first, abs=len(rows))  # the rises add up to the high-water mark
    assert (results / "tmp" / f"memory_timeline_balanced_tiny{'_inthread' if in_thread else ''}.md").exists()


def test_memory_floor_smoke(results: Path) -> None:
    """The floor child holds a gradient per weight and AdamW's two moments when it reads the floor,
    and the stages' resident sets are read in order (imports first, the floor last)."""
    _run("memory_floor.py", "--smoke")
    data = json.loads((results / "tmp" / "memory_floor.json").read_text())
    tiny = data["sizes"]["tiny"]
    assert tiny["moment_elements"] == 2 * tiny["params"]
    stages = [
        tiny[s] for s in ("imports", "tokenizer_and_model", "weights_read", "gradients", "adamw_moments")
    ]
    assert stages[0] > 100 and stages[-1] >= stages[0]  # torch alone is ~300 MiB resident
    assert "| tiny |" in (results / "tmp" / "memory_floor.md").read_text()
