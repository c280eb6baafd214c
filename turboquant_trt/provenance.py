"""Which source a result came from: the commit recorded in bench and calibration reports."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]


def source_commit(repo: Path | str | None = None) -> str:
    """The short commit of the checkout this package runs from, with "-dirty" when tracked files
    differ from it (the numbers then come from a tree that no commit holds); TURBOQUANT_COMMIT when
    set (a copied tree whose git metadata may be stale); "unknown" outside a git checkout."""
    if os.environ.get("TURBOQUANT_COMMIT"):
        return os.environ["TURBOQUANT_COMMIT"]
    where = str(repo if repo is not None else _REPO)
    try:
        head = subprocess.run(["git", "-C", where, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not head:
        return "unknown"
    return head + ("-dirty" if status.strip() else "")
