"""A LoRA run's final/: the adapter names its base by absolute path (it loads from any folder), and
--merge-lora saves the merged full model, whose log-probs equal the adapter model's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from preftune.cli import main
from test_train_fixtures import pair_rows, tiny_model, write_jsonl


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lora")
    tiny_model(root / "model")
    write_jsonl(root / "pairs.jsonl", pair_rows(8))
    return root


def train(root: Path, out: str, *extra: str) -> int:
    # relative paths, as a user in the project folder types them
    argv = ["train", "dpo", "--model", "model", "--data", "pairs.jsonl", "--out", out, "--lora"]
    argv += ["--cache-dir", "cache", "--no-progress", "--lr", "1e-2", "--batch-size", "4", "--max-steps", "2"]
    return main([*argv, *extra])


def logps(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]


IDS = torch.tensor([[1, 5, 9, 13, 7, 21, 30, 2]])


def test_adapter_records_absolute_base_and_loads_from_another_folder(root, tmp_path, monkeypatch):
    monkeypatch.chdir(root)
    assert train(root, "run") == 0
    final = root / "run" / "final"
    cfg = json.loads((final / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str((root / "model").resolve())
    monkeypatch.chdir(tmp_path)  # "model" does not exist here
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(str(final))
    assert torch.isfinite(logps(model, IDS)).all()


def test_merge_lora_saves_the_merged_model(root, tmp_path, monkeypatch):
    monkeypatch.chdir(root)
    assert train(root, "merged", "--merge-lora") == 0
    final = root / "merged" / "final"
    assert (final / "config.json").is_file() and not (final / "adapter_config.json").exists()
    assert (final / "adapter" / "adapter_config.json").is_file() and (final / "tokenizer.json").is_file()
    monkeypatch.chdir(tmp_path)
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(final)).eval()
    adapter = AutoPeftModelForCausalLM.from_pretrained(str(final / "adapter")).eval()
    base = AutoModelForCausalLM.from_pretrained(str(root / "model")).eval()
    a, m = logps(adapter, IDS), logps(merged, IDS)
    assert (a - m).abs().max().item() < 1e-5
    assert (logps(base, IDS) - m).abs().max().item() > 1e-4  # the adapter moved the weights
    assert not any("lora" in k for k in merged.state_dict())


def test_merge_lora_needs_lora(root, monkeypatch, capsys):
    monkeypatch.chdir(root)
    argv = ["train", "dpo", "--model", "model", "--data", "pairs.jsonl", "--out", "x", "--merge-lora"]
    assert main(argv) == 2
    assert (
        "merge_lora merges LoRA adapters into the weights; it needs lora=true (--lora)"
        in capsys.readouterr().err
    )
