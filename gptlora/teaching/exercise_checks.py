"""Checks for the exercise notebooks in ``exercises/``: every failure is one sentence a student can act on.

The tests of an exercise (run by otter-grader's ``grader.check("q1")``) call these
helpers instead of bare ``assert``: a failure says what was expected, what was found
and, when the found value is the one a typical mistake gives, which mistake that is.
The test computes those mistaken values itself (``mistakes={"forgot the biases":
value_without_biases}``), so the hint is a diagnosis, not a guess.

Nothing here needs otter-grader; an ``AssertionError`` is what otter reports.
"""

from __future__ import annotations

import math

import torch


class ExerciseCheckFailed(AssertionError):
    """A check of a student's answer failed; the message is meant for the student."""


def _fail(message: str):
    raise ExerciseCheckFailed(message)


def _describe(value) -> str:
    """A short description of ``value``: tensors by shape, dtype and a few entries."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return f"a scalar tensor {value.item():.6g}"
        preview = ", ".join(f"{v:.4g}" for v in value.detach().flatten()[:4].tolist())
        return f"a {value.dtype} tensor of shape {list(value.shape)} starting [{preview}, ...]"
    if isinstance(value, (tuple, list)) and any(isinstance(v, (torch.Tensor, tuple, list)) for v in value):
        inner = ", ".join(_describe(v) for v in value)
        return f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return repr(value)


def answered(name: str, value):
    """``value`` unless it is still the notebook's placeholder (``...``) or ``None``; then fail saying so."""
    if value is Ellipsis:
        _fail(f"`{name}` is still `...`: replace the `...` with your answer and run the cell again")
    if value is None:
        _fail(f"`{name}` is None: did you forget a `return` (or run the cell that defines it)?")
    return value


def call(name: str, function, *args, **kwargs):
    """``function(*args, **kwargs)`` for the student's function ``name``; a clear failure if it is
    missing, raises, or returns nothing."""
    answered(name, function)
    if not callable(function):
        _fail(f"`{name}` should be a function, found {_describe(function)}")
    try:
        result = function(*args, **kwargs)
    except Exception as error:  # the student's code: report any failure as a message, not a traceback
        shown = ", ".join([_describe(a) for a in args] + [f"{k}={_describe(v)}" for k, v in kwargs.items()])
        _fail(f"`{name}({shown})` raised {type(error).__name__}: {error}")
    if result is Ellipsis:
        _fail(f"`{name}` still returns `...`: write its body")
    if result is None:
        _fail(f"`{name}` returned None: write its body in place of the `...` and end it with `return`")
    return result


def _same(found, expected, atol: float, rtol: float) -> bool:
    if isinstance(expected, torch.Tensor):
        return (isinstance(found, torch.Tensor) and found.shape == expected.shape
                and torch.allclose(found.detach().double(), expected.detach().double(), atol=atol, rtol=rtol,
                                   equal_nan=True))
    if isinstance(expected, (tuple, list)):
        return (isinstance(found, (tuple, list)) and len(found) == len(expected)
                and all(_same(f, e, atol, rtol) for f, e in zip(found, expected)))
    if isinstance(expected, dict):
        return isinstance(found, dict) and found.keys() == expected.keys() and all(
            _same(found[k], expected[k], atol, rtol) for k in expected)
    if isinstance(expected, bool) or isinstance(found, bool):
        return found is expected
    if isinstance(found, torch.Tensor) and found.numel() == 1 and isinstance(expected, (int, float)):
        found = found.item()
    if isinstance(expected, int) and isinstance(found, (int, float)):
        return found == expected  # counts are exact: a relative tolerance would let gpt2-small's off by 1,536 pass
    if isinstance(expected, (int, float)):
        return isinstance(found, (int, float)) and math.isclose(found, expected, rel_tol=rtol, abs_tol=atol)
    return found == expected


def _max_difference(found: torch.Tensor, expected: torch.Tensor) -> float:
    difference = (found.detach().double() - expected.detach().double()).abs()
    return difference.nan_to_num(nan=float("inf")).max().item() if difference.numel() else 0.0


def diagnose(found, mistakes: dict | None, atol: float = 1e-6, rtol: float = 1e-5) -> str:
    """`` Likely mistake: ...`` when ``found`` equals the value of one of ``mistakes``
    (``{description: value that mistake gives}``), else ``""``."""
    for description, value in (mistakes or {}).items():
        if _same(found, value, atol, rtol):
            return f" Likely mistake: {description}."
    return ""


def expect(what: str, found, expected, mistakes: dict | None = None, hint: str = "",
           atol: float = 1e-6, rtol: float = 1e-5) -> None:
    """Fail unless ``found`` equals ``expected`` (integers exactly, floats and tensors to ``atol``/``rtol``).

    ``what`` names the quantity (``"feed-forward parameters of gpt2-small"``);
    ``mistakes`` maps typical mistakes to the value each gives, and the one that
    matches ``found`` is named in the message; ``hint`` is said when none matches.
    """
    if _same(found, expected, atol, rtol):
        return
    diagnosis = diagnose(found, mistakes, atol, rtol)
    nested = isinstance(expected, (tuple, list)) and any(isinstance(e, (torch.Tensor, tuple, list)) for e in expected)
    if nested and not diagnosis and isinstance(found, (tuple, list)) and len(found) == len(expected):
        for index, (found_item, expected_item) in enumerate(zip(found, expected)):  # name the first item that differs
            expect(f"{what}, item {index}", found_item, expected_item, hint=hint, atol=atol, rtol=rtol)
    if isinstance(expected, torch.Tensor):
        if not isinstance(found, torch.Tensor):
            _fail(f"{what}: expected a tensor of shape {list(expected.shape)}, found {_describe(found)}")
        if found.shape != expected.shape:
            _fail(f"{what}: expected shape {list(expected.shape)}, found shape {list(found.shape)}."
                  + (diagnosis or (f" {hint}" if hint else "")))
        found_nans = int(found.isnan().sum()) - int(expected.isnan().sum())
        if found_nans > 0:
            gap = f"hold {found_nans} NaN entries more than expected"  # e.g. a softmax over a row masked entirely
        else:
            gap = f"differ from the expected ones by up to {_max_difference(found, expected):.3g}"
        message = f"{what}: values {gap} (expected {_describe(expected)}, found {_describe(found)})."
    else:
        message = f"{what}: expected {_describe(expected)}, found {_describe(found)}."
    _fail(message + (diagnosis or (f" {hint}" if hint else "")))


def random_gpt_config(seed: int, **overrides):
    """A small random ``GPTConfig`` (width, heads, layers, vocabulary, bias drawn from ``seed``), so that
    a hidden test checks a formula on shapes a student cannot have hard-coded."""
    from ..model import GPTConfig

    generator = torch.Generator().manual_seed(seed)

    def draw(low, high):
        return int(torch.randint(low, high + 1, (), generator=generator))

    heads = draw(1, 4)
    values = dict(vocab_size=draw(50, 500), context_length=draw(8, 64), emb_dim=heads * draw(2, 12),
                  n_heads=heads, n_layers=draw(1, 4), drop_rate=0.0, qkv_bias=bool(draw(0, 1)))
    return GPTConfig(**{**values, **overrides})


def sampling_probabilities(logits: torch.Tensor, temperature: float, top_k: int | None = None) -> torch.Tensor:
    """The probabilities ``[B, V]`` that ``gptlora.generation.next_token(logits [B, V], temperature, top_k)``
    samples from (``temperature`` above 0), caught where it hands them to ``torch.multinomial``.

    A check compares a student's temperature or top-k with the library's own sampling this way,
    rather than with a copy of the formula that the student notebook would show.
    """
    from unittest import mock

    from ..generation import next_token

    if temperature <= 0:
        raise ValueError(f"temperature {temperature} is greedy: next_token samples only above 0")
    seen = []

    def record(probabilities, num_samples, **_):
        seen.append(probabilities.detach().clone())
        return probabilities.argmax(dim=-1, keepdim=True)

    with mock.patch("torch.multinomial", record):
        next_token(logits, temperature, top_k)
    return seen[0]


def reference_attention_weights(scores: torch.Tensor) -> torch.Tensor:
    """The causal attention weights ``[..., T, T]`` that ``MultiHeadAttention.attention_reference``
    computes from attention scores ``[..., T, T]`` (row = query position, column = key position).

    One head of width T whose input, keys, values and output projection are identities: its queries
    are then the scores themselves (times sqrt(T), which the head divides out again) and its output is
    its attention weights. Checks compare a student's mask with the model's own code this way.
    """
    from ..model import MultiHeadAttention

    t = scores.shape[-1]
    eye = torch.eye(t, dtype=torch.float64)
    head = MultiHeadAttention(t, t, context_length=t, dropout=0.0, num_heads=1).double().eval()
    weights = []
    with torch.no_grad():
        for layer in (head.W_key, head.W_value, head.out_proj):
            layer.weight.copy_(eye)
        head.out_proj.bias.zero_()
        for matrix in scores.detach().reshape(-1, t, t).double():
            head.W_query.weight.copy_(matrix.T * math.sqrt(t))  # queries = scores * sqrt(T)
            weights.append(head.attention_reference(eye[None])[0])
    return torch.stack(weights).reshape(scores.shape).to(scores.dtype)


def batch_read_at_one_position(generator: torch.Generator, batch: int, time: int, classes: int):
    """``(logits [B, T, C], labels [B], lengths [B])`` for checking where a classifier reads its class.

    Every row ends in padding (``lengths < T``); at a row's last real token (``lengths - 1``) one class
    wins by a wide margin, elsewhere the logits are random, and the labels agree with that class in
    about two rows out of three. So reading the last, the first or the next position, or predicting
    one class throughout, marks another set of rows as right (tests/test_exercise_checks.py checks
    this for the seeds the exercises use), and a check row by row can tell which mistake it was.
    """
    lengths = torch.randint(1, time, (batch,), generator=generator)
    read = torch.randint(0, classes, (batch,), generator=generator)
    logits = torch.randn(batch, time, classes, generator=generator)
    rows = torch.arange(batch)
    logits[rows, lengths - 1, read] = 10.0
    agree = torch.rand(batch, generator=generator) < 2 / 3
    other = (read + torch.randint(1, max(classes, 2), (batch,), generator=generator)) % classes
    return logits, torch.where(agree, read, other), lengths
