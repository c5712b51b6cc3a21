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

from preftune.tasks.arithmetic import LEVELS, ArithmeticTask, parse_prompt, sample_problem


@dataclass
class SFTConfig:
    """Model size and schedule of the SFT run (defaults: about two minutes on 2 CPU cores)."""

    hidden_size: int = 96
    """Width of the Llama model; heads of 24 dims each."""
    num_layers: int = 3
    """Number of transformer blocks."""
    steps: int = 500
    """Most optimizer steps (the cosine schedule's length); each sees `batch_size` new problems."""
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
    target_accuracy: float | None = 0.5
    """Stop at the first check where greedy accuracy on the check prompts reaches this (None: run
    all `steps`). Accuracy climbs steeply late in this run (from 20 % to 75 % within 150 steps, at a
    step that varies with the seed), so a fixed step count leaves one seed at 37 % and another at
    72 %; stopping at a target gives every seed a model that is right about half the time."""
    check_every: int = 25
    """Steps between accuracy checks."""
    check_from: int = 200
    """First step with a check (accuracy is near 0 before)."""
    check_prompts: int = 100
    """Prompts of the accuracy check: drawn apart from training and from `exclude_prompts`."""
    seed: int = 0
    """Seeds the weights and the problem stream."""


@dataclass
class SFTResult:
    """What the SFT run left: the model folder and its training curve (one loss per step)."""

    model_dir: Path
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    checks: list[tuple[int, float]] = field(default_factory=list)
    """(step, greedy accuracy on the check prompts) of each accuracy check."""
    reached_target: bool = False


def verifier_trunk_config(seed: int = 0) -> SFTConfig:
    """The SFT run of a reward model's or PRM's trunk: the quickstart's model (same size, loss and
    data stream) trained on until 95 % greedy accuracy on the check prompts, at most 1200 steps. The
    quickstart policy stops at ~50 % on purpose; a scorer that has to check the column arithmetic of
    that policy's samples needs a trunk that knows it (docs/reward_models.md, "On the built-in task")."""
    return SFTConfig(steps=1200, target_accuracy=0.95, check_every=100, check_from=400, seed=seed)


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
    exclude = set(exclude_prompts or ())
    check = []
    if config.target_accuracy is not None:
        check = [
            p.prompt for p in task.problems(config.check_prompts, seed=30_000 + config.seed, exclude=exclude)
        ]
        exclude |= set(check)
    level = LEVELS[task.level]
    start = time.perf_counter()
    losses: list[float] = []
    checks: list[tuple[int, float]] = []
    reached = False
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
        done = step + 1
        if check and done >= config.check_from and (done - config.check_from) % config.check_every == 0:
            checks.append((done, greedy_accuracy(model, tokenizer, task, check)))
            if checks[-1][1] >= float(config.target_accuracy or 0.0):
                reached = True
                break
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return SFTResult(out, len(losses), time.perf_counter() - start, losses, checks, reached)


@torch.no_grad()
def greedy_accuracy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: ArithmeticTask,
    prompts: list[str],
    *,
    batch_size: int = 64,
) -> float:
    """Fraction of `prompts` whose greedy answer `task.reward` accepts (the model is left as it was).
    The SFT's stopping check and the quickstart's greedy held-out accuracy both measure with this."""
    from preftune.generation import generate

    was_training = model.training
    model.eval()
    try:
        ids = [encode(tokenizer, p)[0] for p in prompts]
        out = generate(
            model,
            tokenizer,
            ids,
            max_new_tokens=max_new_tokens_for(task, prompts),
            temperature=0.0,
            batch_size=batch_size,
        )
    finally:
        model.train(was_training)
    texts = [str(tokenizer.decode(row[0], skip_special_tokens=True)) for row in out]
    return float(sum(task.reward(p, t) for p, t in zip(prompts, texts))) / max(1, len(prompts))


def max_new_tokens_for(task: ArithmeticTask, prompts: list[str]) -> int:
    """Room for the longest reference answer of `prompts` plus 25% (wrong answers may run longer)."""
    longest = max(len(task.solution(parse_prompt(p))) for p in prompts)
    return int(longest * 1.25) + 8
