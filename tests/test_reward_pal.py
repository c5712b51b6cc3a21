"""PAL (PAL-A, PAL-B): ideal points from K prototypes, per-user mixtures, new users fitted on W only."""

from __future__ import annotations

import math

import pytest
import torch

from preftune.errors import ConfigError, DataError
from preftune.reward.pal import (
    Comparisons,
    PALModel,
    fit_new_user,
    fit_pal,
    pal_accuracy,
    pal_loss,
    synthetic_groups,
    user_ids,
)

pytestmark = pytest.mark.usefixtures("one_thread")

DIM = 8


def test_scores_by_hand():
    m = PALModel(2, users=2, k=2, pref_dim=2, variant="a", score="distance")
    with torch.no_grad():
        m.item.weight.copy_(torch.eye(2))
        m.item.bias.zero_()
        m.prototypes.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        m.user_logits.copy_(torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]]))  # w = (½, ½), (¾, ¼)
    users, x = torch.tensor([0, 1]), torch.zeros(2, 2)
    y = torch.tensor([[0.5, 0.5], [0.0, 0.0]])
    torch.testing.assert_close(m.mixtures(users), torch.tensor([[0.5, 0.5], [0.75, 0.25]]))
    torch.testing.assert_close(m(users, x, y), torch.tensor([0.0, -math.sqrt(0.75**2 + 0.25**2)]))
    m.score_kind = "cosine"  # τ · cos: τ = 1/0.07, y ∥ a for user 0
    torch.testing.assert_close(m(users[:1], x[:1], y[:1]), torch.tensor([1 / 0.07]))
    data = Comparisons(users[:1], x[:1], y[:1], y[:1])
    assert float(pal_loss(m, data).detach()) == pytest.approx(math.log(2))  # equal scores: log 2


def test_pal_b_beats_a_single_bradley_terry_model_on_synthetic_groups():
    train, test = synthetic_groups(1500, 10, seed=1), synthetic_groups(1000, 10, seed=2)
    acc = {}
    for k in (1, 2):  # k = 1: one ideal point for everyone, a single Bradley–Terry model
        m = PALModel(DIM, users=10, k=k, variant="b", seed=0)
        fit_pal(m, train, steps=250, lr=0.03)
        acc[k] = pal_accuracy(m, test)
    assert acc[1] < 0.6 and acc[2] >= acc[1] + 0.10 and acc[2] > 0.85, acc
    # a new user of each group, fitted from 10 comparisons on their mixture weights alone
    shots = synthetic_groups(40, 2, seed=5)
    held = synthetic_groups(400, 2, seed=6)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for group in (0, 1):
        mine = (shots.users % 2 == group).nonzero().squeeze(1)[:10]
        uid = fit_new_user(m, shots.take(mine))
        rows = held.take((held.users % 2 == group).nonzero().squeeze(1))
        rows.users[:] = uid
        assert pal_accuracy(m, rows) > 0.8
    after = dict(m.named_parameters())
    for name, value in before.items():  # prototypes, maps and the old users' weights are untouched
        assert torch.equal(after[name][: value.shape[0]] if value.dim() else after[name], value), name


def test_pal_a_beats_a_single_ideal_point_on_synthetic_groups():
    train, test = (
        synthetic_groups(1500, 10, seed=1, prompt_dependent=False),
        synthetic_groups(1000, 10, seed=2, prompt_dependent=False),
    )
    acc = {}
    for k in (1, 2):
        m = PALModel(DIM, users=10, k=k, variant="a", score="distance", seed=0)
        fit_pal(m, train, steps=250, lr=0.03)
        acc[k] = pal_accuracy(m, test)
    assert acc[2] >= acc[1] + 0.10 and acc[2] > 0.9, acc


def test_user_column_and_bad_settings():
    ids, table = user_ids([{"user": "ann"}, {"user": 7}, {}, {"user": "ann"}])
    assert ids.tolist() == [0, 1, 2, 0] and table == {"ann": 0, "7": 1, "": 2}
    more, table2 = user_ids([{"user": "bob"}, {"user": "ann"}], known=table)
    assert more.tolist() == [3, 0] and table2["bob"] == 3
    with pytest.raises(DataError, match=r"pairs.jsonl:2: field 'user': is \[1\], expected a user name"):
        user_ids([{"user": "a"}, {"user": [1]}], path="pairs.jsonl")
    with pytest.raises(ConfigError, match="variant 'c'"):
        PALModel(4, users=1, variant="c")


def test_pairs_with_a_user_column_are_embedded_by_a_frozen_trunk(tmp_path):
    from preftune.models.load import load_causal_lm
    from preftune.models.tiny import save_tiny_model
    from preftune.reward.pal import pal_comparisons
    from preftune.tasks.arithmetic import ArithmeticTask
    from test_train_fixtures import write_jsonl

    tok = ArithmeticTask().build_tokenizer()
    model = load_causal_lm(str(save_tiny_model("llama", tmp_path / "lm", vocab_size=32, tokenizer=tok)))
    rows = [{"prompt": "1+2=\n", "chosen": "answer: 3", "rejected": "answer: 4", "user": "ann"},
            {"prompt": "22+1=\n", "chosen": "answer: 23", "rejected": "answer: 2", "user": "bob"}]  # fmt: skip
    data, table = pal_comparisons(str(write_jsonl(tmp_path / "p.jsonl", rows)), model, tok)
    assert table == {"ann": 0, "bob": 1} and data.users.tolist() == [0, 1]
    with torch.no_grad():  # e_y: the last hidden state of prompt + response + EOS, in a row of its own
        ids = tok("22+1=\nanswer: 2", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        h = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
    torch.testing.assert_close(data.rejected[1], h[-1], atol=1e-5, rtol=0)
    torch.testing.assert_close(data.prompts[1], h[5], atol=1e-5, rtol=0)  # "22+1=\n" ends at index 5
    bad = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "1+2=\n", "chosen": "a"}])
    with pytest.raises(DataError, match=r"b.jsonl:1: field 'rejected': is missing or not text"):
        pal_comparisons(str(bad), model, tok)
