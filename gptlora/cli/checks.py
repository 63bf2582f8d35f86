"""What the ``gptlora`` command checks before it starts, and how it reports problems.

- ``type=`` helpers for argparse that check a number's range and name it in the
  message: ``whole_number(1)`` ("a whole number of at least 1"), ``real_number(above=0)``,
  ``probability()`` (0 <= p < 1, for dropout), ``SEED``, ``device_name``. A bad value stops the command before
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
import math
import os
import sys
import warnings
from pathlib import Path

DEBUG_ENV = "GPTLORA_DEBUG"


# --- numbers in range ------------------------------------------------------------------

def _number(value) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _range_words(minimum, maximum, above=None, below=None) -> str:
    """The allowed range in words: "at least 1", "from 0 to 10", "at least 0 and below 1", ..."""
    if minimum is not None and maximum is not None and above is None and below is None:
        return f"from {_number(minimum)} to {_number(maximum)}"
    low = f"above {_number(above)}" if above is not None else (
        f"at least {_number(minimum)}" if minimum is not None else "")
    high = f"below {_number(below)}" if below is not None else (
        f"at most {_number(maximum)}" if maximum is not None else "")
    return " and ".join(part for part in (low, high) if part)


def _expected(noun: str, words: str) -> str:
    """ "a whole number of at least 1", "a finite number above 0", "a whole number" """
    return f"{noun} {'of ' if words.startswith('at ') else ''}{words}".strip()


def whole_number(minimum: int | None = None, maximum: int | None = None):
    """An argparse ``type`` accepting integers in ``[minimum, maximum]`` (None: no bound on that side)."""
    expected = _expected("a whole number", _range_words(minimum, maximum))

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, found {text!r}") from None
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected {expected}, found {value}")
        return value

    parse.__name__ = "whole number"
    return parse


def real_number(minimum: float | None = None, maximum: float | None = None, *, above: float | None = None,
                below: float | None = None):
    """An argparse ``type`` accepting finite floats within the bounds: ``minimum``/``maximum`` included,
    ``above``/``below`` excluded (None: no bound). ``nan`` and ``inf`` are always refused."""
    expected = _expected("a finite number", _range_words(minimum, maximum, above, below))

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, found {text!r}") from None
        if (not math.isfinite(value) or (minimum is not None and value < minimum)
                or (maximum is not None and value > maximum) or (above is not None and value <= above)
                or (below is not None and value >= below)):
            raise argparse.ArgumentTypeError(f"expected {expected}, found {text!r}")
        return value

    parse.__name__ = "number"
    return parse


def positive_float():
    """Finite numbers above 0 (learning rates, LoRA alpha)."""
    return real_number(above=0)


def probability():
    """Finite numbers with 0 <= p < 1 (dropout: 1 would drop everything)."""
    return real_number(minimum=0, below=1)


SEED = whole_number(0, 2**32 - 1)  # the range numpy and most tools accept; torch takes it too


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
