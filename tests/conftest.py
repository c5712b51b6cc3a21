"""Fixtures shared by several test modules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the char tokenizer with its chat template (load it with AutoTokenizer)."""
    from preftune.data.char_tokenizer import CHAT_TEMPLATE, build_char_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    build_char_tokenizer(chat_template=CHAT_TEMPLATE).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module, restored after it: tiny models are dominated by per-op
    overhead, and on a busy 2-core machine a second intra-op thread only adds waiting.
    Opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def _no_report_at_train_end() -> Any:
    """`train` ends by writing report.html, whose plots take ~3 s on a busy 2-core machine: the
    many tests that train skip it (module fixtures included); the tests of the report at the end
    opt in with `@pytest.mark.train_report`. Yields the real writer."""
    import preftune.train.runfolder as runfolder

    real = runfolder.write_run_report
    runfolder.write_run_report = lambda out, log: None  # type: ignore[assignment]
    yield real
    runfolder.write_run_report = real


@pytest.fixture(autouse=True)
def _train_report_when_marked(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, _no_report_at_train_end: Any
) -> None:
    if request.node.get_closest_marker("train_report") is not None:
        import preftune.train.runfolder as runfolder

        monkeypatch.setattr(runfolder, "write_run_report", _no_report_at_train_end)
