"""Process reward models: step data, step scores at step ends (packed = own forward), losses, labels."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from preftune.errors import ConfigError, DataError
from preftune.models.tiny import save_tiny_model
from preftune.reward.prm import aggregate_steps, pav_mse, prm_bce, score_encoded, step_scores
from preftune.reward.prm_data import encode_steps, parse_record, read_prm_data
from preftune.reward.prm_labels import (
    character_record,
    math_shepherd_labels,
    mc_values,
    pav_targets,
    verifier_record,
)
from preftune.reward.scoring import load_scorer
from preftune.tasks.arithmetic import ArithmeticTask
from test_train_fixtures import write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


def test_records_become_labels_with_the_math_shepherd_meaning():
    a = parse_record({"prompt": "p", "steps": ["a", "b", "c", "d"], "first_error": 1})
    assert a.labels == (1.0, 0.0, 0.0, 0.0) and a.first_error == 1
    b = parse_record({"problem": "p", "steps": ["a", "b"], "label": -1, "id": "x", "generator": "g"})
    assert b.labels == (1.0, 1.0) and b.first_error == -1 and b.prompt == "p"
    c = parse_record({"prompt": "p", "steps": ["a", "b", "c"], "labels": [1, 0, 1]})
    assert c.first_error == 1 and c.labels == (1.0, 0.0, 1.0)
    d = parse_record({"prompt": "p", "steps": ["a", "b"], "labels": [0.75, 0.25]})
    assert d.first_error is None and d.labels == (0.75, 0.25)
    # TRL's stepwise supervision (PRMTrainer): the steps as `completions`, boolean labels
    trl = parse_record({"prompt": "p", "completions": ["a", "b", "c"], "labels": [True, False, True]})
    assert trl == parse_record({"prompt": "p", "steps": ["a", "b", "c"], "labels": [1, 0, 1]})
    with pytest.raises(DataError, match="field 'completions': is list"):
        parse_record({"prompt": "p", "completions": [], "labels": []})


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "p", "steps": ["a", "b"], "labels": [1]},
         "data.jsonl:2: field 'labels': has 1 labels for 2 steps — give one label per step"),
        ({"prompt": "p", "steps": ["a", "b"], "first_error": 2},
         "data.jsonl:2: field 'first_error': is 2, expected -1 (no wrong step) or a step index in [0, 1]"),
        ({"prompt": "p", "steps": ["a"], "labels": [1], "label": 0},
         "data.jsonl:2: field 'labels': labels given twice (labels, label)"),
        ({"prompt": "p", "steps": [], "labels": []}, "data.jsonl:2: field 'steps': is list"),
        ({"steps": ["a"], "labels": [1]}, "data.jsonl:2: field 'prompt': is missing or not text"),
        ({"prompt": "p", "steps": ["a"], "labels": ["yes"]},
         "data.jsonl:2: field 'labels': label 0 is 'yes', expected a finite number"),
    ],
)  # fmt: skip
def test_bad_records_name_file_row_and_field(tmp_path, record, message):
    path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "p", "steps": ["a"], "labels": [1]}, record])
    with pytest.raises(DataError) as info:
        read_prm_data(str(path))
    assert str(info.value).replace(str(tmp_path) + "/", "").startswith(message)


def test_every_bad_step_row_is_listed_at_once(tmp_path):
    """Training stopped at the first bad row; a fix-and-rerun loop per row is what a list spares."""
    rows = [{"prompt": "p", "steps": ["a"], "labels": [1]}, {"prompt": "p", "steps": ["a", "b"], "labels": [1]},
            {"prompt": "p", "steps": [], "first_error": -1}, {"prompt": "p", "steps": ["a"], "first_error": 3}]  # fmt: skip
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(DataError) as info:
        read_prm_data(str(path))
    text = str(info.value)
    assert text.startswith(f"3 problems in step data {path}:")
    assert all(f"data.jsonl:{row}: field" in text for row in (2, 3, 4))


@pytest.fixture(scope="module")
def prm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("prm")
    tok = ArithmeticTask().build_tokenizer()
    out = {}
    for arch in ("llama", "qwen2"):
        lm = save_tiny_model(arch, root / f"{arch}-lm", vocab_size=32, tokenizer=tok,
                             config_overrides={"initializer_range": 0.3})  # fmt: skip
        torch.manual_seed(0)
        load_scorer(lm).save_pretrained(root / arch)
        tok.save_pretrained(root / arch)
        out[arch] = root / arch
    return out, tok


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_step_scores_equal_the_classifiers_forward_at_each_step_end(prm_dirs, arch):
    dirs, tok = prm_dirs
    model = AutoModelForSequenceClassification.from_pretrained(dirs[arch])
    sols = [("12+9=\n", ["2+9+0=11 r1", "1+0+1=2 r21", "answer: 21"]),
            ("12+9=\n", ["2+9+0=10 r0", "answer: 20"]),
            ("7*3=\n", ["7*3+0=21 r21", "answer: 21"])]  # fmt: skip
    enc = [encode_steps(tok, p, s) for p, s in sols]
    assert enc[0].prompt_ids == tok("12+9=\n", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        packed = torch.cat(score_encoded(model, enc))
        padded = torch.cat(score_encoded(model, enc, pack=False))
        ref = []
        for e in enc:  # the classifier's own forward on each prefix ending at a step end
            for end in e.ends:
                ids = torch.tensor([e.prompt_ids + e.response_ids[: end + 1]])
                ref.append(model(input_ids=ids).logits.item())
    ref_t = torch.tensor(ref)
    assert packed.shape == (7,) and ref_t.std() > 0.05
    torch.testing.assert_close(packed, ref_t, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded, ref_t, atol=1e-5, rtol=0)


def test_step_scores_with_two_branches_share_the_prompt(prm_dirs):
    dirs, _ = prm_dirs
    model = load_scorer(dirs["llama"])
    prompts = [[5, 6, 7]]
    with torch.no_grad():
        both = step_scores(model, prompts, [[[8, 9, 10], [11, 12]]], [[[0, 2], [1]]])
        one = step_scores(model, prompts, [[[11, 12]]], [[[1]]])
    torch.testing.assert_close(both[2:], one, atol=1e-5, rtol=0)


def test_losses_and_aggregations_by_hand():
    s = torch.tensor([0.0, 0.0, math.log(3.0)])
    y = torch.tensor([1.0, 0.5, 1.0])
    torch.testing.assert_close(prm_bce(s, y), torch.tensor([math.log(2), math.log(2), math.log(4 / 3)]))
    torch.testing.assert_close(pav_mse(torch.tensor([0.5, -1.0]), torch.tensor([0.25, 0.0])),
                               torch.tensor([0.0625, 1.0]))  # fmt: skip
    v = torch.tensor([0.9, 0.2, 0.7])
    got = [float(aggregate_steps(v, h)) for h in ("min", "last", "sum", "mean", "prod")]
    assert got == pytest.approx([0.2, 0.7, 1.8, 0.6, 0.126])


def test_verifier_record_labels_the_first_wrong_line():
    rec = verifier_record("12+9=\n", "2+9+0=11 r1\n1+0+1=3 r31\nanswer: 31")
    assert rec == {
        "prompt": "12+9=\n",
        "steps": ["2+9+0=11 r1", "1+0+1=3 r31", "answer: 31"],
        "first_error": 1,
    }
    assert verifier_record("12+9=\n", "2+9+0=11 r1\n1+0+1=2 r21\nanswer: 21")["first_error"] == -1
    # a response that stops early: the error (the missing line) goes on the last line written
    assert verifier_record("12+9=\n", "2+9+0=11 r1")["first_error"] == 0


def test_character_record_labels_up_to_the_first_departing_character():
    right = ["2+9+0=11 r1", "1+0+1=2 r21", "answer: 21"]
    rec = character_record("12+9=\n", right)
    assert "".join(rec["steps"]) == "2+9+0=11 r1\n1+0+1=2 r21\nanswer: 21\n"
    assert rec["labels"] == [1] * 35
    # value 12 for 11: "2+9+0=1" (7 characters) still agrees, the 8th departs; the line's own
    # separator (index 11) carries the line's label 0, every later character 0 too
    wrong = character_record("12+9=\n", ["2+9+0=12 r2", "1+0+1=2 r22", "answer: 22"])["labels"]
    assert wrong == [1] * 7 + [0] * 28
    assert character_record("12+9=\n", ["2+9+0=11 r1", "answer: 1"])["labels"][:12] == [1] * 12
    # stopped after the first line: the missing rest is an error at the last character (the separator)
    assert character_record("12+9=\n", ["2+9+0=11 r1"])["labels"] == [1] * 11 + [0]
    with pytest.raises(ConfigError, match="non-empty"):
        character_record("12+9=\n", [])


def test_monte_carlo_labels_and_pav_targets_by_hand():
    prompt, steps = "12+9=\n", ["2+9+0=11 r1", "1+0+1=2 r21", "answer: 21"]
    right = {"": "2+9+0=11 r1\n1+0+1=2 r21\nanswer: 21", "2+9+0=11 r1\n": "1+0+1=2 r21\nanswer: 21",
             "2+9+0=11 r1\n1+0+1=2 r21\n": "answer: 21"}  # fmt: skip
    calls = []

    def rollout(prompts, prefixes, n):  # completion j of a prefix is right for j < (number of steps) + 1
        calls.append(list(prefixes))
        return [[right[q] if j <= q.count("\n") else "answer: 0" for j in range(n)] for q in prefixes]

    values = mc_values([prompt], [steps], rollout, n=4)
    assert calls == [["", "2+9+0=11 r1\n", "2+9+0=11 r1\n1+0+1=2 r21\n"]]
    assert values == [[0.25, 0.5, 0.75, 1.0]]  # the full solution is checked as it stands
    assert math_shepherd_labels(values[0], "hard") == [1.0, 1.0, 1.0]
    assert math_shepherd_labels(values[0], "soft") == [0.5, 0.75, 1.0]
    assert pav_targets([0.5, 0.75, 0.0, 0.0]) == pytest.approx([0.25, -0.75, 0.0])
    # Best-of-2 prover: V = 1 − (1 − p)² = [0.75, 0.9375, 0, 0]
    assert pav_targets([0.5, 0.75, 0.0, 0.0], prover_k=2) == pytest.approx([0.1875, -0.9375, 0.0])


def test_steps_split_at_the_separator_and_their_last_characters():
    from preftune.reward.prm_reward import split_steps, step_end_chars

    assert split_steps("ab\n\ncd\n") == ["ab", "cd"] and split_steps("x;y", ";") == ["x", "y"]
    assert step_end_chars("ab\n\ncd\n") == [1, 5] and step_end_chars("2+9 r1\nanswer: 11") == [5, 16]


@pytest.fixture(scope="module")
def prm_folder(prm_dirs, tmp_path_factory):
    import json
    import shutil

    dirs, _ = prm_dirs
    folder = tmp_path_factory.mktemp("prmfolder") / "final"
    shutil.copytree(dirs["llama"], folder)
    (folder / "prm.json").write_text(
        json.dumps({"loss": "prm_bce", "separator": "\n", "aggregation": "last"})
    )
    return folder


def test_a_prm_folder_is_a_reward_with_its_aggregation(prm_folder):
    from preftune.reward import load_reward
    from preftune.reward.prm_reward import PRMRewardFn

    prompts = ["12+9=\n", "12+9=\n", "7*3=\n"]
    completions = ["2+9+0=11 r1\n1+0+1=2 r21\nanswer: 21", "2+9+0=10 r0\nanswer: 20", ""]
    prm = PRMRewardFn(prm_folder)
    tok = prm.tokenizer
    enc = [encode_steps(tok, p, c.split("\n")) for p, c in zip(prompts[:2], completions[:2])]
    with torch.no_grad():
        probs = [torch.sigmoid(s).double() for s in score_encoded(prm.model, enc)]
    assert prm.step_values(prompts, completions)[2] == []  # no steps: no values, reward 0
    for how in ("min", "last", "sum"):
        got = load_reward(f"prm:{how}:{prm_folder}:2")(prompts, completions)
        want = [float(getattr(p, how)() if how != "last" else p[-1]) for p in probs]
        torch.testing.assert_close(
            got, 2 * torch.tensor([*want, 0.0], dtype=torch.float64), atol=1e-6, rtol=0
        )
    plain = load_reward(str(prm_folder))(prompts, completions)  # the folder's own aggregation: last
    torch.testing.assert_close(plain[:2], torch.stack([p[-1] for p in probs]), atol=1e-6, rtol=0)


def test_token_rewards_sit_on_the_last_token_of_each_step(prm_folder):
    from preftune.reward.prm_reward import PRMRewardFn

    prm = PRMRewardFn(prm_folder, aggregation="min")
    text = "2+9+0=11 r1\nanswer: 11"
    (values,) = prm.step_values(["12+9=\n"], [text])
    (rewards,) = prm.token_rewards(["12+9=\n"], [text], prm.tokenizer)
    assert len(rewards) == len(text)  # one character per token
    assert rewards[10] == values[0] and rewards[21] == values[1] and sum(r != 0 for r in rewards) == 2
    last = PRMRewardFn(prm_folder, aggregation="last").token_rewards(["12+9=\n"], [text], prm.tokenizer)[0]
    assert last[21] == values[1] and sum(r != 0 for r in last) == 1


def test_step_dpo_records_from_step_values_by_hand():
    from preftune.reward.prm_reward import step_records_from_values

    samples = [["a\nb\nc", "a\nB\nc", "a\nb2\nd", "x\ny"]]
    values = [[[0.9, 0.2, 0.9], [0.9, 0.8, 0.7], [0.9, 0.6, 0.1], [0.3, 0.9]]]
    records = step_records_from_values(["P\n"], samples, values, threshold=0.5)
    # sample 0 fails at step 1 ("b"): samples 1 and 2 share step 0 and pass step 1 → B, b2
    # sample 2 fails at step 2 ("d"): sample 1 shares "a", but its step 1 differs → no alternative
    # sample 3 fails at step 0 ("x"): samples 0-2 pass step 0 with "a"
    assert records == [
        {"prompt": "P\n", "steps": ["a", "b", "c"], "first_error": 1, "correct_steps": ["B", "b2"]},
        {"prompt": "P\n", "steps": ["x", "y"], "first_error": 0, "correct_steps": ["a"]},
    ]


def test_prm_step_pairs_are_step_dpo_pairs(prm_folder):
    from preftune.reward.prm_reward import PRMRewardFn, prm_step_pairs

    prm = PRMRewardFn(prm_folder)
    samples = [["2+9+0=11 r1\nanswer: 21", "2+9+0=10 r0\nanswer: 20"]]
    (v0, v1) = prm.step_values(["12+9=\n"] * 2, samples[0])
    threshold = (v0[0] + v1[0]) / 2  # step 0 of the sample with the lower value is the wrong one
    pairs = prm_step_pairs(prm, ["12+9=\n"], samples, threshold=threshold)
    good, bad = ("2+9+0=11 r1", "2+9+0=10 r0") if v0[0] > v1[0] else ("2+9+0=10 r0", "2+9+0=11 r1")
    assert pairs == [{"prompt": "12+9=\n", "chosen": good, "rejected": bad}]


def test_label_samples_by_each_method():
    from preftune.reward.prm_labels import label_samples

    prompt, sample = "12+9=\n", "2+9+0=11 r1\n1+0+1=3 r31\nanswer: 31"

    def rollout(prompts, prefixes, n):  # right only from the bare prompt (half the time)
        return [["2+9+0=11 r1\n1+0+1=2 r21\nanswer: 21" if q == "" and j % 2 else "answer: 0" for j in range(n)]
                for q in prefixes]  # fmt: skip

    assert label_samples([prompt], [sample]) == [
        {"prompt": prompt, "steps": sample.split("\n"), "first_error": 1}
    ]
    # V̂ = [0.5 (bare prompt), 0 (after step 0), 0, 0 (the full, wrong solution)]
    hard = label_samples([prompt], [sample], "mc_hard", rollout=rollout, n=4)
    assert hard[0]["labels"] == [0.0, 0.0, 0.0]
    pav = label_samples([prompt], [sample], "pav", rollout=rollout, n=4, prover_k=2)
    assert pav[0]["labels"] == pytest.approx([-0.75, 0.0, 0.0])  # V^BoK2: 1 − 0.5² = 0.75 → 0
    with pytest.raises(ConfigError, match="need a rollout"):
        label_samples([prompt], [sample], "mc_soft")


def _char_rollouts(tok, texts):
    """Rollouts of `texts` as the policy would have sampled them (one token per character)."""
    from preftune.rl.rollout import Rollouts

    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, ids))
    pad = torch.tensor([i + [0] * (width - len(i)) for i in ids])
    return ids, Rollouts(
        completion_ids=pad, mask=torch.arange(width)[None, :] < torch.tensor([len(i) for i in ids])[:, None],
        logps=torch.zeros(len(ids), width), min_logits=torch.full((len(ids), width), float("-inf")),
        prompt_index=torch.zeros(len(ids), dtype=torch.long), finished=torch.zeros(len(ids), dtype=torch.bool),
        weight_version=0, temperature=1.0,
    )  # fmt: skip


def test_prm_step_rewards_sit_on_step_end_tokens_and_gae_returns_them_by_hand(prm_dirs, prm_folder):
    """prm:steps: step k's value v_k on the token of the step's last character; with γ = λ = 1, V = 0
    and no KL, GAE's return at token t is Σ_{k: e_k ≥ t} w·v_k plus the other terms' reward."""
    from online_fixtures import digits_reward
    from preftune.models.load import load_causal_lm
    from preftune.reward import load_reward
    from preftune.reward.prm_reward import PRMRewardFn
    from preftune.rl.ppo import TokenCredit, attach_value_head

    dirs, tok = prm_dirs
    lm = dirs["llama"].parent / "llama-lm"
    policy = load_causal_lm(str(lm))
    attach_value_head(policy)  # zero-initialised: V = 0
    prompts = ["12+9=\n", "12+9=\n"]
    texts = ["2+9+0=11 r1\nanswer: 11", "2+9+0=10 r0\n1+0+1=2 r20\nanswer: 20"]
    reward = load_reward([(f"prm:steps:{prm_folder}", 0.5), (digits_reward, 1.0)])
    ids, out = _char_rollouts(tok, texts)
    v = PRMRewardFn(prm_folder).step_values(prompts, texts)
    digits = [sum(c.isdigit() for c in t) for t in texts]
    scalar = reward(prompts, texts)
    torch.testing.assert_close(
        scalar, torch.tensor([0.5 * sum(v[i]) + digits[i] for i in range(2)], dtype=torch.float64)
    )
    steps = reward.token_rewards(prompts, texts, ids, tok)
    # "2+9+0=11 r1" ends at character 10, "answer: 11" at 21; the second text's steps end at 10, 22, 33
    ends = [[10, 21], [10, 22, 33]]
    for i in range(2):
        want = torch.zeros(steps.shape[1])
        for e, x in zip(ends[i], v[i]):
            want[e] = 0.5 * x
        torch.testing.assert_close(steps[i], want)
    credit = TokenCredit(load_causal_lm(str(lm)), kl_coef=0.0, gamma=1.0, lam=1.0, whiten=False)
    prompt_ids = [tok(prompts[0], add_special_tokens=False)["input_ids"]]
    result = credit(policy, prompt_ids, out, scalar, seed=0, step_rewards=steps)
    for i in range(2):
        n = len(texts[i])
        want = torch.tensor(
            [sum(0.5 * x for e, x in zip(ends[i], v[i]) if e >= t) + digits[i] for t in range(n)]
        )
        torch.testing.assert_close(result.meta["returns"][i, :n], want, atol=1e-6, rtol=0)
        torch.testing.assert_close(result.advantages[i, :n], want, atol=1e-6, rtol=0)  # V = 0
    # without step rewards the whole reward sits on the last token: the same return at token 0
    plain = credit(policy, prompt_ids, out, scalar, seed=0)
    torch.testing.assert_close(plain.meta["returns"][:, 0], result.meta["returns"][:, 0])


def test_ppo_phase_takes_prm_step_rewards_per_token(prm_dirs, prm_folder, tmp_path):
    """An online PPO batch with reward prm:steps: each sample's returns (γ = λ = 1, V = 0, no KL) are
    the reward-to-go of its step rewards, and at token 0 the whole reward."""
    from preftune.models.load import load_causal_lm
    from preftune.reward import load_reward
    from preftune.rl.phase import OnlinePhase
    from preftune.rl.ppo import TokenCredit, attach_value_head
    from preftune.rl.prompts import load_prompts
    from preftune.rl.sampling import Sampling

    dirs, tok = prm_dirs
    lm = str(dirs["llama"].parent / "llama-lm")
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "12+9=\n"}, {"prompt": "7*3=\n"}])
    policy = load_causal_lm(lm)
    attach_value_head(policy)
    reward = load_reward(f"prm:steps:{prm_folder}")
    credit = TokenCredit(load_causal_lm(lm), kl_coef=0.0, gamma=1.0, lam=1.0, whiten=False)
    phase = OnlinePhase(
        0, load_prompts(str(tmp_path / "prompts.jsonl"), tok), 2, 2, 0, reward, tok, "gae", 3,
        Sampling(max_new_tokens=24), credit=credit,
    )  # fmt: skip
    phase.attach(policy)
    placed_any = 0
    for ex in phase.batch(0):
        texts = [tok.decode(c, skip_special_tokens=True) for c in ex.response_ids]
        prompts = [tok.decode(ex.prompt_ids, skip_special_tokens=True)] * len(texts)
        steps = reward.token_rewards(prompts, texts, ex.response_ids, tok)
        for i, ids in enumerate(ex.response_ids):
            r = steps[i, : len(ids)]
            placed_any += int((r[:-1] != 0).sum())
            want = r.flip(0).cumsum(0).flip(0) + (float(ex.meta["rewards"][i]) - float(r.sum()))
            torch.testing.assert_close(ex.meta["returns"][i, : len(ids)], want, atol=1e-5, rtol=0)
    assert placed_any > 0  # some sampled step ended before a completion's last token
