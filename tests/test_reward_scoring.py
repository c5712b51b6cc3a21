"""Prefix-shared reward-model scores equal the sequence classifier's own forward, one padded row each."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from preftune.data.char_tokenizer import build_char_tokenizer
from preftune.errors import DataError
from preftune.models.tiny import save_tiny_model
from preftune.reward.scoring import branch_scores, load_scorer

VOCAB = 104
ARCHS = ("llama", "qwen2", "mistral", "gemma")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def rm_dirs(tmp_path_factory):
    """Each architecture: a tiny causal LM → a reward model (new scalar head) saved with its tokenizer."""
    root = tmp_path_factory.mktemp("rm")
    tok = build_char_tokenizer()
    out = {}
    for arch in ARCHS:
        lm = save_tiny_model(
            arch,
            root / f"{arch}-lm",
            vocab_size=VOCAB,
            tokenizer=tok,
            config_overrides={"initializer_range": 0.3},
        )
        torch.manual_seed(0)
        rm = load_scorer(lm)
        rm.save_pretrained(root / arch)
        tok.save_pretrained(root / arch)
        out[arch] = root / arch
    return out


def _data(seed: int = 0):
    rng = random.Random(seed)
    prompts = [[1] + [rng.randrange(3, VOCAB) for _ in range(rng.randrange(2, 30))] for _ in range(4)]
    responses = [
        [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(1, 20))] for _ in range(k)]
        for k in (2, 1, 3, 2)
    ]
    return prompts, responses


def _hf_scores(model, prompts, responses):
    """Reference: the classifier's own forward on one right-padded row per (prompt, response)."""
    rows = [p + r for p, rs in zip(prompts, responses) for r in rs]
    width = max(len(r) for r in rows)
    pad = model.config.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return model(input_ids=ids, attention_mask=mask).logits[:, 0].float()


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_scores_equal_the_classifiers_own_forward(rm_dirs, arch):
    model = AutoModelForSequenceClassification.from_pretrained(rm_dirs[arch])
    tok = AutoTokenizer.from_pretrained(rm_dirs[arch])
    assert model.config.num_labels == 1 and tok.pad_token_id == model.config.pad_token_id
    prompts, responses = _data()
    with torch.no_grad():
        ref = _hf_scores(model, prompts, responses)
        packed = branch_scores(model, prompts, responses)
        padded = branch_scores(model, prompts, responses, pack=False)
        tight = branch_scores(model, prompts, responses, max_tokens_per_row=40)  # rows split differently
    assert ref.std() > 0.1  # scores differ, so equality has power
    for got in (packed, padded, tight):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_the_prompt_changes_the_score_so_the_mask_is_tested(rm_dirs):
    model = load_scorer(rm_dirs["llama"])
    prompts, responses = _data()
    with torch.no_grad():
        a = branch_scores(model, prompts[:1], [responses[0]])
        b = branch_scores(model, [prompts[0][:-1] + [5]], [responses[0]])
    assert (a - b).abs().max() > 1e-3


def test_gradients_match_the_padded_layout(rm_dirs):
    model = load_scorer(rm_dirs["qwen2"])
    prompts, responses = _data(1)
    params = [p for p in model.parameters() if p.requires_grad]
    weights = torch.arange(1.0, 9.0)
    g1 = torch.autograd.grad((branch_scores(model, prompts, responses) * weights).sum(), params)
    g2 = torch.autograd.grad((branch_scores(model, prompts, responses, pack=False) * weights).sum(), params)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_empty_response_is_a_data_error_naming_the_row(rm_dirs):
    model = load_scorer(rm_dirs["llama"])
    with pytest.raises(DataError, match=r"row 7.*empty response.*at least one token"):
        branch_scores(model, [[1, 5]], [[[6], []]], source_rows=[7])


def test_token_ids_outside_the_vocabulary_are_a_data_error_not_an_index_error(rm_dirs):
    """Ids of another tokenizer: named (example, part, id, the model's range), before the model runs —
    for the scorer and for `sequence_logps` alike."""
    from preftune.models.load import load_causal_lm
    from preftune.models.logprobs import sequence_logps

    model = load_scorer(rm_dirs["llama"])
    rows = model.get_input_embeddings().num_embeddings
    with pytest.raises(
        DataError, match=rf"example 1, response 0: token id {rows} is not in .*0\.\.{rows - 1}"
    ):
        branch_scores(model, [[1, 5], [2]], [[[6], [7]], [[rows], [3]]])
    with pytest.raises(DataError, match=r"example 0, prompt: token id -1"):
        branch_scores(model, [[1, -1]], [[[6]]])
    lm = load_causal_lm(rm_dirs["llama"])
    with pytest.raises(DataError, match=rf"example 0, response 1: token id {rows + 5}"):
        sequence_logps(lm, [[1, 5]], [[[6], [rows + 5]]])
    assert branch_scores(model, [[1, 5]], [[[6], [rows - 1]]]).shape == (2,)  # the last id is fine
