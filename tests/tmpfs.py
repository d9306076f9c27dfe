"""A small tmpfs for the disk-full tests (tests/test_reliability.py, tests/test_faults.py)."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess


def mount_tmpfs(path: pathlib.Path, size: str) -> bool:
    """Creates ``path`` and mounts a tmpfs of ``size`` (e.g. ``"120k"``) there.

    Returns False where that is not possible (not root, no ``mount``): the caller
    skips. The caller unmounts (``umount path``) when done.
    """
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0
