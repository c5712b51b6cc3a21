"""Cases of a slow learning test, those measured below their target as strict expected failures.

`measured_cases(names, measured)` gives pytest parameters: a name in `measured` (name → the measured
numbers, the xfail's reason) is a strict xfail, so a change that makes it pass fails the run and is
noticed; the others are plain cases.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pytest


def measured_cases(names: Iterable[str], measured: Mapping[str, str]) -> list[Any]:
    """`names` as pytest parameters, each in `measured` a strict xfail with its measured numbers."""
    return [
        pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=measured[name]))
        if measured.get(name)
        else name
        for name in names
    ]
