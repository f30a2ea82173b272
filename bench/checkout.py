"""Imported first by the scripts here, so that `python bench/X.py` from anywhere times the musicssl
of this checkout (a second worktree would otherwise time the installed copy of the first);
`child_env()` does the same for the processes they start."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def child_env() -> dict[str, str]:
    """The environment for a child Python that must import this checkout's musicssl."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}
