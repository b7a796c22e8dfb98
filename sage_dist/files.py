"""Output folders and JSON that every layer writes: one writability check and one NaN-to-null conversion.

The bottom layer of the package (it imports nothing of sage_dist), so the tracking store, erasure outputs,
evaluation folders and study storage all fail the same way, before any work starts, when they cannot be written.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any


def ensure_writable_folder(path: str | Path, what: str, fix: str = "") -> Path:
    """Create folder ``path`` (and its parents) and check a file can be written in it; returns it.

    Args:
        path: the folder.
        what: how the user named it, for the message (e.g. ``"--out"``, ``"study storage (--storage)"``).
        fix: what to do instead (default: ``"choose a writable <what>"``).
    Raises:
        ValueError: naming ``what``, the folder and the reason, when it cannot be created or written (a file in
            its place, no permission, a read-only or full file system).
    """
    path = Path(path)
    fix = fix or f"choose a writable {what}"
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file, not a folder; {fix}")
    probe = path / f".write_probe_{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"{what} {path}: cannot create or write this folder ({err.strerror or err}); {fix}") from err
    return path


def nan_to_none(x: Any) -> Any:
    """``x`` with every float NaN (in nested dicts, lists and tuples) replaced by None, so that ``json.dumps``
    writes strict JSON (``null``, not ``NaN``); e.g. an RER whose original model never shows the concept."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [nan_to_none(v) for v in x]
    return x
