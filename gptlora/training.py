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
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .infra.atomic import replace_atomically
from .infra.checkpoint import NoCheckpoints
from .infra.distributed import set_sampler_epoch, sum_over_processes, world_size
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


def train_epochs(model, train_loader, optimizer, num_epochs: int, history, *, batch_loss: Callable,
                 eval_freq: int, evaluate: Callable, end_epoch: Callable, progress: bool = True,
                 checkpoints: NoCheckpoints | None = None):
    """Train ``model`` until ``history.epochs_done == num_epochs``; returns ``history``.

    ``history`` is a dataclass with ``global_step`` (-1 before the first step, as in
    the book, so step 0 is evaluated), ``epochs_done`` and a method ``count(n)`` that
    adds ``n`` to its "seen" total; a history from a checkpoint continues where it
    stopped. Each step: ``zero_grad``, ``batch_loss``, ``backward``, ``step``; then,
    every ``eval_freq`` steps, ``evaluate(history)``. ``progress=False`` hides the bar.
    See the module docstring for the three callbacks.
    """
    checkpoints = checkpoints or NoCheckpoints()
    for epoch in range(history.epochs_done, num_epochs):
        model.train()
        set_sampler_epoch(train_loader, epoch)  # under torchrun: this epoch's shuffle
        bar = tqdm(checkpoints.epoch_batches(train_loader, epoch), total=len(train_loader),
                   desc=f"epoch {epoch + 1}/{num_epochs}", unit="batch", disable=not progress)
        for batch in bar:
            optimizer.zero_grad()
            loss, counted = batch_loss(batch)
            loss.backward()
            optimizer.step()
            history.count(counted * world_size())  # each process trains on its share
            history.global_step += 1
            if history.global_step % eval_freq == 0:
                bar.set_postfix(evaluate(history))
            checkpoints.step_done(history)
        end_epoch(history, epoch)
        history.epochs_done = epoch + 1
        checkpoints.epoch_done(history)
    return history


def trainable_adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the parameters of ``model`` that train (``requires_grad``).

    ``foreach=True``: one batched update of all tensors (PyTorch's default on GPUs,
    not on CPUs, where it is faster too); the arithmetic is the default loop's, bit for
    bit (``tests/test_pretraining.py``).
    """
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
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
