"""The child processes of dpo_vs_trl.py: one DPO training run per process, TRL or preftune.

Settings variants (`--trl-variant`, and the matching preftune side):

- `plain`: the first published tables. TRL runs an online reference model
  (`precompute_ref_log_probs=False`), the unfused multi-tensor AdamW (`optim="adamw_torch"`), no
  compilation and the whole batch in one forward; preftune runs its online reference model too.
- `best`: TRL at its best valid CPU settings: fused AdamW (`optim="adamw_torch_fused"`), reference
  log-probs precomputed once before training (`precompute_ref_log_probs=True`, no reference model in
  memory), `torch_compile=True` (its compilation falls in the first step, which is reported apart
  and never timed) and one pair per forward with gradient accumulation over the batch (a smaller
  activation peak for the same update). preftune uses its counterparts: its default fused AdamW,
  `reference="cache"` (the reference log-probs computed in one pass before the first step) and one
  pair per forward (`micro_batch_size=1`, gradients accumulated exactly over the batch).
- `gpu`: `best`, plus TRL's GPU scoring path. TRL 1.16 projects hidden states through the LM head
  with a fused chunked kernel (`trl.trainer.utils.add_fused_lm_head`). On devices with Triton
  (CUDA, XPU) it scores only the positions whose label is a completion token
  (`compact = _use_triton(device)`, then `hidden_states[mask]`); elsewhere, CPU included, it scores
  every position, prompt and padding too, and masks the result afterwards. The `gpu` variant makes
  that one decision answer "compact" on CPU (it replaces the name `_use_triton` inside
  `trl.trainer.utils` only; the kernel module keeps its own, so the chunks still run TRL's torch
  code, not Triton). Every other line of TRL is unchanged, so the row shows what TRL costs when its
  vocabulary layer runs on response tokens only, as it does on a GPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import bench_utils as bu

VARIANTS = ("plain", "best", "gpu")


def child_namespace(**fields: Any) -> argparse.Namespace:
    """Every field the children read, with dpo_vs_trl.py's defaults; `fields` win."""
    base: dict[str, Any] = {
        "model": None,
        "data": None,
        "batch": 2,
        "steps": 3,
        "lr": 1e-5,
        "beta": 0.1,
        "seed": 0,
        "optimizer": "unfused",
        "trl_variant": "best",
        "levers_off": "",
    }
    unknown = set(fields) - set(base)
    if unknown:
        raise TypeError(f"unknown child fields {sorted(unknown)}")
    base.update(fields)
    return argparse.Namespace(**base)


def trl_settings(a: argparse.Namespace) -> dict[str, Any]:
    """The DPOConfig fields that differ between variants (see the module docstring)."""
    if a.trl_variant == "plain":
        optim = "adamw_torch_fused" if a.optimizer == "fused" else "adamw_torch"
        return {
            "optim": optim,
            "precompute_ref_log_probs": False,
            "torch_compile": False,
            "per_device_train_batch_size": a.batch,
            "gradient_accumulation_steps": 1,
        }
    return {
        "optim": "adamw_torch_fused",
        "precompute_ref_log_probs": True,
        "torch_compile": True,
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": a.batch,
    }


def _read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def child_trl(a: argparse.Namespace) -> dict[str, Any]:
    stamps = bu.install_step_clock()
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    if a.trl_variant == "gpu":
        import trl.trainer.utils as trl_utils

        trl_utils._use_triton = lambda device: True  # score completion positions only, as on a GPU

    losses: list[float] = []

    class LossLog(TrainerCallback):  # type: ignore[misc]
        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any
        ) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    settings = trl_settings(a)
    tok = AutoTokenizer.from_pretrained(a.model)
    ds = Dataset.from_list(_read_rows(Path(a.data)))
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    ref = None
    if not settings["precompute_ref_log_probs"]:
        ref = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = DPOConfig(
            output_dir=tmp,
            max_steps=a.steps,
            learning_rate=a.lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            beta=a.beta,
            loss_type=["sigmoid"],
            bf16=False,
            fp16=False,
            gradient_checkpointing=False,
            use_cpu=True,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            seed=a.seed,
            train_sampling_strategy="sequential",
            max_length=None,
            disable_tqdm=True,
            dataloader_num_workers=0,
            **settings,
        )
        trainer = DPOTrainer(
            model=model,
            ref_model=ref,
            args=cfg,
            train_dataset=ds,
            processing_class=tok,
            callbacks=[LossLog()],
        )
        lengths = [
            [len(r["prompt_ids"]), len(r["chosen_ids"]), len(r["rejected_ids"])]
            for r in trainer.train_dataset
        ]
        rss_before = bu.rss_mb()
        start = (time.perf_counter(), time.process_time())
        trainer.train()
    return {
        "side": "trl",
        "variant": a.trl_variant,
        "settings": settings,
        "train_start": start,
        "stamps": stamps,
        "losses": losses,
        "lengths": lengths,
        "rss_before_train_mb": rss_before,
    }


LEVERS = ("keep", "tree", "lean", "fill", "direct", "trim", "finite", "grads", "lse")


def levers_off(names: str) -> dict[str, Any]:
    """preftune as before the speed and memory levers named (comma-separated; `preftune_base` in
    dpo_vs_trl.py): `keep`: the LM head recomputes every chunk's logits in backward instead of keeping
    their softmax; `tree`: packed rows attend through the dense [L, L] tree mask instead of segment by
    segment; `lean`: `torch._inductor.config` is imported, as `torch.use_deterministic_algorithms` did
    before `preftune.train.api.deterministic_algorithms` (~70 MiB resident); `fill`: deterministic mode
    fills every new tensor with NaN again (`torch.utils.deterministic.fill_uninitialized_memory`);
    `direct`: the LM head's and the input embedding's backwards return a fresh weight gradient that
    autograd adds into `.grad` instead of adding into `.grad` themselves (`preftune.models.direct_grads`);
    `trim`: the report after training is written without first handing the heap's free memory back to
    the system (`preftune.train.allocator.release_free_heap`); `finite`: the per-step check that the
    weights are finite takes a max-|x| norm (`torch._foreach_norm(·, inf)`) instead of each tensor's
    min and max (`preftune.train.guards`); `grads`: every step frees its gradients
    (`zero_grad(set_to_none=True)`) instead of zeroing them in place under gradient accumulation;
    `lse`: an LM-head chunk whose softmax is not kept takes its log-sum-exp with `torch.logsumexp` (a
    second `[chunk, V]` buffer) instead of in its logits buffer (`preftune.models.head_logps`).
    Settings that take a value instead: `keep=C` keeps softmax within C float32 copies of the head
    weight (`keep` = `keep=0`; the default is logprobs._KEEP_WEIGHT_COPIES), `chunk=N` runs the head N
    tokens at a time (at the benchmarks' 32k vocabulary; default 2^22 / 32000 = 131), `micro=N` runs N
    pairs per forward (the `best` side runs 1, as TRL `best` does), `mmap=M` fixes glibc's mmap
    threshold at M MiB (`malloc_mmap_threshold_mib`; default 0, glibc's own). Returns the config
    overrides."""
    import preftune.models.logprobs as lp

    overrides: dict[str, Any] = {}
    for entry in names.split(","):
        name, _, value = entry.partition("=")
        if name == "keep":
            lp._KEEP_WEIGHT_COPIES = float(value or 0)
        elif name == "chunk" and value:
            lp._CHUNK_ELEMENTS = int(value) * bu.MODELS["20m"].vocab_size
        elif name == "micro" and value:
            overrides["micro_batch_size"] = int(value)
        elif name == "tree" and not value:
            lp._TREE_ATTENTION = False
        elif name == "lean" and not value:
            import torch._inductor.config  # noqa: F401
        elif name == "mmap" and value:
            overrides["malloc_mmap_threshold_mib"] = float(value)
        elif name == "fill" and not value:
            _fill_new_tensors()
        elif name == "direct" and not value:
            import preftune.models.direct_grads as dg

            dg._DIRECT_GRADS = False
        elif name == "finite" and not value:
            import preftune.train.guards as guards

            guards._EXTREMES_ON_CPU = False
        elif name == "grads" and not value:
            import preftune.train.run as run

            run._KEEP_ACCUMULATED_GRADS = False
        elif name == "lse" and not value:
            import preftune.models.head_logps as hl

            hl._LSE_IN_PLACE = False
        elif name == "trim" and not value:
            import preftune.train.allocator as al

            al.release_free_heap = lambda: False
        elif entry:
            raise ValueError(
                f"lever {entry!r}: choose from {', '.join(LEVERS)}, keep=C, chunk=N, micro=N, mmap=M"
            )
    return overrides


def _fill_new_tensors() -> None:
    """The `fill` lever: preftune's deterministic mode with torch's NaN fill of new tensors back on."""
    import torch

    import preftune.train.api as api

    lean = api.deterministic_algorithms

    def filling() -> None:
        lean()
        torch.utils.deterministic.fill_uninitialized_memory = True  # type: ignore[attr-defined]

    api.deterministic_algorithms = filling


def child_preftune(a: argparse.Namespace) -> dict[str, Any]:
    stamps = bu.install_step_clock()
    from preftune.train.api import train

    plain = a.trl_variant == "plain"
    # best: one pair per forward, gradients accumulated over the batch (TRL best's setting); plain: the batch
    overrides = {"micro_batch_size": a.batch if plain else 1, **levers_off(a.levers_off)}
    with tempfile.TemporaryDirectory() as tmp:
        reference: dict[str, Any] = (
            {"reference": "model", "ref_model": a.model} if plain else {"reference": "cache"}
        )
        cfg = bu.preftune_config(
            model=a.model,
            data=a.data,
            out=Path(tmp) / "run",
            steps=a.steps,
            batch=a.batch,
            hparams={"beta": a.beta},
            gradient_checkpointing=False,
            lr=a.lr,
            weight_decay=0.0,
            max_grad_norm=1.0,
            optimizer="adamw",
            # {}: preftune's default, the fused kernel
            optimizer_args={"foreach": True} if plain and a.optimizer != "fused" else {},
            seed=a.seed,
            cache_dir=str(Path(tmp) / "cache"),
            **reference,
            **overrides,
        )
        start = (time.perf_counter(), time.process_time())
        train(cfg)
        metrics = [
            json.loads(ln)
            for ln in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
            if ln.strip()
        ]
        losses = [float(m["loss"]) for m in metrics if m.get("split", "train") == "train" and "loss" in m]
        from preftune.data.pipeline import prepare_examples

        ex = prepare_examples(a.data, tokenizer=a.model, cache_dir=str(Path(tmp) / "cache2")).examples
        lengths = [[len(e.prompt_ids), *(len(r) for r in e.response_ids)] for e in ex]
    return {
        "side": "preftune",
        "variant": "plain" if plain else "best",
        "levers_off": a.levers_off,
        "train_start": start,
        "stamps": stamps,
        "losses": losses,
        "lengths": lengths,
    }


def child_peak(a: argparse.Namespace) -> dict[str, Any]:
    wall, cpu = bu.matmul_peak(seconds=a.peak_seconds)
    return {"side": "peak", "flops": wall, "cpu_flops": cpu}
