"""The child processes of grpo_vs_trl.py: one GRPO run of preftune or of TRL's GRPOTrainer, and the
reward both sides call.

Each child trains `--steps` optimizer steps on the same prompts (the whole prompt file is one batch,
so every step sees every prompt whatever either sampler does), times every step with the shared
optimizer hook (bench_utils.install_step_clock), and splits a step into its parts: generation,
reward, and the rest (log-probs, loss, backward, optimizer step). It prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import bench_utils as bu

REWARD_SECONDS: list[float] = []  # wall time of every reward call in this process


def reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
    """Fraction of a completion's words whose id is even (w4, w6, ...): cheap, deterministic, with
    spread on a random model; the same function on both sides (TRL's reward_funcs signature)."""
    t0 = time.perf_counter()
    out = []
    for c in completions:
        text = c if isinstance(c, str) else str(c)
        words = [w for w in text.split() if w.startswith("w") and w[1:].isdigit()]
        out.append(sum(int(w[1:]) % 2 == 0 for w in words) / max(1, len(words)))
    REWARD_SECONDS.append(time.perf_counter() - t0)
    return out


def _prompts(path: str) -> list[str]:
    return [json.loads(line)["prompt"] for line in Path(path).read_text().splitlines() if line.strip()]


def _preftune_config(a: argparse.Namespace, n: int, out: Path) -> Any:
    return bu.preftune_config(
        model=a.model, data=None, out=out, steps=a.steps, batch=n, method="grpo", prompts=a.prompts,
        reward="grpo_children:reward", num_generations=a.generations,
        max_completion_length=a.max_completion, temperature=1.0, lr=a.lr, weight_decay=0.0,
        max_grad_norm=1.0, optimizer_args={}, seed=a.seed, report=False,
    )  # fmt: skip


def child_preftune(a: argparse.Namespace) -> dict[str, Any]:
    stamps = bu.install_step_clock()
    from preftune.train.api import train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = _preftune_config(a, len(_prompts(a.prompts)), Path(tmp) / "run")
        start = (time.perf_counter(), time.process_time())
        train(cfg)
        rows = [json.loads(ln) for ln in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("split") == "train"]
    rewards = REWARD_SECONDS[: len(rows)]
    return {
        "side": "preftune",
        "train_start": start,
        "stamps": stamps,
        "losses": [float(r["loss"]) for r in rows],
        "completion_length": [float(r["completion_length"]) for r in rows],
        # rollout_s: generation + reward + advantages; train_s: log-probs, loss, backward, step
        "generate_s": [float(r["rollout_s"]) - s for r, s in zip(rows, rewards)],
        "reward_s": rewards,
    }


def _trl_config(a: argparse.Namespace, n: int, out: str) -> Any:
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=out, per_device_train_batch_size=n * a.generations, gradient_accumulation_steps=1,
        steps_per_generation=1, num_generations=a.generations, max_completion_length=a.max_completion,
        temperature=1.0, top_p=1.0, top_k=0, beta=0.0, loss_type="dapo", num_iterations=1,
        learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, max_steps=a.steps, logging_steps=1, report_to="none", save_strategy="no",
        use_cpu=True, bf16=False, fp16=False, seed=a.seed, dataloader_num_workers=0,
        optim="adamw_torch_fused", disable_dropout=True,
        gradient_checkpointing=False,  # GRPOConfig defaults to True; preftune recomputes nothing either
    )  # fmt: skip


def child_trl(a: argparse.Namespace, *, gpu_path: bool = False) -> dict[str, Any]:
    """TRL's GRPOTrainer; `gpu_path`: its LM head scores completion positions only, as on a GPU
    (grpo_vs_trl.py's `trl_gpu` side; the same switch as dpo_children.py's `gpu` variant)."""
    stamps = bu.install_step_clock()
    if gpu_path:
        import trl.trainer.utils as trl_utils

        trl_utils._use_triton = lambda device: True  # compact: completion positions only
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    torch.manual_seed(a.seed)
    prompts = _prompts(a.prompts)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    tokenizer.padding_side = "left"
    with tempfile.TemporaryDirectory() as tmp:
        trainer = GRPOTrainer(
            model=model, reward_funcs=reward, args=_trl_config(a, len(prompts), tmp),
            train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]), processing_class=tokenizer,
        )  # fmt: skip
        scored: list[float] = []
        inner = trainer._generate_and_score_completions

        def timed(*args: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            out = inner(*args, **kw)
            scored.append(time.perf_counter() - t0)
            return out

        trainer._generate_and_score_completions = timed  # type: ignore[method-assign]
        start = (time.perf_counter(), time.process_time())
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    rewards = REWARD_SECONDS[: len(scored)]
    return {
        "side": "trl_gpu" if gpu_path else "trl",
        "train_start": start,
        "stamps": stamps,
        "losses": [float(h["loss"]) for h in logs],
        "completion_length": [float(h.get("completions/mean_length", float("nan"))) for h in logs],
        "generate_s": [s - r for s, r in zip(scored, rewards)],  # generation (+ TRL's bookkeeping)
        "reward_s": rewards,
    }
