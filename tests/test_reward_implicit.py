"""The implicit reward model r = β log π_θ/π_ref (Yuan et al. 2024): scores by hand, partial sums, init, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from preftune.cli import main
from preftune.reward.implicit import ImplicitRM, load_implicit
from test_train_fixtures import pair_rows, tiny_model, unpaired_rows, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


def _own_logp(model, prompt: list[int], response: list[int]) -> float:
    """Σ_t log π(y_t | x, y_<t) from the model's own forward on prompt + response, one row."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    return sum(float(logp[len(prompt) - 1 + t, y]) for t, y in enumerate(response))


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("irm")
    ref = AutoModelForCausalLM.from_pretrained(tiny_model(root / "ref", seed=0)).eval()
    pol = AutoModelForCausalLM.from_pretrained(tiny_model(root / "pol", seed=1)).eval()
    return pol, ref


PROMPTS = [[1, 5, 7, 9], [2, 6]]
BRANCHES = [[[10, 11, 12], [13, 14], [10, 11, 15, 16]], [[20, 21, 22, 23, 24]]]


def test_score_is_beta_times_the_log_ratio_by_hand(two_models):
    pol, ref = two_models
    beta = 0.3
    got = ImplicitRM(pol, ref, beta).scores(PROMPTS, BRANCHES)
    want = [
        beta * (_own_logp(pol, p, b) - _own_logp(ref, p, b)) for p, bs in zip(PROMPTS, BRANCHES) for b in bs
    ]
    assert got.shape == (4,)
    torch.testing.assert_close(got, torch.tensor(want), atol=1e-5, rtol=0)
    assert float(got.detach().abs().min()) > 1e-3  # two different models: the check is not 0 = 0


def test_partial_sums_at_step_ends_add_up_to_the_outcome_score(two_models):
    pol, ref = two_models
    irm = ImplicitRM(pol, ref, 0.5)
    ends = [[[0, 2], [1], [1, 2, 3]], [[0, 3, 4]]]  # the last end of each response is its last token
    outcome = irm.scores(PROMPTS, BRANCHES)
    deltas = irm.step_values(PROMPTS, BRANCHES, ends, "delta").split([2, 1, 3, 3])
    q = irm.step_values(PROMPTS, BRANCHES, ends, "q").split([2, 1, 3, 3])
    for n in range(4):
        torch.testing.assert_close(deltas[n].sum(), outcome[n], atol=1e-5, rtol=0)
        torch.testing.assert_close(q[n][-1], outcome[n], atol=1e-5, rtol=0)
        torch.testing.assert_close(q[n], deltas[n].cumsum(0), atol=1e-6, rtol=0)
    # q at a step end is the partial sum by hand: response 0 up to its token 0
    p, b = PROMPTS[0], BRANCHES[0][0]
    want = 0.5 * (_own_logp(pol, p, b[:1]) - _own_logp(ref, p, b[:1]))
    assert abs(float(q[0][0].detach()) - want) < 1e-5


def test_at_init_every_score_is_zero_and_the_bt_loss_is_log_2(two_models):
    _, ref = two_models
    from preftune.reward.losses import parse_rm_loss

    irm = ImplicitRM(ref, ref, 0.1)  # θ = ref
    s = irm.scores(PROMPTS, BRANCHES).detach()
    assert float(s.abs().max()) < 1e-6  # 0 up to float rounding (one pass with autograd, one without)
    loss = parse_rm_loss("bt")(s[0:1], s[1:2], None)
    assert abs(float(loss) - math.log(2)) < 1e-6
    ends = [[[0, 2], [1], [3]], [[4]]]
    assert float(irm.step_values(PROMPTS, BRANCHES, ends).detach().abs().max()) < 1e-6
    with pytest.raises(Exception, match="β > 0"):
        ImplicitRM(ref, ref, 0.0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("irmrun")
    model = tiny_model(root / "sft")
    data = write_jsonl(root / "prefs.jsonl", pair_rows(16, seed=1))
    out = root / "run"
    args = ["train", "rm", "--model", str(model), "--data", str(data), "--out", str(out), "--head", "implicit",
            "--beta", "0.5", "--batch-size", "4", "--max-steps", "3", "--lr", "1e-2", "--save-every", "0",
            "--eval-data", str(data)]  # fmt: skip
    assert main(args) == 0
    return root, model, data, out


def test_trained_folder_is_self_describing_and_loads(run):
    root, model, data, out = run
    final = out / "final"
    settings = json.loads((final / "implicit.json").read_text())
    assert settings["beta"] == 0.5 and settings["loss"] == "bt" and settings["reference"] == "reference"
    assert settings["reference_source"] == str(Path(model).resolve())
    AutoModelForCausalLM.from_pretrained(final)  # the policy is a plain causal-LM folder
    irm, _ = load_implicit(final)
    # the copied reference is the starting model: its weights equal the source's
    src = AutoModelForCausalLM.from_pretrained(model).state_dict()
    for k, v in irm.reference.state_dict().items():
        assert torch.equal(v, src[k])
    # training moved the policy, so the scores are no longer 0; the run's eval equals preftune eval
    assert main(["eval", str(out), "--data", str(data)]) == 0
    ev = json.loads((out / "eval.json").read_text())["metrics"]
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last_eval = [r for r in logged if r.get("split") == "eval"][-1]
    assert abs(ev["accuracy"] - last_eval["accuracy"]) < 1e-9 and abs(ev["loss"] - last_eval["loss"]) < 1e-5
    assert ev["loss"] != pytest.approx(math.log(2), abs=1e-4)


def test_the_folder_is_a_reward_outcome_and_process(run):
    from preftune.data.formatting import load_tokenizer
    from preftune.reward import load_reward

    _, _, _, out = run
    final = out / "final"
    irm, _ = load_implicit(final)
    tok = load_tokenizer(str(final))
    prompts, completions = ["1+2=", "3+4="], ["3.", "7."]
    got = load_reward(str(final))(prompts, completions)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        pid = tok(p, add_special_tokens=False)["input_ids"]
        rid = tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        want = 0.5 * (_own_logp(irm.policy, pid, rid) - _own_logp(irm.reference, pid, rid))
        assert abs(float(got[i]) - want) < 1e-5
    steps = load_reward(f"prm:min:{final}")(["1+2="], ["1 2\n3."])  # steps "1 2" and "3."
    assert steps.shape == (1,) and math.isfinite(float(steps[0]))


def test_ce_on_outcome_labels_and_prm_on_step_labels_train(tmp_path):
    model = tiny_model(tmp_path / "sft")
    data = write_jsonl(tmp_path / "labels.jsonl", unpaired_rows(8, seed=2))
    common = [
        "--model",
        str(model),
        "--head",
        "implicit",
        "--batch-size",
        "4",
        "--max-steps",
        "2",
        "--save-every",
        "0",
    ]
    assert (
        main(["train", "rm", "--data", str(data), "--out", str(tmp_path / "ce"), "--loss", "ce", *common])
        == 0
    )
    logged = json.loads((tmp_path / "ce" / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(logged["loss"] - math.log(2)) < 1e-6  # step 1 starts at θ = ref: CE of σ(0) is log 2
    steps = write_jsonl(tmp_path / "steps.jsonl", [{"prompt": "1+2=", "steps": ["1 2", "3."], "first_error": -1},
                                                   {"prompt": "1+2=", "steps": ["1 2", "4."], "first_error": 1}])  # fmt: skip
    assert main(["train", "prm", "--data", str(steps), "--out", str(tmp_path / "prm"), *common]) == 0
    assert main(["eval", str(tmp_path / "prm"), "--data", str(steps)]) == 0
    assert "f1" in json.loads((tmp_path / "prm" / "eval.json").read_text())["metrics"]


def test_bad_settings_are_refused(tmp_path, capsys):
    model = tiny_model(tmp_path / "sft")
    data = write_jsonl(tmp_path / "p.jsonl", pair_rows(4))
    base = ["train", "rm", "--model", str(model), "--data", str(data), "--max-steps", "1"]
    assert main([*base, "--out", str(tmp_path / "a"), "--head", "implicit", "--beta", "-1"]) != 0
    assert main([*base, "--out", str(tmp_path / "b"), "--head", "nonsense"]) != 0
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "c"), "--head", "implicit", "--loss", "regression"]) != 0
    said = capsys.readouterr().err  # the reason is the implicit head, not the data (ratings or pairs)
    assert "--head implicit trains on pairs" in said and "drop --head implicit" in said, said


@pytest.mark.train_report
def test_reward_model_runs_leave_a_report_like_every_run(tmp_path):
    """`train rm` / `train prm` (scalar and implicit heads) end with OUT/summary.json and OUT/report.html;
    they used to leave only summary.json (`preftune report OUT` was needed)."""
    model = tiny_model(tmp_path / "sft")
    pairs = write_jsonl(tmp_path / "p.jsonl", pair_rows(8))
    steps = write_jsonl(tmp_path / "steps.jsonl", [{"prompt": "1+2=", "steps": ["1 2", "3."], "first_error": -1},
                                                   {"prompt": "1+2=", "steps": ["1 2", "4."], "first_error": 1}])  # fmt: skip
    common = [
        "--model",
        str(model),
        "--batch-size",
        "2",
        "--max-steps",
        "2",
        "--save-every",
        "0",
        "--no-progress",
    ]
    runs = {
        "rm": ["train", "rm", "--data", str(pairs)],
        "irm": ["train", "rm", "--data", str(pairs), "--head", "implicit"],
        "prm": ["train", "prm", "--data", str(steps)],
    }
    for name, args in runs.items():
        out = tmp_path / name
        assert main([*args, "--out", str(out), *common]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["steps"] == 2 and summary["method"].startswith(args[1])
        html = (out / "report.html").read_text()
        assert "<html" in html.lower() and "loss" in html, name
    assert main([*runs["rm"], "--out", str(tmp_path / "quiet"), *common, "--no-report"]) == 0
    assert not (tmp_path / "quiet" / "report.html").exists()
