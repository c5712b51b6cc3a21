"""The built-in arithmetic task as a sweep's substrate: the quickstart's SFT model, pairs and held-out prompts.

`builtin_task(folder)` runs the quickstart's preparation once (SFT from scratch, self-sampled and
verifier-labelled pairs, held-out prompts, the SFT model's accuracy) and records what it made in
`folder/task.json`; a later sweep into the same folder with the same seed and the same quickstart
recipe (QuickstartConfig, apart from the training schedules: `SCHEDULE` and the `online_*` fields)
reuses it instead of training the SFT model again.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from preftune.errors import ConfigError
from preftune.eval.sweep import SweepTask

MANIFEST = "task.json"


def _quickstart() -> Any:
    try:
        return importlib.import_module("preftune.tasks.quickstart")
    except ImportError as err:
        raise ConfigError(
            f"sweep: the built-in arithmetic task is not available ({err}) — pass --model and --data"
        ) from err


# QuickstartConfig fields that only schedule the training after the preparation (the preference run's
# and the online runs'): a sweep's prepared task is reused when they differ
SCHEDULE = ("max_steps", "batch_size", "lr", "beta", "num_generations", "threads")


def _preparation(recipe: dict[str, Any]) -> dict[str, Any]:
    """The part of a quickstart recipe that the preparation (SFT, pairs, held-out prompts) reads."""
    return {k: v for k, v in recipe.items() if k not in SCHEDULE and not k.startswith("online_")}


def _prepared(folder: Path, seed: int, log: Callable[[str], None]) -> dict[str, Any]:
    """The manifest of a preparation in `folder`: reused when it matches `seed`, else made now."""
    quickstart = _quickstart()
    qcfg = quickstart.QuickstartConfig()
    fields = dataclasses.asdict(qcfg) if dataclasses.is_dataclass(qcfg) and not isinstance(qcfg, type) else {}
    recipe = json.loads(json.dumps(fields, default=str))  # as it reads back from task.json
    path = folder / MANIFEST
    if path.is_file():
        manifest = json.loads(path.read_text(encoding="utf-8"))
        paths = [manifest.get(k, "") for k in ("sft_dir", "pairs_path", "eval_pairs_path")]
        same = manifest.get("seed") == seed and _preparation(manifest.get("recipe", recipe)) == _preparation(
            recipe
        )
        if same and all(p and Path(p).exists() for p in paths):
            log(f"sweep: reusing the prepared task in {folder} (SFT model and pairs; delete it to rebuild)")
            return dict(manifest)
    art = quickstart.prepare(folder, seed=seed, config=qcfg, log=log)
    manifest = {
        "seed": seed,
        "recipe": recipe,
        "level": art.task.level,
        "ops": art.task.ops,
        "sft_dir": str(art.sft_dir),
        "pairs_path": str(art.pairs_path),
        "eval_pairs_path": str(art.eval_pairs_path),
        "prompts_path": str(art.prompts_path),
        "heldout_prompts": list(art.heldout_prompts),
        "accuracy_before": art.stats["accuracy_before"],
    }
    path.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return manifest


def builtin_task(
    folder: Path, *, seed: int, log: Callable[[str], None] = print
) -> tuple[dict[str, Any], SweepTask]:
    """(config values, SweepTask) of the built-in arithmetic task.

    Config values: model (the SFT folder), data (pairs), eval_data (held-out pairs) and the quickstart's
    schedule (max_steps, batch_size, lr, eval_every); loss hyper-parameters stay at each method's
    paper default. The task's accuracy is greedy accuracy on the held-out prompts, its baseline the SFT
    model's; its prompts (for the KL estimate) are those prompts tokenized as the quickstart samples them.
    """
    from transformers import AutoTokenizer

    from preftune.tasks.arithmetic import ArithmeticTask
    from preftune.tasks.sft import encode

    quickstart = _quickstart()
    manifest = _prepared(folder, seed, log)
    qcfg = quickstart.QuickstartConfig()
    task_obj = ArithmeticTask(level=manifest["level"], ops=manifest["ops"])
    heldout: list[str] = list(manifest["heldout_prompts"])
    tokenizer = AutoTokenizer.from_pretrained(manifest["sft_dir"])

    def accuracy(final_dir: Path) -> float:
        return float(quickstart.evaluate_accuracy(final_dir, task_obj, heldout, greedy=True))

    values = {
        "model": manifest["sft_dir"],
        "data": manifest["pairs_path"],
        "eval_data": manifest["eval_pairs_path"],
        "max_steps": qcfg.max_steps,
        "batch_size": qcfg.batch_size,
        "lr": qcfg.lr,
        "eval_every": max(1, qcfg.max_steps // 6),
        "seed": seed,
    }
    task = SweepTask(
        prompts=[encode(tokenizer, p)[0] for p in heldout],
        accuracy=accuracy,
        baseline_accuracy=float(manifest["accuracy_before"]["greedy"]),
        name=f"{len(heldout)} held-out arithmetic prompts (greedy accuracy)",
        online=online_values(folder, manifest, qcfg, task_obj),
        online_hparams=online_method_hparams(qcfg),
        online_overrides=online_method_overrides(qcfg),
    )
    return values, task


def online_method_hparams(qcfg: Any) -> dict[str, dict[str, Any]]:
    """Each online method's options on the task (`quickstart.online_hparams`: RAFT keeps the correct
    samples, the pair methods take the quickstart's β), where it has any."""
    from preftune.online_methods import PRESETS

    hparams = getattr(_quickstart(), "online_hparams", None)
    if hparams is None:
        return {}
    return {m: h for m in PRESETS if (h := hparams(m, qcfg))}


def online_method_overrides(qcfg: Any) -> dict[str, dict[str, Any]]:
    """Each online method's config values on the task that replace the shared ones
    (`quickstart.online_overrides`: ReMax's G − 1 samples), where it has any."""
    from preftune.online_methods import PRESETS

    overrides = getattr(_quickstart(), "online_overrides", None)  # a stand-in module may lack it
    return {m: o for m in PRESETS if (o := overrides(m, qcfg))} if overrides else {}


def online_values(folder: Path, manifest: dict[str, Any], qcfg: Any, task: Any) -> dict[str, Any]:
    """What the online methods of a sweep on the built-in task train with: the quickstart's training
    prompts, the arithmetic verifier as reward and the quickstart's online schedule."""
    prompts = Path(manifest.get("prompts_path") or folder / "data" / "prompts.jsonl")
    return dict(_quickstart().online_settings(qcfg, task, prompts))
