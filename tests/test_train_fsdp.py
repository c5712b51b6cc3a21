"""FSDP2 (`fsdp: true`) under `torchrun --nproc_per_node 2` on CPU (gloo): the same run as one unsharded
process with the same global batch, with uneven per-rank shares (padding forwards), an exact resume
from a sharded checkpoint, and a final folder `from_pretrained` loads. Slow: it starts interpreters."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preftune.cli import main
from preftune.config import TrainConfig
from preftune.train.distributed import World
from preftune.train.loop import padding_forwards
from test_train_distributed import run_torchrun
from test_train_fixtures import pair_rows, tiny_model, write_jsonl


def test_padding_forwards_evens_out_the_ranks() -> None:
    two = World(rank=1, size=2, fsdp=True)
    # 7 examples over 2 ranks: rank 0 has 4, rank 1 has 3; micro-batches of 3 → 2 vs 1 forwards.
    assert padding_forwards(7, own_groups=1, micro_batch_size=3, world=two) == 1
    assert padding_forwards(7, own_groups=2, micro_batch_size=3, world=World(size=2, fsdp=True)) == 0
    # 1 example over 2 ranks: the empty rank still runs one forward.
    assert padding_forwards(1, own_groups=0, micro_batch_size=4, world=two) == 1
    # data parallel needs none: its only collective is the gradient all-reduce after the step
    assert padding_forwards(7, own_groups=1, micro_batch_size=3, world=World(rank=1, size=2)) == 0


def one_and_sharded(tmp_path: Path, args: list[str]) -> tuple[Path, Path]:
    """`preftune ARGS` in this process (OUT one/) and under torchrun with --fsdp (OUT two/), each with
    its own reference cache; returns the two run folders."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*args, "--out", str(one), "--cache-dir", str(tmp_path / "c1")]) == 0
    proc = run_torchrun([*args, "--fsdp", "--out", str(two), "--cache-dir", str(tmp_path / "c2")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return one, two


def resume_sharded(tmp_path: Path, args: list[str], checkpoint: Path) -> Path:
    """Copy `checkpoint` aside (so the run that wrote it cannot touch it), resume from it under torchrun
    with --fsdp into a fresh folder, and return that folder."""
    saved = tmp_path / f"saved-{checkpoint.name}"
    shutil.copytree(checkpoint, saved)
    again = tmp_path / "again"
    proc = run_torchrun(
        [*args, "--fsdp", "--out", str(again), "--cache-dir", str(tmp_path / "c2"), "--resume", str(saved)]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return again


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2's tiny config ties the head to the embeddings
def test_fsdp_two_processes_equal_one_and_resume(tmp_path: Path, arch: str) -> None:
    model = tiny_model(tmp_path / "model", arch=arch)
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(21))
    evals = write_jsonl(tmp_path / "eval.jsonl", pair_rows(7, seed=1))  # evaluation pads like training
    args = [
        "train",
        "dpo:1.0,sft:0.3",
        "--model",
        str(model),
        "--data",
        str(data),
        "--eval-data",
        str(evals),
        "--batch-size",
        "7",  # 4 + 3 per rank: with micro-batches of 3, rank 1 pads one forward
        "--micro-batch-size",
        "3",
        "--max-steps",
        "4",
        "--lr",
        "3e-3",
        "--no-progress",
        "--save-every",
        "2",
    ]
    one, two = one_and_sharded(tmp_path, args)

    w1 = load_file(str(one / "final" / "model.safetensors"))
    w2 = load_file(str(two / "final" / "model.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=2e-5, rtol=1e-4)
    m1 = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["split"]) for m in m1] == [(m["step"], m["split"]) for m in m2]
    for a, b in zip(m1, m2):
        for key in ("loss", "rewards/margin", "logps/chosen", "grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    # the sharded checkpoint holds whole tensors in the unsharded layout
    ck1, ck2 = (load_file(str(d / "checkpoints" / "step-2" / "model.safetensors")) for d in (one, two))
    assert ck1.keys() == ck2.keys()

    # resume the sharded run from step 2 into a fresh folder: same final weights
    again = resume_sharded(tmp_path, args, two / "checkpoints" / "step-2")
    w3 = load_file(str(again / "final" / "model.safetensors"))
    for k in w2:
        torch.testing.assert_close(w3[k], w2[k], atol=1e-6, rtol=0)

    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(two / "final"))
    ref = AutoModelForCausalLM.from_pretrained(str(one / "final"))
    for (n, p), (_, q) in zip(loaded.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, atol=2e-5, rtol=1e-4, msg=n)


@pytest.mark.slow
def test_fsdp_rounds_reference_pass_on_the_sharded_policy(tmp_path: Path) -> None:
    """Round 2's reference is the policy after round 1: its reference pass and cache fingerprint run on
    the sharded model (gathered weights), and the run still equals one unsharded process."""
    model = tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(9))
    args = ["train", "dpo", "--model", str(model), "--data", str(data), "--batch-size", "3"]
    args += ["--rounds", "2", "--epochs", "1", "--lr", "3e-3", "--no-progress"]
    one, two = one_and_sharded(tmp_path, args)
    w1 = load_file(str(one / "final" / "model.safetensors"))
    w2 = load_file(str(two / "final" / "model.safetensors"))
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=2e-5, rtol=1e-4)
    # round 1's reference pass ran on the sharded initial weights under the unsharded fingerprint (the
    # cache is shared); round 2's on the sharded policy after round 1 (float-level different weights
    # from the one-process run, so its own entry)
    from preftune.models.load import load_causal_lm
    from preftune.models.reference import model_fingerprint

    initial = model_fingerprint(load_causal_lm(str(model)))
    names = [sorted(p.name for p in (c / "reference").iterdir()) for c in (tmp_path / "c1", tmp_path / "c2")]
    assert initial in names[0] and initial in names[1]
    assert len(names[0]) == len(names[1]) == 2


def test_resume_refuses_a_checkpoint_written_the_other_way(tmp_path: Path) -> None:
    """A sharded run stores its optimizer state by parameter name, an unsharded one per tensor index:
    resuming one as the other must fail with the way out, before any weights load."""
    from preftune.errors import TrainingError
    from preftune.train.api import train
    from preftune.train.integrity import write_checksums

    model = tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(4))
    config = TrainConfig(
        method="dpo", model=str(model), data=str(data), out=str(tmp_path / "run"), max_steps=1,
        batch_size=2, progress=False, cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    train(config)
    state_file = tmp_path / "run" / "checkpoints" / "step-1" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["fsdp"] is False
    state_file.write_text(json.dumps({**state, "fsdp": True}))
    write_checksums(state_file.parent)  # an edit the checksums agree with: the layout check must catch it
    again = TrainConfig(**{**config.__dict__, "resume": "latest"})
    with pytest.raises(TrainingError, match="written by a sharded run.*fsdp=true under torchrun"):
        train(again)


@pytest.mark.slow
def test_fsdp_bf16_mixed_precision_tracks_one_process(tmp_path: Path) -> None:
    """MixedPrecisionPolicy (bf16 gather and compute, float32 shards and reduction) against one process
    under torch.autocast: the casts happen at other points, so the runs agree to bf16 rounding, not
    bit for bit. Measured: losses within 2e-4; the reference pass on the sharded bf16 policy gives
    step 1 a loss of exactly log 2."""
    import math

    model = tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(12))
    args = ["train", "dpo", "--model", str(model), "--data", str(data), "--batch-size", "4"]
    args += ["--max-steps", "4", "--lr", "3e-3", "--no-progress", "--mixed-precision", "bf16"]
    one, two = one_and_sharded(tmp_path, args)
    m1 = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert m2[0]["loss"] == pytest.approx(math.log(2), abs=5e-6)
    for a, b in zip(m1, m2):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-3)
    weights = load_file(str(two / "final" / "model.safetensors"))
    assert {str(t.dtype) for t in weights.values()} == {"torch.float32"}


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["cache", "adapter"])
def test_fsdp_lora_equals_one_process_and_resumes(tmp_path: Path, reference: str) -> None:
    """LoRA under FSDP: the frozen base is sharded with the adapters; the reference is the base alone
    (cached, or the adapters disabled at every step). Checkpoints and OUT/final hold the adapter only."""
    model = tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(12))
    args = ["train", "dpo", "--model", str(model), "--data", str(data), "--batch-size", "4", "--lora"]
    args += [
        "--reference",
        reference,
        "--max-steps",
        "3",
        "--lr",
        "3e-3",
        "--no-progress",
        "--save-every",
        "2",
    ]
    one, two = one_and_sharded(tmp_path, args)
    adapter = "adapter_model.safetensors"
    a1, a2 = (load_file(str(d / "final" / adapter)) for d in (one, two))
    assert a1.keys() == a2.keys() and all("lora_" in k for k in a2)
    for k in a1:
        torch.testing.assert_close(a2[k], a1[k], atol=2e-5, rtol=1e-4)
    assert sorted(p.name for p in (two / "checkpoints" / "step-2").iterdir() if "safetensors" in p.name) == [
        adapter,
        "loss_state.safetensors",
        "optimizer.safetensors",
        "rng.safetensors",
    ]
    again = resume_sharded(tmp_path, args, two / "checkpoints" / "step-2")
    a3 = load_file(str(again / "final" / adapter))
    for k in a2:
        torch.testing.assert_close(a3[k], a2[k], atol=1e-6, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        # TR-DPO: a separate reference model, sharded too; batch 3 on 2 ranks with micro-batches of 1
        # pads rank 1 with a forward of the policy *and* of the reference
        ["--micro-batch-size", "1", "--ref-sync-every", "2", "--ref-sync-alpha", "0.5"],
        # Accelerated PO: the round-start weights are extrapolated shard by shard, saved whole
        ["--rounds", "2", "--apo-alpha", "0.5"],
        # round 2's reference model is a copy of the sharded policy (gathered, loaded, sharded again)
        ["--rounds", "2", "--reference", "model"],
    ],
    ids=["tr-dpo", "apo", "rounds-model"],
)
def test_fsdp_moving_references_equal_one_process_and_resume(tmp_path: Path, extra: list[str]) -> None:
    model = tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(9))
    args = ["train", "dpo", "--model", str(model), "--data", str(data), "--batch-size", "3", "--lr", "3e-3"]
    args += ["--max-steps", "6", "--save-every", "2", "--keep-last", "3", "--no-progress", *extra]
    one, two = one_and_sharded(tmp_path, args)
    w1, w2 = (load_file(str(d / "final" / "model.safetensors")) for d in (one, two))
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=2e-5, rtol=1e-4)
    step4 = (
        two / "checkpoints" / "step-4"
    )  # mid-run: TR-DPO's reference has moved, rounds are in their second
    moved = "apo_prev" if "--apo-alpha" in extra else "reference"
    assert (step4 / f"{moved}.safetensors").is_file()
    again = resume_sharded(tmp_path, args, step4)
    w3 = load_file(str(again / "final" / "model.safetensors"))
    for k in w2:
        torch.testing.assert_close(w3[k], w2[k], atol=1e-6, rtol=0)
