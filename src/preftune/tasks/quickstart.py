"""The quickstart pipeline: SFT → self-sampled, verifier-labelled pairs → preference training → accuracy.

    prepare(out_dir)         steps 1-3: task + SFT model, K samples per training prompt labelled by the
                             verifier, response-level pairs (correct ≻ incorrect) and Step-DPO pairs
                             (Lai et al. 2024: prompt + correct steps before the first error; chosen =
                             the correct step, rejected = the wrong one), held-out prompts, and the SFT
                             model's held-out accuracy (the "before" figures).
    run_quickstart(out_dir)  prepare, then step 4 (`preftune.train.api.train` from the SFT model, the run
                             folder is out_dir itself) and step 5 (held-out accuracy after, greedy and
                             sampled); writes out_dir/summary.json and out_dir/report.html.

Deviations from a plain on-policy recipe: the greedy response joins the K samples (drawn at temperature
0.7), so the rejected side holds the mistakes greedy decoding makes; a training prompt whose samples
are all wrong gets the task's reference solution as its chosen response (the verifier knows it), so
hard prompts still teach; β is 1, not 0.1 (see QuickstartConfig.beta); and by default the rejected side is the wrong sample cut after its first wrong character
(`first_error_prefix`), because whole wrong samples made DPO *lower* held-out accuracy here
(docs/quickstart.md has the measurements).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from preftune.errors import ConfigError
from preftune.generation import generate
from preftune.tasks.arithmetic import ArithmeticTask, parse_prompt
from preftune.tasks.quickstart_pairs import build_pairs
from preftune.tasks.quickstart_pairs import first_error_prefix as first_error_prefix  # re-exported
from preftune.tasks.quickstart_report import Stages, prepare_stages, sample_table, write_report
from preftune.tasks.sft import SFTConfig, encode, greedy_accuracy, max_new_tokens_for, train_sft

Log = Callable[[str], None]


@dataclass
class QuickstartConfig:
    """Sizes of every stage (defaults: a few minutes on 2 CPU cores)."""

    level: int = 2
    """Arithmetic difficulty (preftune.tasks.arithmetic.LEVELS)."""
    ops: str = "+-*"
    """Operations drawn."""
    sft: SFTConfig = field(default_factory=lambda: SFTConfig(check_every=5))
    """The SFT run. Its accuracy checks come every 5 steps, not SFTConfig's 25: check accuracy can
    jump 10-15 points within 25 steps (seed 0: 49 % at step 425, 64 % at 450), so with 25-step checks
    the 50 % target stopped seed 0 at 59.7 % held-out accuracy and GRPO gained 4.7 points; stopped at
    step 430 (52.6 %) it gains 8.8 (docs/quickstart.md)."""
    train_prompts: int = 800
    """Training prompts sampled for preference data."""
    heldout_prompts: int = 1000
    """Held-out prompts for accuracy (never trained on, neither by SFT nor by preference training).
    1000, not a few hundred: the same models measured on 200 prompts differed from their 1000-prompt
    accuracy by up to 5 points, as much as the effect being measured (docs/quickstart.md)."""
    samples_per_prompt: int = 4
    """K responses sampled per training prompt."""
    temperature: float = 1.0
    """Sampling temperature of the sampled held-out accuracy."""
    sample_temperature: float = 0.7
    """Sampling temperature of the training samples (lower: the wrong samples are the model's likely
    mistakes rather than sampling noise)."""
    include_greedy: bool = True
    """Add the greedy response of each training prompt to its samples (first in line for a pair), so
    the mistakes greedy decoding makes are among the rejected responses."""
    pairs_per_prompt: int = 2
    """At most this many (correct, incorrect) pairs per prompt."""
    rejected: str = "first_error"
    """Rejected text: 'first_error' = the wrong sample cut after its first wrong character (see
    `first_error_prefix`), 'full' = the whole wrong sample."""
    eval_fraction: float = 0.1
    """Fraction of prompts whose pairs go to eval_pairs.jsonl (preference metrics on held-out pairs)."""
    eval_samples: int = 2
    """Samples per held-out prompt for the sampled accuracy."""
    threads: int = 1
    """torch intra-op threads; tiny models are overhead-bound, one thread wastes least on a busy CPU."""
    max_steps: int = 100
    """Preference-training optimizer steps."""
    batch_size: int = 32
    """Pairs per preference-training step."""
    lr: float = 3e-5
    """Preference-training peak learning rate."""
    beta: float = 1.0
    """β of DPO-family methods (ignored by methods without it). Large on purpose: the DPO loss saturates
    once β·(log-ratio margin) is a few units, so β = 1 stops after a few nats of change where β = 0.1
    kept pushing and lowered held-out accuracy (docs/quickstart.md)."""
    online_steps: int = 200
    """Optimizer steps of an online method (--method grpo, rloo, remax, ...). On one machine's seed 0
    (SFT 49.1 %) GRPO at lr 5e-5 gained +4.0 points at 100 steps — greedy accuracy stalls near 54 %
    from step 25 to 125, then rises — and +10.3 at 200 (docs/quickstart.md; `online_lr` for the
    learning rate chosen with it). num_iterations 2 on the same rollouts gained nothing."""
    online_batch_size: int = 16
    """Prompts per online step, each with `num_generations` samples."""
    num_generations: int = 8
    """Samples per prompt of an online method. 16 lifted GRPO on another machine's seed 0 from +4.0
    to +8.2 points, but left ReMax 5.3 behind GRPO (docs/quickstart.md)."""
    online_temperature: float = 0.7
    """Sampling temperature of an online method's rollouts (the trainer recomputes its log-probs at
    the same temperature, as TRL does). 0.7, not 1: the samples stay near the greedy answer, so their
    rewards rank the mistakes greedy decoding makes. Seed 0, lr 5e-5, 100 steps, 500 held-out
    prompts: greedy 60.6 → 66.6 % at 0.7 against 60.6 → 64.6 % at 1.0 (docs/quickstart.md)."""
    online_lr: float = 2.5e-5
    """Learning rate of an online method (constant, no warm-up). At 200 steps, 2.5e-5 against 5e-5
    (docs/quickstart.md): GRPO +9.0 / +15.5 / +14.9 against +10.3 / +18.6 / +15.7 on seeds 0 / 1 / 2,
    while ReMax, whose advantage r − r(greedy) is not centred within the group (a noisier gradient),
    swung by up to 7 points between checkpoints at 5e-5 and ended 3.5–6.4 behind GRPO, and at 2.5e-5
    rose at every checkpoint and ended 0.2 / 0.7 / 1.5 behind. Earlier, at 100 steps: 2e-5 learned
    slowly, 1e-4 was flat after 50 steps and 3e-4 collapsed (sampled accuracy 22 % → 2 % in 40 steps):
    the single-batch gradient is too noisy for large Adam steps."""


@dataclass
class Artifacts:
    """What `prepare` leaves: the task, the SFT model folder and the data files (all under out_dir; the
    pairs files None when prepared without pairs, for an online method)."""

    out_dir: Path
    task: ArithmeticTask
    sft_dir: Path
    pairs_path: Path | None
    eval_pairs_path: Path | None
    step_pairs_path: Path | None
    heldout_path: Path
    heldout_prompts: list[str]
    stats: dict[str, Any] = field(default_factory=dict)
    prompts_path: Path | None = None  # the training prompts (online methods)


def _load(model_dir_or_model: Any, task: ArithmeticTask) -> tuple[Any, Any]:
    if isinstance(model_dir_or_model, torch.nn.Module):
        return model_dir_or_model, task.build_tokenizer()
    from transformers import AutoTokenizer

    from preftune.models.load import load_causal_lm

    return load_causal_lm(str(model_dir_or_model)), AutoTokenizer.from_pretrained(str(model_dir_or_model))


def sample_responses(
    model_dir_or_model: Any,
    task: ArithmeticTask,
    prompts: list[str],
    *,
    num_samples: int,
    temperature: float,
    seed: int,
    batch_size: int = 128,
) -> list[list[str]]:
    """[prompt][sample] → decoded response text (EOS and padding stripped); temperature 0 is greedy."""
    model, tokenizer = _load(model_dir_or_model, task)
    ids = [encode(tokenizer, p)[0] for p in prompts]
    out = generate(
        model,
        tokenizer,
        ids,
        num_samples=num_samples,
        max_new_tokens=max_new_tokens_for(task, prompts),
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
    )
    return [[tokenizer.decode(s, skip_special_tokens=True) for s in row] for row in out]


def evaluate_accuracy(
    model_dir_or_model: Any,
    task: ArithmeticTask,
    prompts: list[str],
    *,
    greedy: bool = True,
    num_samples: int = 1,
    temperature: float = 1.0,
    seed: int = 0,
) -> float:
    """Mean `task.reward` over held-out prompts (× `num_samples` samples when not greedy), in [0, 1]."""
    if greedy:
        model, tokenizer = _load(model_dir_or_model, task)
        return greedy_accuracy(model, tokenizer, task, prompts, batch_size=128)
    responses = sample_responses(
        model_dir_or_model,
        task,
        prompts,
        num_samples=num_samples,
        temperature=temperature,
        seed=seed,
    )
    rewards = [task.reward(p, r) for p, rs in zip(prompts, responses) for r in rs]
    return sum(rewards) / max(1, len(rewards))


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
    return path


def prepare(
    out_dir: str | Path,
    *,
    seed: int = 0,
    config: QuickstartConfig | None = None,
    log: Log = print,
    on_sft_step: Callable[[int, float], None] | None = None,
    with_pairs: bool = True,
    stages: Stages | None = None,
) -> Artifacts:
    """Steps 1-3 of the quickstart (see module docstring), plus the SFT model's held-out accuracy.
    `with_pairs=False` (online methods) skips the sampling and the pairs: no pairs files, and the
    Artifacts' pairs paths are None. `stages` numbers the stage lines (`run_quickstart` counts its
    training stages in too); by default out of the preparation's own (`prepare_stages`).

    Writes out_dir/sft/ (HF model + tokenizer), out_dir/data/{prompts,heldout}.jsonl and, with pairs,
    out_dir/data/{pairs,eval_pairs,step_pairs}.jsonl.
    """
    cfg = config or QuickstartConfig()
    if cfg.samples_per_prompt < 2:
        raise ConfigError("quickstart: samples_per_prompt must be ≥ 2 to find correct and wrong samples")
    torch.set_num_threads(max(1, cfg.threads))
    out = Path(out_dir)
    task = ArithmeticTask(level=cfg.level, ops=cfg.ops)
    heldout = [p.prompt for p in task.problems(cfg.heldout_prompts, seed=10_000 + seed)]
    train_prompts = [
        p.prompt for p in task.problems(cfg.train_prompts, seed=20_000 + seed, exclude=set(heldout))
    ]
    stats: dict[str, Any] = {"level": cfg.level, "ops": cfg.ops}
    stage = stages or Stages(prepare_stages(with_pairs), log)

    t0 = time.perf_counter()
    sft_cfg = SFTConfig(**{**asdict(cfg.sft), "seed": seed})
    stage(f"SFT: tiny Llama ({sft_cfg.hidden_size}×{sft_cfg.num_layers}) on level-{cfg.level} arithmetic")
    sft = train_sft(task, out / "sft", sft_cfg, exclude_prompts=set(heldout), on_step=on_sft_step)
    stats["sft"] = {
        "steps": sft.steps,
        "seconds": round(sft.seconds, 1),
        "final_loss": sft.losses[-1],
        "checks": [[step, round(acc, 3)] for step, acc in sft.checks],
        "reached_target": sft.reached_target,
    }
    stopped = ""
    if sft.checks:
        missed = "" if sft.reached_target else ", not reached"
        stopped = f"; check accuracy {sft.checks[-1][1]:.0%} (target {sft_cfg.target_accuracy:.0%}{missed})"
    log(f"      {sft.steps} steps in {sft.seconds:.0f}s, final loss {sft.losses[-1]:.3f}{stopped}")

    model, _ = _load(sft.model_dir, task)
    pairs = _sample_pairs(model, task, train_prompts, cfg, seed, stage, stats) if with_pairs else None
    stage(
        f"writing {'data' if with_pairs else 'the prompts'} and measuring the SFT model on held-out prompts"
    )
    data = out / "data"
    eval_prompts = set(train_prompts[: max(1, int(len(train_prompts) * cfg.eval_fraction))])
    pair_paths: tuple[Path | None, Path | None, Path | None] = (
        _write_pairs(data, *pairs, eval_prompts) if pairs is not None else (None, None, None)
    )
    artifacts = Artifacts(
        out,
        task,
        sft.model_dir,
        *pair_paths,
        heldout_path=_write_jsonl(
            data / "heldout.jsonl",
            [{"prompt": p, "answer": parse_prompt(p).answer} for p in heldout],
        ),
        heldout_prompts=heldout,
        stats=stats,
        prompts_path=_write_jsonl(data / "prompts.jsonl", [{"prompt": p} for p in train_prompts]),
    )
    before = held_out_accuracy(model, task, heldout, cfg, seed=seed)
    stats["accuracy_before"] = before
    stats["prepare_seconds"] = round(time.perf_counter() - t0, 1)
    log(f"      SFT held-out accuracy: greedy {before['greedy']:.1%}, sampled {before['sampled']:.1%}")
    return artifacts


def _write_pairs(
    data: Path, pairs: list[dict[str, Any]], step_pairs: list[dict[str, Any]], eval_prompts: set[str]
) -> tuple[Path, Path, Path]:
    """Writes data/pairs.jsonl, eval_pairs.jsonl (the pairs of `eval_prompts`) and step_pairs.jsonl."""
    return (
        _write_jsonl(data / "pairs.jsonl", [r for r in pairs if r["prompt"] not in eval_prompts]),
        _write_jsonl(data / "eval_pairs.jsonl", [r for r in pairs if r["prompt"] in eval_prompts]),
        _write_jsonl(data / "step_pairs.jsonl", step_pairs),
    )


def held_out_accuracy(
    model_dir_or_model: Any, task: ArithmeticTask, prompts: list[str], cfg: QuickstartConfig, *, seed: int
) -> dict[str, float]:
    """{"greedy": ..., "sampled": ...} accuracy on held-out prompts."""
    model, _ = _load(model_dir_or_model, task)
    return {
        "greedy": evaluate_accuracy(model, task, prompts, greedy=True),
        "sampled": evaluate_accuracy(
            model,
            task,
            prompts,
            greedy=False,
            num_samples=cfg.eval_samples,
            temperature=cfg.temperature,
            seed=seed + 1,
        ),
    }


def run_quickstart(
    out_dir: str | Path,
    *,
    method: str = "dpo",
    seed: int = 0,
    config: QuickstartConfig | None = None,
    log: Log = print,
    on_sft_step: Callable[[int, float], None] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The whole quickstart; out_dir becomes a run folder (config.yaml, metrics.jsonl, final/, ...) with
    summary.json (method, accuracy_before/after greedy and sampled, steps, seconds) and report.html.
    `method="rto"`: the quickstart's DPO run (out_dir/dpo) first, then RTO from the SFT model with that
    DPO model as its token reward (`dpo_model`, recorded in summary.json).
    """
    from preftune.losses import parse_objective
    from preftune.online_methods import is_online
    from preftune.train.api import train

    cfg = config or QuickstartConfig()
    out = Path(out_dir)
    if (out / "metrics.jsonl").exists():
        raise ConfigError(f"quickstart: {out} already holds a run — pass another --out or delete it")
    online = is_online(method)
    rto = method.strip() == "rto"  # RTO's token reward is a DPO model: the quickstart's DPO run, first
    if not online:
        from preftune.method_checks import check_quickstart_method

        check_quickstart_method(method)
        parse_objective(method)
    start = time.perf_counter()
    pairs = not online or rto
    stage = Stages(prepare_stages(pairs) + (2 if rto else 1) + 1, log)  # then the run(s), the accuracy
    art = prepare(
        out, seed=seed, config=cfg, log=log, on_sft_step=on_sft_step, with_pairs=pairs, stages=stage
    )

    extra: dict[str, Any] = {}
    if rto:
        stage("training dpo (RTO's token-reward model) from the SFT model on pairs.jsonl")
        dpo = train(_offline_config("dpo", art, cfg, seed, progress, out / "dpo"))
        extra["dpo_model"] = str(dpo.final_dir)
    source = art.prompts_path if online else art.pairs_path
    stage(f"training {method} from the SFT model on {source.name if source else ''}")
    t4 = time.perf_counter()
    result = train(
        _online_config(method, art, cfg, seed, progress, **extra)
        if online
        else _offline_config(method, art, cfg, seed, progress, out)
    )
    train_seconds = time.perf_counter() - t4

    stage("held-out accuracy of the trained model")
    before = art.stats["accuracy_before"]
    after = held_out_accuracy(result.final_dir, art.task, art.heldout_prompts, cfg, seed=seed)
    samples = _greedy_samples(art, result.final_dir)
    train_summary_path = out / "summary.json"
    train_summary = json.loads(train_summary_path.read_text()) if train_summary_path.exists() else {}
    summary = {
        **train_summary,
        "method": method,
        "seed": seed,
        "accuracy_before": before["greedy"],
        "accuracy_after": after["greedy"],
        "accuracy_before_sampled": before["sampled"],
        "accuracy_after_sampled": after["sampled"],
        "steps": result.steps,
        "seconds": round(time.perf_counter() - start, 1),
        "train_seconds": round(train_seconds, 1),
        "heldout_prompts": len(art.heldout_prompts),
        **extra,  # rto: the quickstart's DPO model, its token reward
        "quickstart": {**art.stats, "config": asdict(cfg)},
    }
    train_summary_path.write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
    write_report(out, samples, art.stats, log)
    log(
        f"      accuracy greedy {before['greedy']:.1%} → {after['greedy']:.1%}, "
        f"sampled {before['sampled']:.1%} → {after['sampled']:.1%}  ({summary['seconds']:.0f}s in all)"
    )
    return summary


def _greedy_samples(art: Artifacts, final_dir: Path) -> str:
    """The report's table of greedy responses of the SFT and the trained model to 6 held-out prompts."""
    shown = art.heldout_prompts[:6]

    def greedy(model_dir: Path) -> list[str]:
        return [
            r[0] for r in sample_responses(model_dir, art.task, shown, num_samples=1, temperature=0, seed=0)
        ]

    return sample_table(art.task, shown, greedy(art.sft_dir), greedy(final_dir))


def _sample_pairs(
    model: Any,
    task: ArithmeticTask,
    train_prompts: list[str],
    cfg: QuickstartConfig,
    seed: int,
    stage: Stages,
    stats: dict[str, Any],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Step 2: K samples (and the greedy one) per training prompt, labelled by the verifier, as pairs
    (their counts in `stats["sampling"]`)."""
    t1 = time.perf_counter()
    K = cfg.samples_per_prompt
    stage(
        f"sampling {K} responses (temperature {cfg.sample_temperature:g})"
        f"{' + the greedy one' if cfg.include_greedy else ''} for each of {len(train_prompts)} training prompts"
    )
    responses = sample_responses(
        model, task, train_prompts, num_samples=K, temperature=cfg.sample_temperature, seed=seed
    )
    if cfg.include_greedy:
        greedy = sample_responses(model, task, train_prompts, num_samples=1, temperature=0.0, seed=seed)
        responses = [g + rs for g, rs in zip(greedy, responses)]
    pairs, step_pairs, counts = build_pairs(
        task,
        train_prompts,
        responses,
        pairs_per_prompt=cfg.pairs_per_prompt,
        seed=seed,
        rejected=cfg.rejected,
    )
    stats["sampling"] = {**counts, "seconds": round(time.perf_counter() - t1, 1)}
    stage.log(
        f"      {counts['correct']}/{counts['samples']} samples right; "
        f"{len(pairs)} pairs, {len(step_pairs)} step pairs"
    )
    if not pairs:
        raise ConfigError(
            "quickstart: the SFT model got every sampled answer right, so there are no pairs — "
            "raise the level or lower the SFT steps"
        )
    return pairs, step_pairs


def online_settings(cfg: QuickstartConfig, task: ArithmeticTask, prompts_path: Path) -> dict[str, Any]:
    """The config values of an online method on the task (the quickstart's and a sweep's on the
    built-in task): the verifier as reward on the training prompts, G samples each, up to the answer
    length the task needs (`max_new_tokens_for`), the quickstart's online schedule."""
    prompts = [json.loads(line)["prompt"] for line in Path(prompts_path).read_text().splitlines()]
    return {
        "prompts": str(prompts_path),
        "reward": "arithmetic",
        "max_steps": cfg.online_steps,
        "batch_size": cfg.online_batch_size,
        "num_generations": cfg.num_generations,
        "temperature": cfg.online_temperature,
        "lr": cfg.online_lr,
        "warmup_ratio": 0.0,
        "scheduler": "constant",
        "max_completion_length": max_new_tokens_for(task, prompts),
    }


def online_hparams(method: str, cfg: QuickstartConfig) -> dict[str, Any]:
    """Options of online `method` on the task where its preset's defaults do not fit a 0/1 verifier
    (the quickstart's and a sweep's; anything given explicitly overrides them):

    - `raft` keeps every correct sample and only those (`keep 0`, `min_reward 1`), Xiong et al. 2025's
      RAFT on a verifier: Dong et al. 2023's best-of-K (`keep 1`) ranks a continuous reward; with 0/1
      rewards it trains on a wrong sample of every all-wrong prompt and lost accuracy (docs/online.md).
    - `online_dpo`, `dno`, `xpo` take the offline DPO's β (`cfg.beta`, 1; see there), not the papers' 0.1.
    """
    from preftune.online_methods import PRESETS

    builder = PRESETS[method.strip()].builder
    if builder == "best_of_k":
        return {"keep": 0, "min_reward": 1.0}
    if builder in ("best_worst", "dno", "xpo"):
        return {"beta": cfg.beta}
    return {}


def _offline_config(
    method: str, art: Artifacts, cfg: QuickstartConfig, seed: int, progress: bool, out: Path
) -> Any:
    """The preference run of `method` from the SFT model on the quickstart's pairs, into `out`."""
    from preftune.config import TrainConfig
    from preftune.losses import parse_objective

    if art.pairs_path is None:
        raise ConfigError(
            f"quickstart: {method} trains on pairs, but {art.out_dir} was prepared without them"
        )
    terms = parse_objective(method)
    hparams = {"beta": cfg.beta} if any("beta" in spec.hparams for spec, _ in terms) else {}
    return TrainConfig(
        method=method, model=str(art.sft_dir), data=str(art.pairs_path), eval_data=str(art.eval_pairs_path),
        out=str(out), hparams=hparams, max_steps=cfg.max_steps, batch_size=cfg.batch_size, lr=cfg.lr,
        seed=seed, cache_dir=str(art.out_dir / "cache"), eval_every=max(1, cfg.max_steps // 6),
        progress=progress, report=False,  # the quickstart's report is written with the held-out accuracy
    )  # fmt: skip


def online_overrides(method: str, cfg: QuickstartConfig) -> dict[str, Any]:
    """The config values of online `method` on the task that differ from the shared `online_settings`
    (the quickstart's and a sweep's). ReMax decodes one greedy response per prompt for its baseline:
    G − 1 samples + the greedy one keep its completions per step equal to the other methods' G (the
    same completion budget)."""
    from preftune.online_methods import PRESETS

    if not PRESETS[method.strip()].greedy_baseline or cfg.num_generations <= 2:
        return {}
    return {"num_generations": cfg.num_generations - 1}


def _online_config(
    method: str, art: Artifacts, cfg: QuickstartConfig, seed: int, progress: bool, **extra: Any
) -> Any:
    """The run of an online method from the SFT model (`online_settings`, `online_overrides`,
    `online_hparams`); `extra`: more config values (RTO's `dpo_model`)."""
    from preftune.config import TrainConfig

    settings = {
        **online_settings(cfg, art.task, Path(str(art.prompts_path))),
        **online_overrides(method, cfg),
    }
    return TrainConfig(
        method=method, model=str(art.sft_dir), out=str(art.out_dir), seed=seed, progress=progress,
        report=False, hparams=online_hparams(method, cfg), **settings, **extra,
    )  # fmt: skip
