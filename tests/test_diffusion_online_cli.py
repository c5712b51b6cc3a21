"""`preftune train ddpo|dpok|d3po|spo|awm` and `preftune sample` on a tiny pipeline folder: argument
errors name the field and the fix; a 2-step run writes the run folder and a killed run resumes to the
same weights and metrics as an unbroken one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from preftune.cli import main  # noqa: E402
from preftune.diffusion.online_steps import Method  # noqa: E402
from preftune.diffusion.tiny import save_tiny_pipeline  # noqa: E402
from preftune.tasks.shapes import all_prompts  # noqa: E402
from test_train_fixtures import assert_resume_refuses_data, one_line, stopped_before_final  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

REWARDS = (
    "import torch\n"
    "def bright(images, prompts):\n"
    "    return images.mean(dim=(1, 2, 3)).tolist()\n"
    "def short(images, prompts):\n"
    "    return [1.0]\n"
)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("dcli")
    save_tiny_pipeline(base / "pipe")
    rows = [{"prompt": p.text} for p in all_prompts()[:4]]
    (base / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (base / "bad.jsonl").write_text('{"prompt": "red square top left"}\n{"text": "no prompt"}\n')
    (base / "rewards.py").write_text(REWARDS)
    (base / "other.jsonl").write_text('{"prompt": "red square top left"}\n{"prompt": "a cat"}\n')
    return base


def _argv(root: Path, method: str, out: str, *extra: str) -> list[str]:
    return ["train", method, "--model", str(root / "pipe"), "--prompts", str(root / "prompts.jsonl"),
            "--reward", "shapes", "--out", str(root / out), "--max-steps", "2", "--batch-size", "2",
            "--num-generations", "2", "--lr", "1e-3", "--sample-steps", "2", "--heldout", "1",
            "--progress", "false", "--report", "false", *extra]  # fmt: skip


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (["--prompts", ""], "'prompts' is required for preftune train ddpo — pass --prompts FILE"),
        (
            ["--clip-rnage", "0.1"],
            "'--clip-rnage' is not one of preftune train ddpo's (did you mean --clip-range?)",
        ),
        (["--candidates", "3"], "'--candidates' is not one of preftune train ddpo's (an option of spo)"),
        (["--sample-steps", "two"], "--sample-steps 'two': not an integer — e.g. --sample-steps 10"),
        (["--clip-range", "-1"], "--clip-range -1: must be ≥ 0"),
        (["--data", "x.jsonl"], "preftune train ddpo does not use data — remove --data"),
        (["--reward", "nosuch"], "--reward 'nosuch': unknown image reward (built-in: shapes"),
        (["--prompts", "{root}/bad.jsonl"], "bad.jsonl:2: field 'prompt': missing"),
        (
            ["--prompts", "{root}/other.jsonl"],
            "other.jsonl: prompt 2 'a cat' is not one of the shapes reward's",
        ),
    ],
)
def test_argument_errors_name_the_field_and_the_fix(root, capsys, change, expected):
    argv = _argv(root, "ddpo", "err")
    key = argv.index(change[0]) if change[0] in argv else None
    if key is not None:
        argv[key + 1] = change[1].format(root=root)
    else:
        argv += change
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected.format(root=root) in err, err
    assert "Traceback" not in err


def test_awm_needs_a_flow_pipeline_and_d3po_two_samples(root, capsys):
    assert main(_argv(root, "awm", "e-awm")) == 2
    assert "awm trains flow-matching pipelines" in capsys.readouterr().err
    argv = _argv(root, "d3po", "e-d3po")
    for count in ("1", "3"):  # one sample, or an odd count (the last sample of each prompt unused)
        argv[argv.index("--num-generations") + 1] = count
        assert main(argv) == 2
        assert f"--num-generations must be even and ≥ 2 (got {count}" in capsys.readouterr().err
    argv[argv.index("--num-generations") + 1] = "4"
    assert main([*argv, "--temperature", "0.5"]) == 2  # a language sampler's option: not the policy's
    assert "does not use temperature" in capsys.readouterr().err


def test_a_broken_transformer_folder_is_refused_with_the_reason(tmp_path, capsys):
    """An SD3-style folder trains (tests/test_diffusion_flow_online.py); one whose transformer is not
    SD3's is named, as the offline runs name it."""
    from preftune.diffusion.tiny import save_tiny_sd3_pipeline

    pipe = save_tiny_sd3_pipeline(tmp_path / "sd3")
    index = json.loads((pipe / "model_index.json").read_text())
    index["transformer"] = ["diffusers", "FluxTransformer2DModel"]
    (pipe / "model_index.json").write_text(json.dumps(index))
    argv = ["train", "ddpo", "--model", str(pipe), "--prompts", "p.jsonl", "--reward", "shapes", "--out",
            str(tmp_path / "o")]  # fmt: skip
    assert main(argv) == 2
    assert "the pipeline has a FluxTransformer2DModel transformer" in capsys.readouterr().err


def test_a_two_step_run_writes_the_run_folder_with_a_user_reward(root):
    argv = _argv(root, "ddpo", "run-user")
    argv[argv.index("--reward") + 1] = f"{root}/rewards.py:bright"
    assert main(argv) == 0
    out = root / "run-user"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "final/model_index.json",
                 "final/unet/config.json", "checkpoints/step-2/trainer_state.json", "samples_after.png"):  # fmt: skip
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["eval"]["heldout_samples"] == 4.0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2]
    assert "clip_range: 0.0001" in (out / "config.yaml").read_text()  # the paper default, recorded


def test_a_reward_returning_the_wrong_count_is_named(root, capsys):
    argv = _argv(root, "ddpo", "run-short")
    argv[argv.index("--reward") + 1] = f"{root}/rewards.py:short"
    assert main(argv) == 2
    assert "returned 1 values for 4 images; return one per image" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["ddpo", pytest.param("spo", marks=pytest.mark.slow)])
def test_a_killed_run_resumes_to_the_same_weights_and_metrics(root, monkeypatch, method):
    extra = ["--save-every", "1"] + (
        ["--critic-warmup", "1", "--skip-steps", "0", "--threshold", "0"] if method == "spo" else []
    )
    assert main(_argv(root, method, f"full-{method}", *extra)) == 0
    calls = {"n": 0}
    real = Method.step

    def crash(self, prompts, generator):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed during step 2, after checkpoint step-1
        return real(self, prompts, generator)

    monkeypatch.setattr(Method, "step", crash)
    assert main(_argv(root, method, f"cut-{method}", *extra)) == 130
    monkeypatch.setattr(Method, "step", real)
    assert main(_argv(root, method, f"cut-{method}", *extra, "--resume")) == 0
    from safetensors.torch import load_file

    a, b = (load_file(str(root / f"{d}-{method}/final/unet/diffusion_pytorch_model.safetensors"))
            for d in ("full", "cut"))  # fmt: skip
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first = json.loads((root / f"full-{method}/checkpoints/step-1/trainer_state.json").read_text())
    assert first["step"] == 1

    def train_records(d: str) -> list[dict]:
        lines = (root / f"{d}-{method}/metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in lines]

    assert train_records("full") == train_records("cut")
    start = load_file(str(root / "pipe/unet/diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(a[k], start[k]) for k in a)  # the two steps moved the weights


def test_sample_writes_images_and_rewards_and_names_errors(root, capsys):
    out = root / "samples"
    argv = ["sample", "--model", str(root / "pipe"), "--prompts", str(root / "prompts.jsonl"),
            "--out", str(out), "--steps", "2", "--per-prompt", "2", "--reward", "shapes"]  # fmt: skip
    assert main(argv) == 0
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and [r["seed"] for r in rows[:2]] == [0, 1]
    assert all((out / r["image"]).is_file() and isinstance(r["reward"], float) for r in rows)
    assert main([*argv[:6], str(root / "s2"), "--reno"]) == 2
    assert "--reno steers sampling by a reward: pass --reward NAME" in capsys.readouterr().err
    assert main([*argv[:6], str(root / "s3"), "--reno", "--reward", f"{root}/rewards.py:bright"]) == 2
    assert "gives no gradient" in capsys.readouterr().err
    assert main([*argv[:6], str(root / "s4"), "--lam", "2", "--branching", "3"]) == 2  # were ignored
    assert "--lam, --branching set DTS's tree search: add --dts N" in capsys.readouterr().err
    assert main([*argv[:6], str(root / "s5"), "--reno-iterations", "5"]) == 2  # was ignored
    assert "--reno-iterations sets ReNO's noise optimisation: add --reno" in capsys.readouterr().err


def test_a_stop_signal_saves_the_step_and_the_printed_command_resumes(root, monkeypatch, capsys):
    """SIGTERM / Ctrl-C during an online diffusion run used to end it with the work since the last
    `--save-every` checkpoint lost: it now ends at the step boundary with a checkpoint of that step."""
    import os
    import shlex
    import signal

    assert main(_argv(root, "ddpo", "sig-full", "--save-every", "0")) == 0
    real = Method.step

    def signalled(self, prompts, generator):
        os.kill(os.getpid(), signal.SIGTERM)  # during step 1 of 2
        monkeypatch.setattr(Method, "step", real)
        return real(self, prompts, generator)

    monkeypatch.setattr(Method, "step", signalled)
    capsys.readouterr()
    assert main(_argv(root, "ddpo", "sig-cut", "--save-every", "0")) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    out = root / "sig-cut"
    command = f"preftune train --config {out / 'config.yaml'} --resume"
    assert (
        f"stopped by SIGTERM after step 1 of 2; checkpoint {out / 'checkpoints' / 'step-1'} saved" in err
    ), err
    assert err.strip().endswith(f"resume with: {command}")
    assert main(shlex.split(command)[1:]) == 0
    from safetensors.torch import load_file

    a, b = (
        load_file(str(root / f"sig-{d}/final/unet/diffusion_pytorch_model.safetensors"))
        for d in ("full", "cut")
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()  # preftune eval names what a diffusion run is evaluated with instead
    assert main(["eval", str(out), "--prompts", str(root / "prompts.jsonl"), "--reward", "shapes"]) == 2
    said = capsys.readouterr().err
    assert "is a diffusion run" in said and f"preftune sample --model {out / 'final'}" in said, said
    assert "Traceback" not in said


def test_resume_refuses_prompts_rewritten_under_their_path(root, tmp_path, capsys):
    """The prompt file (or the held-out --eval-data file, whose rewards before training the run
    reads back) rewritten between a stop and `--resume`: refused in one line naming the file and the
    checkpoint (the run went on silently with the new prompts)."""
    import shutil

    texts = [p.text for p in all_prompts()]
    prompts, held = tmp_path / "prompts.jsonl", tmp_path / "held.jsonl"

    def write(path: Path, chosen: list[str]) -> None:
        path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in chosen))

    write(prompts, texts[:4])
    write(held, texts[4:6])
    argv = _argv(root, "ddpo", "unused", "--save-every", "1", "--eval-data", str(held))
    argv[argv.index("--prompts") + 1] = str(prompts)
    out = tmp_path / "run"
    argv[argv.index("--out") + 1] = str(out)
    assert main(argv) == 0
    state = json.loads((out / "checkpoints" / "step-1" / "trainer_state.json").read_text())
    assert state["data_digest"] and state["heldout_digest"]
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoints" / "step-2")
    write(prompts, texts[8:12])
    assert_resume_refuses_data(main, capsys, argv, out, "prompts", prompts, out / "checkpoints" / "step-1")
    write(prompts, texts[:4])
    write(held, texts[6:8])
    assert main([*argv, "--resume"]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"resume: eval_data '{held}' now holds other prompts than the run's held-out")
    assert str(out / "checkpoints" / "step-1") in line
    write(held, texts[4:6])
    assert main([*argv, "--resume"]) == 0
    assert (out / "final").is_dir()


def test_a_stop_signal_while_the_results_are_written_says_what_is_saved(root, monkeypatch, capsys):
    """Ctrl-C after the last step, while the trained pipeline is written: the run said "preftune:
    interrupted"; it now says that final/ was not written, names the step-2 checkpoint and the command
    that evaluates and writes the results from it."""
    import os
    import shlex
    import signal

    import preftune.diffusion.denoiser as denoiser

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(denoiser, "save_pipeline", signalled)
    out = root / "sig-final"
    capsys.readouterr()
    assert main(_argv(root, "ddpo", "sig-final", "--save-every", "0")) == 130
    monkeypatch.undo()
    expected, command = stopped_before_final("SIGINT", 2, out)
    assert capsys.readouterr().err.strip().splitlines()[-1] == expected
    assert main(shlex.split(command)[1:]) == 0
    assert (out / "final" / "model_index.json").is_file() and (out / "summary.json").is_file()
