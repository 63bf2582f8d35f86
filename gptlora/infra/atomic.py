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


def read_json_object(path: Path, what: str = "a JSON object") -> dict:
    """The JSON object (a dict) in the file ``path``; a ValueError that names the file and the problem when
    it is not UTF-8, not JSON, or not an object. ``what`` says what the file should hold, for the message."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); expected {what}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); "
                         f"expected {what}. Was it cut short or edited by hand?") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}; expected a JSON object ({what})")
    return data


def write_json(data: dict, path: Path) -> None:
    """Write ``data`` as indented JSON to ``path``, atomically."""
    with replace_atomically(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
