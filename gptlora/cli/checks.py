"""What the ``gptlora`` command checks before it starts, and how it reports problems.

- ``type=`` helpers for argparse that check a number's range and name it in the
  message: ``whole_number(1)`` ("a whole number of at least 1"), ``real_number(above=0)``,
  ``probability()`` (0 <= p < 1, for dropout), ``fraction()``, ``SEED`` (all from ``infra.ranges``, whose
  ranges the settings dataclasses check too), and ``device_name``. A bad value stops the command before
  anything is loaded, with ``error: argument --epochs: expected ...``.
- :class:`CommandParser`: argparse's own errors as that one line (no usage block).
- :func:`one_line_warnings`: Python warnings as ``warning: message``, without the
  ``UserWarning`` class and source line.
- :func:`error_line`: the one ``error:`` line for an exception; ``--debug`` or
  ``GPTLORA_DEBUG=1`` (:func:`debug_requested`) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sys
import warnings
from pathlib import Path

# The numeric types live below the command, in infra.ranges, because the settings dataclasses
# (recipes.settings) check the same ranges in __post_init__; app.py takes them from here.
from ..infra.ranges import SEED, fraction, positive_float, probability, real_number, whole_number  # noqa: F401

DEBUG_ENV = "GPTLORA_DEBUG"


def device_name(text: str) -> str:
    """An argparse ``type`` for ``--device``: ``auto``, or a torch device this machine has (``cpu``, ``cuda``,
    ``cuda:1``, ``mps``, ...). Returned as written; ``cli.pick_device`` turns it into a ``torch.device``."""
    if text == "auto":
        return text  # the default: no need to import torch while parsing
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda, cuda:N or another torch device, found {text!r}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise argparse.ArgumentTypeError(f"{text!r} is not available: this machine has {count} CUDA device(s) "
                                             "that PyTorch can use; use auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError("'mps' is not available on this machine; use auto or cpu")
    return text


# --- one-line errors and warnings --------------------------------------------------------

class CommandParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line, ``error: PROG: MESSAGE (see PROG --help)``,
    exit status 2. ``add_subparsers`` makes its subcommands of the same class."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def add_debug_option(parser: argparse.ArgumentParser, subcommands: dict) -> None:
    """``--debug`` before the subcommand and after it (``gptlora --debug finetune`` or ``gptlora finetune
    --debug``). Call once every subcommand exists."""
    help_text = f"show the full traceback of an error (or set {DEBUG_ENV}=1)"
    parser.add_argument("--debug", action="store_true", help=help_text)
    for subparser in subcommands.values():
        subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=help_text)


def debug_requested(args: argparse.Namespace | None = None) -> bool:
    """True with ``--debug`` or ``GPTLORA_DEBUG=1``."""
    flag = bool(getattr(args, "debug", False))
    return flag or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes")


def error_line(error: BaseException, user_errors: tuple) -> str:
    """The one ``error: ...`` line for ``error``: its message for what a user can cause (``user_errors``),
    otherwise its type too, marked as unexpected. The operating system's own errors (a path that is a
    file, no permission, a full disk) are put in words with what to do.

    A message of several lines keeps its first line, which by this package's convention is the whole
    report (what was expected, what was found, what to do); the lines after it are details (every URL
    tried, every tensor of the wrong shape), which ``--debug`` shows with the traceback."""
    if isinstance(error, OSError) and error.errno is not None:
        return f"error: {os_error_in_words(error)}"
    report, _, details = str(error).partition("\n")
    more = f" (--debug shows {details.strip().count(chr(10)) + 1} more lines)" if details.strip() else ""
    if isinstance(error, user_errors):
        return f"error: {report}{more}"
    return (f"error: unexpected {type(error).__name__}: {report} (run again with --debug for the traceback, "
            "and please report it)")


def os_error_in_words(error: OSError) -> str:
    """What went wrong with which path, and what to do, for an ``OSError`` raised by the operating system."""
    path = Path(error.filename) if error.filename is not None else None
    if path is not None and error.errno in (errno.ENOTDIR, errno.EEXIST):
        blocking = next((part for part in (path, *path.parents) if part.is_file()), path)
        inside = f", so {path} cannot be made inside it" if blocking != path else ""
        return f"{blocking} is a file, not a directory{inside}; give the path of a folder (it is created if missing)"
    if path is not None and error.errno == errno.EISDIR:
        return f"{path} is a directory, not a file; expected a file there (remove or rename the directory)"
    if path is not None and error.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied for {path}; check its permissions or choose another path"
    if error.errno == errno.ENOSPC:
        return f"no space left on the device{f' writing {path}' if path else ''}; free some space and run again"
    return f"{error.strerror or error}{f': {path}' if path else ''}"


@contextlib.contextmanager
def one_line_warnings(stream=None):
    """Within the block, each Python warning prints as ``warning: MESSAGE`` on stderr (or ``stream``)."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=stream or sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield
