"""Atomic file writes: a reader never sees a half-written file under its final name.

Everything gptlora writes (checkpoints, adapters, parquet files, JSON, plots) goes
through :func:`replace_atomically`: the bytes land in a temporary file beside the
destination, which is renamed over it only once the write has finished. A crash
or Ctrl-C mid-write leaves the previous file (or none) in place.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path


@contextlib.contextmanager
def replace_atomically(dest: Path):
    """Yield a temporary path next to ``dest``; on success it replaces ``dest`` in one step.

    If the body raises, the temporary file is removed and ``dest`` is untouched.
    (``os.replace`` is atomic when both paths are on one file system, hence "beside".)
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(data: dict, path: Path) -> None:
    """Write ``data`` as indented JSON to ``path``, atomically."""
    with replace_atomically(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
