"""Supervised fine-tuning of a tiny Llama-architecture model from scratch on the arithmetic task.

The quickstart's starting point: a model that has learned the written format and is right on part
of the held-out problems — imperfect on purpose, so preference training has something to fix.
Plain next-token cross-entropy on response tokens (prompt tokens are not predicted: the operands are
random), AdamW with linear warm-up and cosine decay; every batch is freshly drawn problems, so the
model never sees a held-out prompt. The result is a Hugging Face folder (config, safetensors weights,
tokenizer) loaded back through `from_pretrained` like any user model.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from preftune.tasks.arithmetic import LEVELS, ArithmeticTask, sample_problem


@dataclass
class SFTConfig:
    """Model size and schedule of the SFT run (defaults: about two minutes on 2 CPU cores)."""

    hidden_size: int = 96
    """Width of the Llama model; heads of 24 dims each."""
    num_layers: int = 3
    """Number of transformer blocks."""
    steps: int = 400
    """Optimizer steps; each sees `batch_size` new problems."""
    batch_size: int = 48
    """Problems per step."""
    lr: float = 3e-3
    """Peak AdamW learning rate (after `warmup_steps` of linear warm-up, cosine decay to 10%)."""
    warmup_steps: int = 30
    """Linear warm-up steps."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""
    max_seconds: float | None = None
    """Stop early after this many seconds (the learning-rate schedule still assumes `steps`)."""
    seed: int = 0
    """Seeds the weights and the problem stream."""


@dataclass
class SFTResult:
    """What the SFT run left: the model folder and its training curve (one loss per step)."""

    model_dir: Path
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)


def encode(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str | None = None
) -> tuple[list[int], list[int]]:
    """Token ids of a prompt and (optionally) its response followed by EOS: (prompt_ids, response_ids)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if response is None:
        return prompt_ids, []
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids, response_ids


def build_model(tokenizer: PreTrainedTokenizerBase, config: SFTConfig) -> LlamaForCausalLM:
    """A freshly initialised tiny Llama (tied embeddings, 24-dim heads) sized for the char vocabulary."""
    torch.manual_seed(config.seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=4 * config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=max(1, config.hidden_size // 24),
        num_key_value_heads=max(1, config.hidden_size // 24),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(cfg)


def _batch(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded input ids [B, T], attention mask [B, T] and labels [B, T] (−100 off responses)."""
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        seq = p + r
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, len(p) : len(seq)] = torch.tensor(r)
    return ids, mask, labels


def train_sft(
    task: ArithmeticTask,
    out_dir: str | Path,
    config: SFTConfig | None = None,
    *,
    exclude_prompts: set[str] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> SFTResult:
    """Train the SFT model on freshly drawn problems and save it (with tokenizer) to `out_dir`.

    Loss: mean over response tokens of −log π(y_t | x, y_<t). `exclude_prompts` are never trained
    on (pass the held-out prompts). `on_step(step, loss)` is called after every step (progress bars).
    """
    config = config or SFTConfig()
    tokenizer = task.build_tokenizer()
    model = build_model(tokenizer, config)
    model.train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=(0.9, 0.98), weight_decay=config.weight_decay
    )

    def lr_at(step: int) -> float:
        if step < config.warmup_steps:
            return config.lr * (step + 1) / config.warmup_steps
        frac = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    rng = random.Random(f"sft:{config.seed}")
    exclude = exclude_prompts or set()
    level = LEVELS[task.level]
    start = time.perf_counter()
    losses: list[float] = []
    for step in range(config.steps):
        rows: list[tuple[list[int], list[int]]] = []
        while len(rows) < config.batch_size:
            p = sample_problem(rng, level, task.ops)
            if p.prompt not in exclude:
                rows.append(encode(tokenizer, p.prompt, task.solution(p)))
        ids, mask, labels = _batch(rows, tokenizer.pad_token_id)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1, losses[-1])
        if config.max_seconds is not None and time.perf_counter() - start > config.max_seconds:
            break
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return SFTResult(out, len(losses), time.perf_counter() - start, losses)
