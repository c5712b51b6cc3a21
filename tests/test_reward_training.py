"""preftune train rm: trains, saves a sequence-classifier folder, resumes exactly, rewards online."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from preftune.cli import main
from preftune.config import load_config
from preftune.errors import ConfigError
from preftune.reward import load_reward
from preftune.reward import training as rm_training
from test_train_fixtures import (
    assert_resume_refuses_data,
    pair_rows,
    ranked_rows,
    stopped_before_final,
    tiny_model,
    write_jsonl,
)

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = ["--loss", "bt:1,center:0.01", "--batch-size", "4", "--max-steps", "4", "--lr", "1e-3",
        "--save-every", "2", "--seed", "3"]  # fmt: skip


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("rm")
    model = tiny_model(root / "sft")
    data = write_jsonl(root / "prefs.jsonl", pair_rows(16, seed=1))
    base = ["train", "rm", "--model", str(model), "--data", str(data), *ARGS]
    assert main([*base, "--out", str(root / "whole")]) == 0
    return root, base


def _records(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in lines]


def test_final_folder_is_a_sequence_classifier_with_its_tokenizer(whole):
    root, _ = whole
    final = root / "whole" / "final"
    model = AutoModelForSequenceClassification.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert model.config.num_labels == 1 and tok.pad_token_id == model.config.pad_token_id
    config = load_config(root / "whole" / "config.yaml")
    assert config.method == "rm" and config.hparams == {"loss": "bt:1,center:0.01"}
    records = _records(root / "whole")
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(r["split"] == "train" for r in records)
    assert sorted(p.name for p in (root / "whole" / "checkpoints").iterdir()) == ["step-2", "step-4"]
    # the trained weights differ from the SFT model's trunk, and the saved head is the trained one
    sft = load_file(str(root / "sft" / "model.safetensors"))
    saved = load_file(str(final / "model.safetensors"))
    key = next(k for k in saved if k.endswith("layers.0.mlp.up_proj.weight"))
    assert not torch.equal(saved[key], sft[key]) and "score.weight" in saved


def test_interrupted_then_resume_is_bit_identical(whole, monkeypatch):
    root, base = whole
    out = root / "broken"
    real = rm_training._step
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # after the step-2 checkpoint
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(rm_training, "_step", dying)
    assert main([*base, "--out", str(out)]) != 0  # "preftune: interrupted"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]
    monkeypatch.setattr(rm_training, "_step", real)
    assert main([*base, "--out", str(out), "--resume"]) == 0
    a = load_file(str(root / "whole" / "final" / "model.safetensors"))
    b = load_file(str(out / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _records(out) == _records(root / "whole")


def test_resume_with_another_loss_is_refused(whole, capsys):
    root, base = whole
    args = [*base, "--out", str(root / "whole"), "--resume"]
    args[args.index("--loss") + 1] = "bt"
    assert main(args) != 0
    err = capsys.readouterr().err.strip()
    assert "would break an exact resume: hparams: {'loss': 'bt:1,center:0.01'} → {'loss': 'bt'}" in err
    assert len(err.splitlines()) == 1


def test_ranked_rows_train_and_unknown_flags_are_refused(tmp_path):
    model = tiny_model(tmp_path / "sft")
    data = write_jsonl(tmp_path / "ranked.jsonl", ranked_rows(6, seed=2))
    args = [
        "train",
        "rm",
        "--model",
        str(model),
        "--data",
        str(data),
        "--max-steps",
        "1",
        "--batch-size",
        "4",
    ]
    assert (
        main([*args, "--out", str(tmp_path / "r"), "--loss", "bt_margin", "--ranked-pairs", "all_pairs"]) == 0
    )
    with pytest.raises(ConfigError, match="takes --loss.*not beta"):
        rm_training.train_rm(load_config(None, {"method": "rm", "model": str(model), "data": str(data),
                                                "out": str(tmp_path / "b"), "hparams": {"beta": 0.1}}))  # fmt: skip


def test_reward_model_folder_is_a_reward(whole):
    root, _ = whole
    final = root / "whole" / "final"
    reward = load_reward(f"{final}:2")  # a folder, weight 2
    prompts, completions = ["1+2=", "1+2=", "3+4="], ["3.", "5x.", "7."]
    got = reward(prompts, completions)
    model = AutoModelForSequenceClassification.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    rows = [tok(p + c, add_special_tokens=False)["input_ids"] for p, c in zip(prompts, completions)]
    with torch.no_grad():  # reference: the classifier's own forward on prompt + completion + EOS, as
        # training data is formatted (this tokenizer adds no BOS)
        ref = [model(input_ids=torch.tensor([[*r, tok.eos_token_id]])).logits.item() for r in rows]
    torch.testing.assert_close(got, 2 * torch.tensor(ref, dtype=torch.float64), atol=1e-5, rtol=0)
    assert len(set(ref)) == 3  # the completions score differently, so the comparison has power


def test_eval_of_a_reward_model_run(whole, capsys):
    root, _ = whole
    run = root / "whole"
    assert main(["eval", str(run), "--data", str(root / "prefs.jsonl")]) == 0
    assert "reward model on" in capsys.readouterr().out
    metrics = json.loads((run / "eval.json").read_text())["metrics"]
    assert metrics["pairs"] == 16.0 and set(metrics) == {
        "pairs",
        "loss",
        "accuracy",
        "margin",
        "ece",
        "brier",
    }
    # the same pairs, scored here: accuracy is the fraction with s_c > s_r
    from preftune.reward.scoring import load_scorer
    from preftune.reward.training import pair_scores, rm_examples

    config = load_config(run / "config.yaml")
    model = load_scorer(run / "final")
    examples = rm_examples(
        str(root / "prefs.jsonl"), config, AutoTokenizer.from_pretrained(run / "final"), None
    )
    with torch.no_grad():
        s_c, s_r = pair_scores(model, examples)
    assert metrics["accuracy"] == pytest.approx(float((s_c > s_r).float().mean()))
    assert metrics["margin"] == pytest.approx(float((s_c - s_r).mean()), abs=1e-5)


def test_a_stop_signal_saves_the_step_and_the_resumed_model_is_the_whole_one(whole, monkeypatch, capsys):
    """SIGTERM / Ctrl-C during `train rm` used to end it at once, the steps since the last `--save-every`
    checkpoint lost: it now ends after the step it interrupts, with that step's checkpoint (step 3, not
    a multiple of save_every 2), and the printed command resumes to the unbroken run's weights."""
    import os
    import shlex
    import signal

    import preftune.train.loop as loop

    root, base = whole
    real, calls = loop.batch_indices, {"n": 0}

    def signalled(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # during step 3 of 4
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "batch_indices", signalled)
    out = root / "signalled"
    capsys.readouterr()
    assert main([*base, "--out", str(out)]) == 128 + signal.SIGTERM
    monkeypatch.setattr(loop, "batch_indices", real)
    err = capsys.readouterr().err
    command = f"preftune train --config {out / 'config.yaml'} --resume"
    assert (
        f"stopped by SIGTERM after step 3 of 4; checkpoint {out / 'checkpoints' / 'step-3'} saved" in err
    ), err
    assert main(shlex.split(command)[1:]) == 0
    a, b = (load_file(str(d / "final" / "model.safetensors")) for d in (root / "whole", out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _records(out) == _records(root / "whole")


@pytest.mark.parametrize("head", [["--loss", "bt"], ["--head", "implicit"]], ids=["scalar", "implicit"])
def test_resume_refuses_data_rewritten_under_its_path(tmp_path, capsys, head):
    """The pairs file rewritten between a stop and `--resume` (same path, other rows) used to be
    trained on silently from the checkpoint's step: refused in one line naming the file and the
    checkpoint, before anything is written; put back, the run resumes."""
    import shutil

    model = tiny_model(tmp_path / "sft")
    rows = pair_rows(16, seed=1)
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    out = tmp_path / "run"
    args = ["train", "rm", "--model", str(model), "--data", str(data), "--out", str(out), *head,
            "--batch-size", "4", "--max-steps", "3", "--save-every", "2", "--no-report"]  # fmt: skip
    assert main(args) == 0
    state = json.loads((out / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert state["data_digest"]
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoints" / "step-3")
    write_jsonl(data, rows[:8] + pair_rows(8, seed=2))
    assert_resume_refuses_data(main, capsys, args, out, "data", data, out / "checkpoints" / "step-2")
    write_jsonl(data, rows)
    assert main([*args, "--resume"]) == 0
    assert "resuming from step 2 of 3" in capsys.readouterr().out


@pytest.mark.parametrize("head", [[], ["--head", "implicit"]], ids=["scalar", "implicit"])
def test_a_stop_signal_while_final_is_written_says_what_is_saved(whole, monkeypatch, capsys, head):
    """SIGTERM after the last step, while OUT/final/ is written (the implicit RM: while its reference
    copy is added): the run said nothing (SIGTERM) or "interrupted" (Ctrl-C); it now says that final/
    was not written, names the step-4 checkpoint and the command that writes the results from it.
    final/ is written whole or not at all (final.tmp/ is removed)."""
    import os
    import shlex
    import signal

    from transformers import PreTrainedModel

    from preftune.reward import implicit_training

    root, base = whole
    out = root / f"signal-in-final{'-'.join(head)}"

    def signalled(final, *args, **kwargs):
        Path(final).mkdir(parents=True, exist_ok=True)
        os.kill(os.getpid(), signal.SIGTERM)

    if head:
        monkeypatch.setattr(implicit_training, "write_folder", signalled)
    else:
        monkeypatch.setattr(PreTrainedModel, "save_pretrained", lambda self, path, **_: signalled(path))
    args = [*base, *head]
    if head:
        args[args.index("--loss") + 1] = "bt"
    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 128 + signal.SIGTERM
    monkeypatch.undo()
    expected, command = stopped_before_final("SIGTERM", 4, out)
    assert capsys.readouterr().err.strip().splitlines()[-1] == expected
    assert not (out / "final").exists() and not (out / "final.tmp").exists()
    assert main(shlex.split(command)[1:]) == 0
    assert (out / "final" / "model.safetensors").is_file() and (out / "summary.json").is_file()
