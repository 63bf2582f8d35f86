"""The one training loop: epochs of optimizer steps, evaluation every few steps, checkpoints, ``torchrun``.

Chapter 5 (next-token prediction, ``pretraining``) and chapter 6 (spam
classification, ``classifier``) of "Build a Large Language Model (From Scratch)"
train with the same loop; only three things differ, and the caller passes them in:

- ``batch_loss(batch) -> (loss, counted)``: the loss of one training batch (a
  scalar tensor with gradient) and how much it counts for the "seen" axis of the
  plots (rows of a batch for the classifier, tokens for a language model);
- ``evaluate(history) -> dict``: called every ``eval_freq`` steps; it records what
  it measured in ``history`` and returns what the progress bar shows;
- ``end_epoch(history, epoch)``: called after each epoch's last step (the
  classifier measures accuracies, the language model prints a sample).

The loop iterates the training loader exactly as the book's ``for batch in
train_loader`` does (one iterator per epoch, drawn when the epoch starts), so
under the same seed the shuffles, dropout masks and therefore the numbers are the
book's. Around that it adds what the book's loops lack: a progress bar, the hooks
of a ``checkpoint.Checkpointer`` (save every N steps and at each epoch end, resume
mid-epoch) and the bookkeeping for several processes (``distributed``).

Appendix D of the book adds three things to that loop, and :class:`TrainingSchedule`
switches them on for every command (all off by default, so that chapters 5 and 6
keep their exact numbers):

- a linear *warmup* of the learning rate from ``initial_lr`` to the optimizer's
  ``lr`` (the peak) over the first ``warmup_steps`` optimizer steps;
- a *cosine decay* from the peak towards ``min_lr`` over the remaining steps;
- *gradient clipping*: before each step after the warmup, the gradients are scaled
  so that their global norm (over all trainable tensors) is at most ``clip_grad_norm``.

Not in the book: *gradient accumulation* (``accumulation_steps``): the gradients of
that many consecutive batches are averaged before one optimizer step (an epoch's
last, shorter group is averaged over its own batches). That is the gradient of a
batch that many times larger only when each batch's loss is a mean over the same
number of counted targets and there is no dropout: with -100 targets (instruction
data) each batch's loss is the mean over its own counted tokens, and the group
averages those means, so it is close to, not equal to, the larger batch's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .infra.atomic import replace_atomically
from .infra.checkpoint import NoCheckpoints
from .infra.distributed import set_sampler_epoch, sum_over_processes, world_size
from .infra.precision import FP32, Precision
from .infra.ranges import DECAYS, SCHEDULE_RANGES
from .model import evaluating


def first_batches(data_loader, num_batches: int | None):
    """The first ``num_batches`` batches of ``data_loader`` (all of them when ``None``)."""
    limit = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    for index, batch in enumerate(data_loader):
        if index >= limit:
            break
        yield batch


def mean_batch_loss(data_loader, model, batch_loss: Callable, num_batches: int | None = None) -> float:
    """Mean of ``batch_loss(batch)`` (a scalar tensor) over the first ``num_batches`` batches; NaN if none.

    Runs in eval mode (no dropout) without gradients, then restores the model's
    mode. Losses are added as Python floats, batch after batch, as the book does.
    Under ``torchrun`` each process holds its share of every batch: the sums and
    counts of all processes are added before dividing.
    """
    losses = []
    with evaluating(model):
        for batch in first_batches(data_loader, num_batches):
            losses.append(batch_loss(batch).item())
    total, count = sum_over_processes(sum(losses), len(losses))
    return total / count if count else float("nan")


@dataclass(frozen=True)
class TrainingSchedule:
    """The appendix-D options of :func:`train_epochs`; the defaults change nothing (the book's chapters 5-6).

    - ``warmup_steps``: optimizer steps whose learning rate rises linearly from
      ``initial_lr`` (step 0) towards the peak, the ``lr`` the optimizer was built with;
    - ``decay``: ``"none"`` keeps the peak after the warmup; ``"cosine"`` lowers it along
      half a cosine towards ``min_lr`` (the book's formula: the last step's rate is still a
      little above ``min_lr``, which the cosine would reach one step later);
    - ``clip_grad_norm``: clip the global gradient norm to this value at every step from
      ``warmup_steps`` on (as the book package's ``train_model``, ``global_step >= warmup_steps``;
      the printed book's ``>`` skipped the first step after the warmup); ``None`` does not clip;
    - ``accumulation_steps``: batches whose gradients are averaged per optimizer step.

    Checked on creation: a bad value is a ValueError saying what was expected.
    """

    warmup_steps: int = 0
    initial_lr: float = 0.0
    decay: str = "none"
    min_lr: float = 0.0
    clip_grad_norm: float | None = None
    accumulation_steps: int = 1

    def __post_init__(self):
        for name, check in SCHEDULE_RANGES.items():  # the command line's ranges (infra.ranges)
            check.check(name, getattr(self, name), optional=name == "clip_grad_norm")
        if self.decay not in DECAYS:
            raise ValueError(f"decay: expected one of {', '.join(DECAYS)}, found {self.decay!r}")

    @property
    def sets_lr(self) -> bool:
        """Whether the schedule changes the learning rate at all (warmup or decay)."""
        return self.warmup_steps > 0 or self.decay != "none"

    def lr_at(self, step: int, peak_lr: float, total_steps: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based) of ``total_steps``, for peak ``peak_lr``.

        The book's formulas: ``initial_lr + step * (peak - initial_lr) / warmup_steps``
        during the warmup, then ``min_lr + (peak - min_lr) * (1 + cos(pi * progress)) / 2``
        with ``progress`` going from 0 (first step after the warmup) towards 1.
        """
        if step < self.warmup_steps:
            return self.initial_lr + step * (peak_lr - self.initial_lr) / self.warmup_steps
        if self.decay == "none":
            return peak_lr
        progress = (step - self.warmup_steps) / max(1, total_steps - self.warmup_steps)
        return self.min_lr + (peak_lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))

    def to_dict(self) -> dict:
        """The fields as a dict (for a checkpoint's fingerprint or a run's metrics)."""
        return asdict(self)


NO_SCHEDULE = TrainingSchedule()


def schedule_fingerprint(schedule: TrainingSchedule) -> dict:
    """``{"schedule": fields}`` for a checkpoint's fingerprint; ``{}`` for the default (no schedule), so that
    the checkpoints of runs without one stay resumable as they were written."""
    return {} if schedule == NO_SCHEDULE else {"schedule": schedule.to_dict()}


def steps_per_epoch(num_batches: int, schedule: TrainingSchedule = NO_SCHEDULE) -> int:
    """Optimizer steps in an epoch of ``num_batches`` batches: one per ``accumulation_steps`` (rounded up)."""
    return -(-num_batches // schedule.accumulation_steps)


def train_epochs(model, train_loader, optimizer, num_epochs: int, history, *, batch_loss: Callable,
                 eval_freq: int, evaluate: Callable, end_epoch: Callable, progress: bool = True,
                 checkpoints: NoCheckpoints | None = None, schedule: TrainingSchedule = NO_SCHEDULE,
                 precision: Precision = FP32):
    """Train ``model`` until ``history.epochs_done == num_epochs``; returns ``history``.

    ``history`` is a dataclass with ``global_step`` (-1 before the first step, as in
    the book, so step 0 is evaluated), ``epochs_done`` and a method ``count(n)`` that
    adds ``n`` to its "seen" total; a history from a checkpoint continues where it
    stopped. Each step: ``zero_grad``, ``batch_loss``, ``backward``, ``step``; then,
    every ``eval_freq`` steps, ``evaluate(history)``. ``progress=False`` hides the bar.
    See the module docstring for the three callbacks, and :class:`TrainingSchedule`
    for ``schedule`` (``global_step`` then counts optimizer steps, not batches).
    ``precision`` (``infra.precision.Precision``): the callbacks run under its autocast, the backward
    pass and the step go through its fp16 scaler; the default, fp32, is the plain calls.
    """
    checkpoints = checkpoints or NoCheckpoints()
    step_count = steps_per_epoch(len(train_loader), schedule)
    total_steps = step_count * num_epochs
    for group in optimizer.param_groups if schedule.sets_lr else ():  # the peak: the lr the optimizer was built
        group.setdefault("peak_lr", group["lr"])                      # with (kept in a checkpoint's groups)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    for epoch in range(history.epochs_done, num_epochs):
        model.train()
        set_sampler_epoch(train_loader, epoch)  # under torchrun: this epoch's shuffle
        # Batches of this epoch already trained (a resumed run restarts after an optimizer step).
        position = (history.global_step + 1 - epoch * step_count) * schedule.accumulation_steps
        bar = tqdm(checkpoints.epoch_batches(train_loader, epoch), total=len(train_loader),
                   desc=f"epoch {epoch + 1}/{num_epochs}", unit="batch", disable=not progress)
        for batch in bar:
            # Without accumulation every batch is a group of one: zero_grad, loss, backward, step (the book).
            in_group = position % schedule.accumulation_steps  # this batch's place in its group
            group_size = min(schedule.accumulation_steps, len(train_loader) - (position - in_group))
            position += 1
            if in_group == 0:
                optimizer.zero_grad()
            with precision.autocast():
                loss, counted = batch_loss(batch)
            precision.backward(loss / group_size if group_size > 1 else loss)  # the group's mean gradient
            history.count(counted * world_size())  # each process trains on its share
            if in_group + 1 < group_size:
                continue
            step = history.global_step + 1
            if schedule.sets_lr:
                for group in optimizer.param_groups:
                    group["lr"] = schedule.lr_at(step, group["peak_lr"], total_steps)
            if schedule.clip_grad_norm is not None and step >= schedule.warmup_steps:
                precision.unscale(optimizer)  # fp16: clip the true gradients, not the scaled ones
                torch.nn.utils.clip_grad_norm_(trainable, max_norm=schedule.clip_grad_norm)
            precision.step(optimizer)  # fp16: an inf/NaN gradient skips the step (counted in the precision)
            history.global_step = step
            if history.global_step % eval_freq == 0:
                with precision.autocast():
                    bar.set_postfix(evaluate(history))
            checkpoints.step_done(history)
        with precision.autocast():
            end_epoch(history, epoch)
        history.epochs_done = epoch + 1
        checkpoints.epoch_done(history)
    return history


def trainable_adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the parameters of ``model`` that train (``requires_grad``).

    ``foreach=True``: one batched update of all tensors (PyTorch's default on GPUs,
    not on CPUs, where it is faster too); the arithmetic is the default loop's, bit for
    bit (``tests/test_pretraining.py``). On CUDA, ``fused=True``: the whole update in one
    kernel per group of tensors (the same formula; float rounding may differ in the last bit).
    """
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if trainable and all(parameter.is_cuda for parameter in trainable):
        return torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay, fused=True)
    return torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay, foreach=True)


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (the model itself when not wrapped)."""
    return getattr(model, "module", model)


def plot_values(epochs_seen, examples_seen, train_values, val_values, label: str, path: str | Path,
                seen_label: str = "Examples seen") -> Path:
    """Write a PNG of training and validation ``label`` against epochs (bottom) and examples seen (top).

    ``epochs_seen`` and ``examples_seen`` give the x position of each value; ``seen_label``
    names the top axis (``"Tokens seen"`` for pretraining). The plot of both chapters' histories
    (``classifier.plot_history``, ``pretraining.plot_losses``).
    Uses a bare matplotlib ``Figure``, so no display is needed.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 3))
    axes = figure.add_subplot()
    axes.plot(epochs_seen, train_values, label=f"Training {label}")
    axes.plot(epochs_seen, val_values, linestyle="-.", label=f"Validation {label}")
    axes.set_xlabel("Epochs")
    axes.set_ylabel(label.capitalize())
    axes.legend()
    top = axes.twiny()  # a second x axis, in examples; the invisible line only sets its range
    top.plot(examples_seen, train_values, alpha=0)
    top.set_xlabel(seen_label)
    figure.tight_layout()
    with replace_atomically(Path(path)) as tmp:
        figure.savefig(tmp, format="png")
    return Path(path)
