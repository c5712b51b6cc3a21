"""Bad inputs end in one named line from `preftune train`, at once and with no traceback: a missing data
file or model folder (never a hub lookup with network retries), a tokenizer larger than the model's
embedding, an out-of-memory allocation (step, what to lower, the intact checkpoint), two methods."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from preftune import paths
from preftune.cli import main
from preftune.errors import ConfigError
from test_train_fixtures import ALPHABET, one_line, pair_rows, tiny_model, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("faults")
    return {
        "root": root,
        "model": tiny_model(root / "model"),
        "pairs": write_jsonl(root / "pairs.jsonl", pair_rows(8)),
        "cache": root / "cache",
    }


@pytest.fixture(autouse=True)
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub is out of reach, and asking it at all is a failure of these tests."""
    import datasets

    def asked(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"the hub was asked for {args}")

    monkeypatch.setattr(datasets, "load_dataset", asked)
    monkeypatch.setattr(paths, "hub_reachable", lambda: False)
    for name in ("HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)


def train(
    env: dict[str, Path], capsys: pytest.CaptureFixture[str], *args: str, out: str = "run"
) -> tuple[int, str]:
    argv = [
        "train",
        *args,
        "--out",
        str(env["root"] / out),
        "--no-progress",
    ]
    if "--cache-dir" not in args:
        argv += ["--cache-dir", str(env["cache"])]
    if "--model" not in args:
        argv += ["--model", str(env["model"])]
    if "--data" not in args:
        argv += ["--data", str(env["pairs"])]
    capsys.readouterr()
    rc = main(argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("value", ["missing.jsonl", "data/missing", "./missing", "a/b/c", "~/nope.jsonl"])
def test_a_missing_data_path_is_no_such_file_at_once(
    env: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.chdir(env["root"])
    (env["root"] / "data").mkdir(exist_ok=True)  # `data/missing`: its folder exists, so it is a path
    start = time.perf_counter()
    rc, err = train(env, capsys, "dpo", "--data", value, out="missing-data")
    assert time.perf_counter() - start < 10  # was 33 s of hub retries, then a traceback
    assert rc == 2
    assert one_line(err) == (
        f"{value}: field 'data': no such file or folder — check the path (a JSONL/JSON/Parquet/CSV "
        "file or a datasets save_to_disk folder)"
    )
    assert not (env["root"] / "missing-data").exists()  # no run folder for a run that never started


def test_a_hub_like_name_with_the_hub_out_of_reach_names_both_readings(
    env: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(env["root"])
    rc, err = train(env, capsys, "dpo", "--data", "org/prefs", out="hub-data")
    assert rc == 2
    assert one_line(err) == (
        "org/prefs: field 'data': no such file or folder here, and the hub (huggingface.co) cannot be "
        "reached to load it as a hub dataset id — check the path (a local file: ./NAME), or connect to "
        "the network (a dataset downloaded before loads with HF_HUB_OFFLINE=1)"
    )


def test_a_missing_held_out_file_of_a_config_is_named_before_training(
    env: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The case of examples/dpo.yaml run where no heldout.jsonl exists.
    monkeypatch.chdir(env["root"])
    config = env["root"] / "dpo.yaml"
    config.write_text("method: dpo\neval_data: heldout.jsonl\neval_every: 100\n")
    rc, err = train(env, capsys, "--config", str(config), out="heldout")
    assert rc == 2
    assert one_line(err).startswith(
        "heldout.jsonl: field 'eval_data': no such file or folder — check the path"
    )
    assert not (env["root"] / "heldout").exists()


@pytest.mark.parametrize("value", ["./sft-model", "runs/sft/final"])
def test_a_missing_model_folder_is_named(
    env: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.chdir(env["root"])
    rc, err = train(env, capsys, "dpo", "--model", value, out="missing-model")
    assert rc == 2
    assert one_line(err) == (
        f"model: no such model folder '{value}' — check the path (a folder written by save_pretrained), "
        "or give a hub id such as Qwen/Qwen2.5-0.5B-Instruct"
    )


@pytest.mark.parametrize("method", ["dpo", "grpo", "rm"])
def test_a_folder_that_holds_no_model_is_named_before_any_loader_runs(
    env: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path, method: str
) -> None:
    """It used to fail in the tokenizer loader ("install sentencepiece or tiktoken")."""
    (tmp_path / "notes.txt").write_text("not a model")
    given = (
        ["--prompts", str(env["pairs"]), "--reward", "arithmetic"]
        if method == "grpo"
        else ["--data", str(env["pairs"])]
    )
    capsys.readouterr()
    rc = main(
        ["train", method, "--model", str(tmp_path), *given, "--out", str(env["root"] / f"no-model-{method}")]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert f"--model {tmp_path}: not a model folder (no config.json in it)" in one_line(err), err
    assert "sentencepiece" not in err


def test_a_hub_like_model_name_with_the_hub_out_of_reach_names_both_readings(
    env: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(env["root"])
    rc, err = train(env, capsys, "dpo", "--model", "sft-model", out="hub-model")
    assert rc == 2
    assert one_line(err).startswith(
        "model: no model folder 'sft-model' here, and the hub (huggingface.co) cannot be reached to "
        "download 'sft-model' as a hub id — check the path (a local folder: ./NAME)"
    )


def test_loaders_name_a_missing_folder(tmp_path: Path) -> None:
    from preftune.data.formatting import load_tokenizer
    from preftune.models.load import load_causal_lm

    with pytest.raises(ConfigError, match=r"^no such model folder '.*nowhere' — check the path"):
        load_causal_lm(tmp_path / "nowhere")
    with pytest.raises(
        ConfigError, match=r"^no such model or tokenizer folder '\./nowhere' — check the path"
    ):
        load_tokenizer("./nowhere")


def test_tokenizer_ids_past_the_embedding_are_refused_up_front(
    env: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from preftune.data.char_tokenizer import build_char_tokenizer
    from preftune.models.tiny import save_tiny_model
    from preftune.train.faults import token_ids

    tok = build_char_tokenizer(ALPHABET)
    assert token_ids(tok) == len(ALPHABET) + 4 == 46  # 42 characters and pad, bos, eos, unk
    small = save_tiny_model("llama", env["root"] / "small", vocab_size=40)
    tok.save_pretrained(small)  # 46 ids, 40 embedding rows: ids 40..45 would index past the table
    rc, err = train(env, capsys, "dpo", "--model", str(small), out="vocab")
    assert rc == 2
    assert one_line(err) == (
        f"the tokenizer ({small}) has 46 token ids (added tokens included) but the input embedding of "
        f"model '{small}' has 40 rows — use the model's own tokenizer, or resize the embedding "
        "(model.resize_token_embeddings(46)) and save the model"
    )
    tok.add_tokens(["<extra>"])
    assert token_ids(tok) == 47


def _oom_on_step(monkeypatch: pytest.MonkeyPatch, step: int, err: BaseException | None) -> None:
    import preftune.train.run as train_run

    real, calls = train_run.objective_on_batch, {"n": 0}

    def failing(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("backward"):
            calls["n"] += 1
            if calls["n"] == step:
                if err is None:  # a real failed allocation: 1 PiB is past any address space
                    torch.empty(1 << 50, dtype=torch.uint8)
                raise AssertionError("allocated 1 PiB") if err is None else err
        return real(*args, **kwargs)

    monkeypatch.setattr(train_run, "objective_on_batch", failing)


def test_out_of_memory_in_a_step_names_it_and_keeps_the_checkpoint(
    env: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _oom_on_step(monkeypatch, 3, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    args = (
        "dpo",
        "--batch-size",
        "4",
        "--micro-batch-size",
        "2",
        "--max-steps",
        "4",
        "--save-every",
        "2",
        "--max-length",
        "256",
    )
    rc, err = train(env, capsys, *args, out="oom")
    ckpt = env["root"] / "oom" / "checkpoints" / "step-2"
    assert rc == 2
    assert one_line(err) == (
        "out of memory at step 3 (CUDA out of memory. Tried to allocate 2.00 GiB) — lower "
        "micro_batch_size (now 2) or max_length (now 256), or set "
        f"gradient_checkpointing: true; the last good checkpoint {ckpt} is intact (continue with --resume)"
    )
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["step-2"]
    monkeypatch.undo()  # memory to spare again: the run continues from step-2 and finishes
    rc, _ = train(env, capsys, *args, "--resume", out="oom")
    assert rc == 0
    log = (env["root"] / "oom" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log if '"train"' in line] == [1, 2, 3, 4]


def test_cpu_allocation_failure_before_any_checkpoint(
    env: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _oom_on_step(monkeypatch, 1, None)  # the CPU allocator's own RuntimeError
    rc, err = train(
        env, capsys, "dpo", "--batch-size", "4", "--max-length", "64", "--max-steps", "2", out="oom-cpu"
    )
    assert rc == 2
    line = one_line(err)
    assert line.startswith("out of memory at step 1 (") and "can't allocate memory" in line
    assert line.endswith(
        ") — lower micro_batch_size (now 4) or max_length (now 64), or set "
        "gradient_checkpointing: true; no checkpoint was written yet"
    )


def _oom_without_grad(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first forward without gradients (the reference pass, or else an evaluation) fails."""
    import preftune.models.logprobs as lp

    real = lp.example_stats

    def failing(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(lp, "example_stats", failing)


def test_out_of_memory_in_the_reference_pass_or_an_evaluation_names_it(
    env: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _oom_without_grad(monkeypatch)
    fresh = str(env["root"] / "fresh-cache")  # no reference log-probs cached yet: the pass runs
    common = ("--batch-size", "4", "--max-length", "128", "--max-steps", "2", "--cache-dir", fresh)
    rc, err = train(env, capsys, "dpo", *common, out="oom-ref")
    assert rc == 2
    assert one_line(err) == (
        "out of memory in the reference pass before step 1 (CUDA out of memory. Tried to allocate "
        "1.00 GiB) — lower micro_batch_size (now 4), eval_batch_size (now 4) or max_length (now 128); no "
        "checkpoint was written yet"
    )
    # SimPO has no reference: the first forward without gradients is the evaluation at step 1.
    evals = ("--eval-data", str(env["pairs"]), "--eval-every", "1", "--eval-batch-size", "2")
    rc, err = train(env, capsys, "simpo", *common, *evals, out="oom-eval")
    assert rc == 2
    assert one_line(err) == (
        "out of memory in the evaluation at step 1 (CUDA out of memory. Tried to allocate 1.00 GiB) — "
        "lower eval_batch_size (now 2) or max_length (now 128); no checkpoint was written yet"
    )


def test_other_runtime_errors_are_not_called_out_of_memory(
    env: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from preftune.config import load_config
    from preftune.train.api import train as train_api

    _oom_on_step(monkeypatch, 1, RuntimeError("shapes do not match"))
    config = load_config(
        None,
        {
            "method": "dpo",
            "model": str(env["model"]),
            "data": str(env["pairs"]),
            "out": str(env["root"] / "other"),
            "cache_dir": str(env["cache"]),
            "progress": False,
            "batch_size": 4,
            "max_steps": 1,
        },
    )
    with pytest.raises(RuntimeError, match="^shapes do not match$"):
        train_api(config)


def test_out_of_memory_outside_a_step_names_the_pass() -> None:
    from preftune.config import TrainConfig
    from preftune.train.faults import is_out_of_memory, out_of_memory

    def evaluate_examples() -> None:
        raise MemoryError()

    def _forward_group() -> None:  # the reference forwards (preftune.models.reference.CachedReference)
        raise torch.OutOfMemoryError("CUDA out of memory")

    config = TrainConfig(eval_batch_size=16, max_length=512, gradient_checkpointing=True)
    messages = []
    for fn in (evaluate_examples, _forward_group):
        try:
            fn()
        except (RuntimeError, MemoryError) as err:
            assert is_out_of_memory(err)
            messages.append(str(out_of_memory(err, config=config, done=5, micro=4, last_good=None)))
    assert messages == [
        "out of memory in the evaluation at step 5 (MemoryError) — lower eval_batch_size (now 16) or "
        "max_length (now 512); no checkpoint was written yet",
        "out of memory in the reference pass before step 6 (CUDA out of memory) — lower micro_batch_size "
        "(now 4), eval_batch_size (now 16) or max_length (now 512); no checkpoint was written yet",
    ]
    assert not is_out_of_memory(RuntimeError("index out of range"))


def test_two_different_methods_are_an_error_naming_both(
    env: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import preftune.train.api as api

    def never(config: Any) -> Any:
        raise AssertionError(f"trained {config.method}")

    rc, err = train(env, capsys, "dpo", "--method", "ipo", out="two-methods")
    assert rc == 2
    assert one_line(err) == "two methods given: 'dpo' (METHOD) and '--method ipo' — give one of them"
    config = env["root"] / "kto.yaml"
    config.write_text("method: kto\nbeta: 0.1\n")
    rc, err = train(env, capsys, "dpo", "--config", str(config), out="two-methods")
    assert rc == 2
    assert one_line(err) == (
        f"two methods given: 'dpo' (METHOD) and 'method: kto' in {config} — give one of them "
        "(--method dpo overrides the file's)"
    )
    # Equal values agree; --method alone overrides the file (command line over file).
    seen: list[str] = []
    monkeypatch.setattr(api, "train", lambda c: seen.append(c.method) or never(c))
    for args in (
        ("dpo", "--method", "dpo"),
        ("kto", "--config", str(config)),
        ("--config", str(config), "--method", "ipo"),
    ):
        with pytest.raises(AssertionError):
            train(env, capsys, *args, out="two-methods")
    assert seen == ["dpo", "kto", "ipo"]


def test_the_local_path_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    local = [
        "prefs.jsonl",
        "./sft",
        "../sft",
        "/data/x",
        "~/x",
        "runs/final",
        "a/b/c",
        "m.safetensors",
        "a b",
    ]
    hub = ["Qwen/Qwen2.5-0.5B-Instruct", "gpt2", "org/prefs", "HuggingFaceH4/ultrafeedback_binarized"]
    assert [name for name in local + hub if paths.is_local_path(name)] == local
