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
    missing and removed on release; a file left over from a killed process is reused,
    whoever owns it: it is opened read-only (``flock`` needs no write access), so in a
    shared classroom folder one user's leftover never locks out another.
    """
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)  # also without fcntl: the caller writes beside it
    if fcntl is None:
        yield
        return
    said_waiting = False
    while True:
        try:
            handle = os.open(lock_path, os.O_RDONLY | os.O_CREAT, 0o666)  # 0o666 less the umask
        except FileNotFoundError:  # the folder was removed meanwhile (a failed download cleans up): again
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            continue
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
        os.close(handle)
    try:
        yield
    finally:
        # Still holding it: nobody can be between opening and locking this file. A folder we may not
        # write to keeps the file, which is harmless (the next holder reuses it).
        with contextlib.suppress(OSError):
            lock_path.unlink()
        os.close(handle)  # releases the lock


def _same_file(handle: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(handle), os.stat(path))
    except FileNotFoundError:
        return False
