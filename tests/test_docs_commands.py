"""Every command shown in README.md and docs/*.md, and every shipped example config, runs.

A new user copies commands from the docs; each one here runs as written (tokenised with `shlex`,
comments dropped) in a sandbox folder that holds what the docs assume: a tiny SFT model at
`./sft-model` and `./sft`, preference data `prefs.jsonl` / `heldout.jsonl`, arithmetic prompts
`prompts.jsonl` (online methods), step-labelled solutions `steps.jsonl` (process reward models),
tiny diffusers pipelines `./tiny-pipeline` (UNet) and `./tiny-sd3-pipeline` (SD3-style) with image
pairs `image-pairs.jsonl` (images in `img/`) and shapes-task prompts `shape-prompts.jsonl`, the
repository's `examples/`, and (for commands that read a finished run) `runs/dpo1`, `runs/prm`,
`runs/rm` and `runs/irm` (an implicit reward model).
What does not run here, and why:

- `bash scripts/setup.sh ...`, `python -m pytest ...`: set-up and the test command (CI runs both);
- benchmark scripts (`benchmarks/*.py`): they need the benchmark venv; their smoke tests cover them;
- usage synopses (`[--option]` in brackets) and lines with `...` placeholders: not commands.

Commands on the built-in task (`quickstart`, a `sweep` without `--model`) and `torchrun` commands
take minutes: they run as written in the slow tier (`pytest -m slow`).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from preftune.diffusion.tiny import save_tiny_pipeline, save_tiny_sd3_pipeline, write_image_pairs
from preftune.reward.processbench import processbench_from_task
from preftune.tasks.arithmetic import ArithmeticTask
from test_train_fixtures import pair_rows, tiny_model, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}


@dataclass(frozen=True)
class DocCommand:
    where: str  # "docs/training.md:12"
    argv: tuple[str, ...]  # after the program name
    program: str  # "preftune" or "torchrun"


def _code_lines(text: str) -> list[tuple[int, str, str]]:
    """(line number, language, line) of fenced and 4-space-indented code blocks."""
    out: list[tuple[int, str, str]] = []
    fence: str | None = None
    prev_blank = True
    in_indented = False
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if fence is not None:
            if stripped.startswith("```"):
                fence = None
            else:
                out.append((n, fence, line))
            continue
        if stripped.startswith("```"):
            fence = stripped[3:].strip().lower()
            continue
        if line.startswith("    ") and (prev_blank or in_indented) and stripped:
            in_indented = True
            out.append((n, "", line))
        elif stripped:
            in_indented = False
        prev_blank = not stripped
    return out


def _joined(lines: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    """Join backslash-continued lines."""
    out: list[tuple[int, str, str]] = []
    pending: tuple[int, str, str] | None = None
    for n, lang, line in lines:
        if pending is not None:
            pn, plang, ptext = pending
            text = ptext + " " + line.strip()
        else:
            pn, plang, text = n, lang, line.strip()
        if text.endswith("\\"):
            pending = (pn, plang, text[:-1].rstrip())
        else:
            pending = None
            out.append((pn, plang, text))
    return out


def collect(paths: list[Path] = DOCS, root: Path = ROOT) -> tuple[list[DocCommand], list[str]]:
    """The runnable commands of `paths`, and the skipped lines with the reason."""
    commands: list[DocCommand] = []
    skipped: list[str] = []
    for path in paths:
        rel = path.relative_to(root).as_posix()
        for n, lang, text in _joined(_code_lines(path.read_text(encoding="utf-8"))):
            if lang not in SHELL_LANGS:
                continue
            where = f"{rel}:{n}"
            for part in (p.strip() for p in text.split("&&")):
                try:
                    words = shlex.split(part, comments=True)
                except ValueError:
                    continue
                if not words:
                    continue
                prog = words[0].removeprefix(".venv/bin/")
                if prog not in ("preftune", "torchrun"):
                    if prog in ("bash", "python", ".bench-venv/bin/python") or prog.endswith("python"):
                        skipped.append(f"{where}: {part} (set-up, tests or a benchmark)")
                    continue
                if "..." in words or any(w.startswith("[") for w in words):
                    skipped.append(f"{where}: {part} (a synopsis or a placeholder)")
                    continue
                commands.append(DocCommand(where, tuple(words[1:]), prog))
    return commands, skipped


COMMANDS, SKIPPED = collect()


def _is_slow(cmd: DocCommand) -> bool:
    if cmd.program == "torchrun" or not cmd.argv:
        return True
    if cmd.argv[0] == "quickstart":
        return True
    return cmd.argv[0] == "sweep" and "--model" not in cmd.argv


def _params(slow: bool) -> list[object]:
    return [pytest.param(c, id=c.where) for c in COMMANDS if _is_slow(c) == slow]


@pytest.fixture(scope="module")
def base_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the docs assume exists, plus `runs/dpo1` (a finished 2-step DPO run) in `with_run/`."""
    from preftune.cli import main

    root = tmp_path_factory.mktemp("docs")
    plain = root / "plain"
    plain.mkdir()
    model = tiny_model(plain / "sft-model")
    shutil.copytree(model, plain / "sft")
    write_jsonl(plain / "prefs.jsonl", pair_rows(16, seed=1))
    write_jsonl(plain / "heldout.jsonl", pair_rows(6, seed=2))
    task = ArithmeticTask(ops="+")  # prompts of online runs (preftune train grpo)
    write_jsonl(plain / "prompts.jsonl", [{"prompt": task.prompt(p)} for p in task.problems(8, seed=3)])
    shutil.copytree(ROOT / "examples", plain / "examples")
    write_jsonl(plain / "steps.jsonl", processbench_from_task(12, ops="+", seed=4))
    save_tiny_pipeline(plain / "tiny-pipeline")  # diffusion: a pipeline folder and image pairs
    save_tiny_sd3_pipeline(plain / "tiny-sd3-pipeline")  # a rectified-flow (SD3-style) one
    write_image_pairs(plain, pairs=4, name="image-pairs.jsonl")
    shapes = [{"prompt": f"{c} square {p}"} for c in ("red", "blue") for p in ("top left", "bottom right")]
    write_jsonl(plain / "shape-prompts.jsonl", shapes)  # the built-in image task's prompts (--reward shapes)
    with_run = root / "with_run"
    shutil.copytree(plain, with_run)
    with _cwd(with_run):
        argv = ["train", "dpo", "--model", "./sft-model", "--data", "prefs.jsonl", "--out", "runs/dpo1"]
        assert main([*argv, "--batch-size", "8", "--no-progress"]) == 0
        argv = ["train", "prm", "--model", "./sft-model", "--data", "steps.jsonl", "--out", "runs/prm"]
        assert main([*argv, "--batch-size", "4", "--max-steps", "2"]) == 0
        argv = ["train", "rm", "--model", "./sft-model", "--data", "prefs.jsonl", "--out", "runs/rm"]
        assert main([*argv, "--batch-size", "4", "--max-steps", "2"]) == 0
        argv = ["train", "rm", "--model", "./sft-model", "--data", "prefs.jsonl", "--out", "runs/irm"]
        assert main([*argv, "--head", "implicit", "--batch-size", "4", "--max-steps", "2"]) == 0
    return root


@contextlib.contextmanager
def _cwd(path: Path):  # type: ignore[no-untyped-def]
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def _sandbox(base: Path, cmd: DocCommand, tmp_path: Path) -> Path:
    """A fresh copy of the base sandbox: with `runs/dpo1` and `runs/prm` unless the command writes a
    run itself and reads none (e.g. `--reward prm:min:runs/prm/final`)."""
    writes_run = cmd.argv[:1] in (("train",), ("sweep",), ("quickstart",))
    out = cmd.argv[cmd.argv.index("--out") + 1] if "--out" in cmd.argv[:-1] else None
    reads_run = any("runs/" in w for w in cmd.argv if w != out)  # e.g. RTO reads runs/dpo1/final
    src = base / ("plain" if writes_run and not reads_run else "with_run")
    dst = tmp_path / "work"
    shutil.copytree(src, dst)
    return dst


def _run(cmd: DocCommand, folder: Path) -> tuple[int, str]:
    from preftune.cli import main

    err = io.StringIO()
    with _cwd(folder), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(list(cmd.argv))
        except SystemExit as exc:  # argparse errors
            code = int(exc.code or 0)
    return code, err.getvalue()


def test_docs_have_commands_and_the_harness_finds_them() -> None:
    wheres = {c.where.split(":")[0] for c in COMMANDS}
    assert "README.md" in wheres and len(COMMANDS) >= 10
    found, _ = collect([ROOT / "README.md"])
    assert any(c.argv[:2] == ("train", "dpo") for c in found)


def test_harness_reads_fences_indents_and_continuations(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text(
        "Text\n\n    preftune losses   # a comment\n\n```bash\npreftune train dpo --model m \\\n"
        "    --data d.jsonl\n```\n\n```python\npreftune.train(cfg)\n```\n\n    preftune eval ...\n",
        encoding="utf-8",
    )
    found, skipped = collect([doc], root=tmp_path)
    assert [c.argv for c in found] == [("losses",), ("train", "dpo", "--model", "m", "--data", "d.jsonl")]
    assert [c.where for c in found] == ["x.md:3", "x.md:6"]
    assert len(skipped) == 1 and "placeholder" in skipped[0]


@pytest.mark.parametrize("cmd", _params(slow=False))
def test_doc_command_runs(cmd: DocCommand, base_sandbox: Path, tmp_path: Path) -> None:
    folder = _sandbox(base_sandbox, cmd, tmp_path)
    code, err = _run(cmd, folder)
    assert code == 0, f"{cmd.where}: preftune {shlex.join(cmd.argv)} exited {code}:\n{err}"
    assert "Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize("cmd", _params(slow=True))
def test_doc_command_runs_slow(cmd: DocCommand, base_sandbox: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    folder = _sandbox(base_sandbox, cmd, tmp_path)
    if cmd.program == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", *cmd.argv]
    else:
        argv = [sys.executable, "-m", "preftune", *cmd.argv]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, f"{cmd.where}: {shlex.join(argv)}:\n{proc.stderr[-3000:]}"


@pytest.mark.parametrize("example", sorted(p.stem for p in (ROOT / "examples").glob("*.yaml")))
def test_example_config_runs(example: str, base_sandbox: Path, tmp_path: Path) -> None:
    """Each shipped example, with the command its header comment shows (model, data, out added)."""
    folder = tmp_path / "work"
    shutil.copytree(base_sandbox / "plain", folder)
    (folder / "heldout.jsonl").unlink()  # an example must not need files its command does not name
    ranked = [  # four rated responses: best-vs-rest pairs have three score gaps (Curry-DPO's 3 stages)
        {"prompt": r["prompt"], "responses": [r["chosen"], "1x.", "22x.", "333x."], "scores": [4, 3, 2, 1]}
        for r in pair_rows(12, seed=3)
    ]
    write_jsonl(folder / "ranked.jsonl", ranked)
    header = (ROOT / "examples" / f"{example}.yaml").read_text(encoding="utf-8")
    shown = re.findall(r"^#\s+preftune train (.*)$", header, flags=re.M)
    assert shown, f"examples/{example}.yaml: its header shows no 'preftune train' command to copy"
    words = shlex.split(shown[0])
    cmd = DocCommand(f"examples/{example}.yaml", ("train", *words), "preftune")
    code, err = _run(cmd, folder)
    assert code == 0, f"examples/{example}.yaml: preftune train {shown[0]} exited {code}:\n{err}"


def _python_blocks(path: Path) -> list[tuple[int, str]]:
    blocks, current, start = [], [], 0
    lang = None
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if lang is None and line.strip().startswith("```"):
            lang, current, start = line.strip()[3:].strip().lower(), [], n
        elif lang is not None and line.strip().startswith("```"):
            if lang == "python":
                blocks.append((start, "\n".join(current)))
            lang = None
        elif lang is not None:
            current.append(line)
    return blocks


def _block_params(slow: bool) -> list[object]:
    """Python blocks: those that run the built-in task (minutes) belong to the slow tier."""
    out = []
    for path in DOCS:
        for line, code in _python_blocks(path):
            if ("quickstart" in code) == slow:
                out.append(pytest.param(path, line, code, id=f"{path.name}:{line}"))
    return out


def _exec_block(path: Path, line: int, code: str, folder: Path) -> dict[str, object]:
    scope: dict[str, object] = {}
    with _cwd(folder), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        exec(compile(code, f"{path.name}:{line}", "exec"), scope)  # noqa: S102 - our own docs
    return scope


@pytest.mark.parametrize(("path", "line", "code"), _block_params(slow=False))
def test_doc_python_block_runs(path: Path, line: int, code: str, base_sandbox: Path, tmp_path: Path) -> None:
    """The Python examples run as written in the sandbox; README's gives the values it promises."""
    folder = tmp_path / "work"
    shutil.copytree(base_sandbox / "plain", folder)
    scope = _exec_block(path, line, code, folder)
    if path.name == "README.md" and "result" in scope:
        import torch

        assert scope["result"].steps == 1  # type: ignore[attr-defined]
        # IPO on per-token means: h̄ = (-10+11)/5 - (-12+11)/6 = 0.2 + 1/6; loss = (h̄ - 1/(2β))², β 0.1
        h = 0.2 + 1 / 6
        assert torch.allclose(scope["out"], torch.tensor([(h - 5.0) ** 2]))  # type: ignore[arg-type]
        logps = scope["logps"]
        assert len(logps) == 1 and logps[0].shape == (2,) and bool((logps[0] < 0).all())  # type: ignore


@pytest.mark.slow
@pytest.mark.parametrize(("path", "line", "code"), _block_params(slow=True))
def test_doc_python_block_runs_slow(
    path: Path, line: int, code: str, base_sandbox: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "work"
    shutil.copytree(base_sandbox / "plain", folder)
    _exec_block(path, line, code, folder)
