"""One process at a time: an operating-system lock on a file beside what is being prepared.

Two notebooks, or the processes of one ``torchrun``, may ask for the same download
or the same data preparation at once. :func:`exclusive_lock` lets the first one
work while the others wait, after which they find the finished, verified file and
use it.

The lock is ``flock`` on ``<name>.lock`` (standard library ``fcntl``, no extra
package). The kernel releases it when its holder exits in any way, ``kill -9``
included, so a lock file left behind by a killed process never blocks anyone: the
next process takes the lock at once (and removes the file when it is done). A
process that is alive and holds the lock is waited for, however long it takes:
it is doing the work the waiter needs.

Guarantees hold on Linux and macOS with local folders (and NFS with working
``flock``); where ``fcntl`` does not exist (Windows) the block runs unlocked.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None


def lock_path_for(path: str | Path) -> Path:
    """``<path>.lock``: where the lock guarding ``path`` lives, beside it."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


@contextlib.contextmanager
def exclusive_lock(lock_path: str | Path, doing: str):
    """Hold an exclusive lock on ``lock_path`` for the body of the ``with`` block.

    ``doing`` says what the holder does ("downloading model.safetensors"), for the one
    line a waiting process prints. The lock file is created (with its folder) when
    missing and removed on release; a file left over from a killed process is reused.
    """
    lock_path = Path(lock_path)
    if fcntl is None:
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    said_waiting = False
    while True:
        handle = open(lock_path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not said_waiting:
                print(f"waiting for another process {doing} (lock {lock_path})", file=sys.stderr)
                said_waiting = True
            fcntl.flock(handle, fcntl.LOCK_EX)  # blocks until the holder releases it or exits
        # The holder we waited for may have removed the file and another process created a new
        # one: our lock is then on a file nobody else sees. Only a lock on the file at the path counts.
        if _same_file(handle, lock_path):
            break
        handle.close()
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock_path.unlink()  # still holding it: nobody can be between opening and locking this file
        handle.close()  # releases the lock


def _same_file(handle, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except FileNotFoundError:
        return False
