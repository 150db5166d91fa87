"""Lines tests want shown at the end of the pytest run (figures to quote, e.g. the soak test's)."""
from __future__ import annotations

import pytest

#: config.stash key: list of summary lines, printed by conftest's pytest_terminal_summary.
SUMMARY_LINES = pytest.StashKey[list]()


def add_summary_line(config: pytest.Config, line: str) -> None:
    config.stash.setdefault(SUMMARY_LINES, []).append(line)
