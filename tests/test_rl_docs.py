"""docs/online.md names every registered estimator and policy term."""

from __future__ import annotations

from pathlib import Path

from preftune import rl

DOC = Path(__file__).resolve().parents[1] / "docs" / "online.md"


def test_every_estimator_is_documented() -> None:
    text = DOC.read_text()
    missing = [name for name in rl.ESTIMATORS if f"| `{name}` |" not in text]
    assert not missing, f"docs/online.md lacks estimators {missing}"


def test_train_command_and_every_preset_are_documented() -> None:
    from preftune.online_methods import PRESETS

    text = DOC.read_text()
    assert "## `preftune train grpo`" in text and "Not yet available" in text  # what is missing, said
    shown = {
        name: p.builder or p.estimator for name, p in PRESETS.items()
    }  # a builder replaces the estimator
    assert not [name for name in PRESETS if f"| `{name}` | `{shown[name]}`" not in text]


def test_every_policy_term_and_aggregation_is_documented() -> None:
    text = DOC.read_text()
    assert not [name for name in rl.POLICY_LOSSES if f"| `{name}` |" not in text]
    assert not [name for name in rl.AGGREGATIONS if f"| `{name}` |" not in text]


def test_every_builtin_reward_is_documented() -> None:
    from preftune import reward

    text = DOC.read_text()
    assert not [name for name in reward.BUILTIN if f"| `{name}` |" not in text]
