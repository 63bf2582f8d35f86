"""Allowed ranges of numeric settings, checked the same way on the command line and in Python.

A :class:`NumberRange` is both an argparse ``type=`` (``parser.add_argument("--epochs",
type=whole_number(1))``: the text is parsed and checked while the command line is read) and
a check of a value already in Python (``whole_number(1).check("epochs", 0)``, which the
settings dataclasses of ``recipes.settings`` run in ``__post_init__``). One object, one
message: "expected a whole number of at least 1, found 0".
"""

from __future__ import annotations

import argparse
import math


def _number(value) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def range_words(minimum=None, maximum=None, above=None, below=None) -> str:
    """The allowed range in words: "at least 1", "from 0 to 10", "at least 0 and below 1", ..."""
    if minimum is not None and maximum is not None and above is None and below is None:
        return f"from {_number(minimum)} to {_number(maximum)}"
    low = f"above {_number(above)}" if above is not None else (
        f"at least {_number(minimum)}" if minimum is not None else "")
    high = f"below {_number(below)}" if below is not None else (
        f"at most {_number(maximum)}" if maximum is not None else "")
    return " and ".join(part for part in (low, high) if part)


class NumberRange:
    """Whole or finite real numbers within bounds: ``minimum``/``maximum`` included, ``above``/``below``
    excluded (None: no bound on that side). ``nan`` and ``inf`` are never in range.

    Call it on text (argparse): the number, or ``argparse.ArgumentTypeError``. :meth:`check` a value:
    the value, or ``ValueError`` naming the setting.
    """

    def __init__(self, whole: bool, minimum=None, maximum=None, above=None, below=None):
        self.whole, self.bounds = whole, (minimum, maximum, above, below)
        words = range_words(*self.bounds)
        noun = "a whole number" if whole else "a finite number"
        self.expected = f"{noun} {'of ' if words.startswith('at ') else ''}{words}".strip()
        self.__name__ = "whole number" if whole else "number"  # argparse names the type in its messages

    def in_range(self, value) -> bool:
        """Whether ``value`` (an int or float; a bool is neither) lies in this range."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.whole and not isinstance(value, int) or not math.isfinite(value):
            return False
        minimum, maximum, above, below = self.bounds
        return not ((minimum is not None and value < minimum) or (maximum is not None and value > maximum)
                    or (above is not None and value <= above) or (below is not None and value >= below))

    def __call__(self, text: str):
        try:
            value = int(text) if self.whole else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {self.expected}, found {text!r}") from None
        if not self.in_range(value):
            raise argparse.ArgumentTypeError(f"expected {self.expected}, found {value if self.whole else repr(text)}")
        return value

    def check(self, name: str, value, optional: bool = False):
        """``value`` if in range (or None with ``optional``); else a one-line ValueError naming ``name``."""
        if (optional and value is None) or self.in_range(value):
            return value
        raise ValueError(f"{name}: expected {self.expected}, found {value!r}")


def whole_number(minimum: int | None = None, maximum: int | None = None) -> NumberRange:
    """Integers in ``[minimum, maximum]`` (None: no bound on that side)."""
    return NumberRange(True, minimum, maximum)


def real_number(minimum: float | None = None, maximum: float | None = None, *, above: float | None = None,
                below: float | None = None) -> NumberRange:
    """Finite floats within the bounds: ``minimum``/``maximum`` included, ``above``/``below`` excluded."""
    return NumberRange(False, minimum, maximum, above, below)


def positive_float() -> NumberRange:
    """Finite numbers above 0 (learning rates, LoRA alpha)."""
    return real_number(above=0)


def probability() -> NumberRange:
    """Finite numbers with 0 <= p < 1 (dropout: 1 would drop everything)."""
    return real_number(minimum=0, below=1)


def fraction() -> NumberRange:
    """Finite numbers strictly between 0 and 1 (a share of a text that leaves something on each side)."""
    return real_number(above=0, below=1)


SEED = whole_number(0, 2**32 - 1)  # the range numpy and most tools accept; torch takes it too


# The book's appendix D (``training.TrainingSchedule``, and the run settings that hold its options): the range
# of each numeric option, and the learning-rate decays after the warmup.
SCHEDULE_RANGES = dict(warmup_steps=whole_number(0), initial_lr=real_number(0), min_lr=real_number(0),
                       clip_grad_norm=positive_float(), accumulation_steps=whole_number(1))
DECAYS = ("none", "cosine")
# --precision (infra.precision): "auto" is bf16 on a CUDA device with bfloat16, else fp32.
PRECISIONS = ("auto", "fp32", "tf32", "bf16", "fp16")


def check_precision(name: str) -> str:
    """``name`` if it is one of :data:`PRECISIONS`, else a ValueError saying what was expected."""
    if name not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, found {name!r}")
    return name
