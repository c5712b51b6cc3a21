"""Loading: tiny builders round-trip through from_pretrained; dtype, LoRA and path errors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from preftune.data.char_tokenizer import build_char_tokenizer
from preftune.errors import ConfigError
from preftune.models.load import LoraSettings, load_causal_lm
from preftune.models.tiny import TINY_ARCHS, save_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_model_round_trips_with_tokenizer(tmp_path, arch):
    tok = build_char_tokenizer()
    path = save_tiny_model(arch, tmp_path / arch, vocab_size=128, tokenizer=tok, seed=3)
    model = load_causal_lm(path)
    assert model.config.model_type == arch and model.config.vocab_size == 128
    assert model.config.eos_token_id == tok.eos_token_id == 2
    assert model.get_input_embeddings().weight.shape[1] == 32
    assert AutoTokenizer.from_pretrained(path).encode("ab") == tok.encode("ab")


def test_same_seed_same_weights_other_seed_other_weights_global_rng_untouched(tmp_path):
    first = load_causal_lm(save_tiny_model("gemma2", tmp_path / "g1", vocab_size=64, seed=3))
    again = load_causal_lm(save_tiny_model("gemma2", tmp_path / "g2", vocab_size=64, seed=3))
    for (name, p), q in zip(first.named_parameters(), again.parameters()):
        assert torch.equal(p, q), name  # the weights depend on the seed only
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = load_causal_lm(save_tiny_model("llama", tmp_path / "a", vocab_size=64, seed=0))
    got = torch.rand(3)
    assert torch.equal(got, expected)
    b = load_causal_lm(save_tiny_model("llama", tmp_path / "b", vocab_size=64, seed=1))
    assert not torch.equal(a.lm_head.weight, b.lm_head.weight)


def test_dtype_bfloat16_and_bad_dtype(tmp_path):
    path = save_tiny_model("qwen2", tmp_path / "m", vocab_size=64)
    assert load_causal_lm(path, dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="dtype 'float8' is not supported"):
        load_causal_lm(path, dtype="float8")


def test_missing_paths_give_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such model folder"):
        load_causal_lm(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        load_causal_lm(tmp_path / "empty")
    with pytest.raises(ConfigError, match="unknown tiny architecture 'bert'"):
        save_tiny_model("bert", tmp_path / "b", vocab_size=64)


def test_lora_only_adapters_train(tmp_path):
    path = save_tiny_model("llama", tmp_path / "m", vocab_size=64)
    model = load_causal_lm(path, lora=LoraSettings(r=2, alpha=4.0, target_modules=["q_proj", "v_proj"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    # 2 layers × {q_proj, v_proj} × {lora_A, lora_B}
    assert len(trainable) == 8 and all("lora_" in n for n in trainable)
    with pytest.raises(ConfigError, match="rank must be ≥ 1"):
        LoraSettings(r=0)
    with pytest.raises(ConfigError, match="target_modules"):
        load_causal_lm(path, lora=LoraSettings(target_modules=["no_such_module"]))
