"""docs/online.md names every registered estimator."""

from __future__ import annotations

from pathlib import Path

from preftune import rl

DOC = Path(__file__).resolve().parents[1] / "docs" / "online.md"


def test_every_estimator_is_documented() -> None:
    text = DOC.read_text()
    missing = [name for name in rl.ESTIMATORS if f"| `{name}` |" not in text]
    assert not missing, f"docs/online.md lacks estimators {missing}"
    assert "not yet available" in text
