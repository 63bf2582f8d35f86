"""Pretraining: next-token loss, perplexity, the book's ``train_model_simple``, the loss plot, saving.

Chapter 5 of "Build a Large Language Model (From Scratch)": a GPT learns to
predict every next token of a text. For a batch of windows (``text_data``) the
model returns logits ``[B, T, V]``; position ``t`` of each row is scored against
``target[t]``, the token that really follows, with cross-entropy over all
``B * T`` positions. Its exponential, the perplexity, reads as "the model is as
unsure as if it chose among this many tokens": 50,257 (the whole vocabulary)
for a model that knows nothing.

The loop is ``training.train_epochs``, the same one that fine-tunes the spam
classifier; this module gives it the language model's loss, evaluation and
per-epoch sample.

Shapes: ``B`` batch size, ``T`` tokens per row, ``V`` vocabulary size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .infra.checkpoint import (NoCheckpoints, load_optimizer_state, load_trainable_state, optimizer_state,
                               read_checkpoint, save_checkpoint)
from .generation import generate, text_to_token_ids, token_ids_to_text
from .prompt_tuning import VirtualTokenModel
from .model import evaluating
from .infra.precision import FP32, Precision
from .infra.speed import to_device
from .training import NO_SCHEDULE, TrainingSchedule, mean_batch_loss, plot_values, train_epochs, unwrapped


def calc_loss_batch(input_batch, target_batch, model, device) -> torch.Tensor:
    """Mean next-token cross-entropy of one batch: a scalar tensor (with gradient in grad mode).

    ``input_batch`` and ``target_batch`` are token ids ``[B, T]``; the logits
    ``[B, T, V]`` are flattened to ``[B*T, V]`` against targets ``[B*T]``.
    """
    logits = model(to_device(input_batch, device))
    return F.cross_entropy(logits.flatten(0, 1), to_device(target_batch, device).flatten())


def calc_loss_loader(data_loader, model, device, num_batches=None) -> float:
    """Mean batch loss over the first ``num_batches`` batches (all when None); NaN for an empty loader.

    As the book uses it: in eval mode (no dropout) and without gradients; the
    model's mode is restored afterwards. Iterating a shuffled loader draws from
    PyTorch's global generator, as in the book.
    """
    def batch_loss(batch):
        inputs, targets = batch
        return calc_loss_batch(inputs, targets, model, device)

    return mean_batch_loss(data_loader, model, batch_loss, num_batches)


def perplexity(loss):
    """``exp(loss)``: a tensor for a tensor, a float for a float (the book: 10.7940 -> 48725.8203)."""
    return torch.exp(loss) if torch.is_tensor(loss) else math.exp(loss)


def evaluate_model(model, train_loader, val_loader, device, eval_iter):
    """``(train_loss, val_loss)`` over the first ``eval_iter`` batches of each loader."""
    return (calc_loss_loader(train_loader, model, device, num_batches=eval_iter),
            calc_loss_loader(val_loader, model, device, num_batches=eval_iter))


def sample_text(model, tokenizer, start_context: str, max_new_tokens: int = 50) -> str:
    """A greedy continuation of ``start_context`` by ``max_new_tokens`` tokens, newlines shown as spaces.

    The book's ``generate_and_print_sample`` without the print: eval mode, the
    model's whole context, greedy. Uses the KV cache (same tokens as the book's
    uncached loop, in a fraction of the time), except for a model with virtual tokens
    (P-tuning), whose prompt would have to stay when the cache slides. Restores the model's mode.
    """
    model = unwrapped(model)
    device = next(model.parameters()).device
    with evaluating(model):
        ids = generate(model, text_to_token_ids(start_context, tokenizer).to(device), max_new_tokens,
                       use_cache=not isinstance(model, VirtualTokenModel))
    return token_ids_to_text(ids, tokenizer).replace("\n", " ")


def generate_and_print_sample(model, tokenizer, device, start_context: str, max_new_tokens: int = 50) -> None:
    """Print :func:`sample_text` (the book's function; ``device`` is where the model already is)."""
    print(sample_text(model, tokenizer, start_context, max_new_tokens))


@dataclass
class PretrainingHistory:
    """What :func:`train_language_model` records: losses every ``eval_freq`` steps, a sample per epoch.

    ``track_tokens_seen[i]`` is the number of training tokens seen when
    ``train_losses[i]`` and ``val_losses[i]`` were measured.
    """

    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    track_tokens_seen: list[int] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)
    tokens_seen: int = 0
    global_step: int = -1  # as in the book: the first step is 0, so it is evaluated
    epochs_done: int = 0

    def count(self, tokens: int) -> None:
        """Add the tokens of one training step (all processes) to ``tokens_seen``."""
        self.tokens_seen += tokens


def train_language_model(model, train_loader, val_loader, optimizer, device, num_epochs: int, eval_freq: int,
                         eval_iter: int, start_context: str, tokenizer, *, sample_tokens: int = 50,
                         progress: bool = False, verbose: bool = True, history: PretrainingHistory | None = None,
                         checkpoints: NoCheckpoints | None = None,
                         schedule: TrainingSchedule = NO_SCHEDULE, precision: Precision = FP32) -> PretrainingHistory:
    """The book's ``train_model_simple``, returning the whole :class:`PretrainingHistory`.

    Every ``eval_freq`` steps: the mean loss over ``eval_iter`` batches of each
    loader, printed as the book prints it (``Ep 1 (Step 000000): Train loss 9.781,
    Val loss 9.933``); after each epoch a greedy sample of ``sample_tokens`` tokens
    from ``start_context``. ``progress`` shows a bar, ``verbose=False`` prints
    nothing. ``history`` and ``checkpoints`` resume and save as in
    ``classifier.train_classifier``; ``schedule`` adds appendix D (``training.TrainingSchedule``:
    with a warmup, cosine decay and clipping this is the book's appendix-D ``train_model``);
    ``precision`` (``infra.precision.Precision``): fp32 (the book), or autocast to bf16/fp16.
    """
    history = history or PretrainingHistory()
    log = tqdm.write if verbose else (lambda message: None)  # tqdm.write: print, below any bar

    def batch_loss(batch):
        inputs, targets = batch
        return calc_loss_batch(inputs, targets, model, device), inputs.numel()

    def evaluate(history):
        train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, eval_iter)
        history.train_losses.append(train_loss)
        history.val_losses.append(val_loss)
        history.track_tokens_seen.append(history.tokens_seen)
        log(f"Ep {history.epochs_done + 1} (Step {history.global_step:06d}): "
            f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
        return dict(train_loss=f"{train_loss:.3f}", val_loss=f"{val_loss:.3f}")

    def end_epoch(history, epoch):
        history.samples.append(sample_text(model, tokenizer, start_context, sample_tokens))
        log(history.samples[-1])

    return train_epochs(model, train_loader, optimizer, num_epochs, history, batch_loss=batch_loss,
                        eval_freq=eval_freq, evaluate=evaluate, end_epoch=end_epoch, progress=progress,
                        checkpoints=checkpoints, schedule=schedule, precision=precision)


def train_model_simple(model, train_loader, val_loader, optimizer, device, num_epochs, eval_freq, eval_iter,
                       start_context, tokenizer):
    """The book's function: ``(train_losses, val_losses, track_tokens_seen)``, printing as the book does.

    See :func:`train_language_model`, which this calls, for options the book lacks
    (progress bar, checkpoints, silence).
    """
    history = train_language_model(model, train_loader, val_loader, optimizer, device, num_epochs, eval_freq,
                                   eval_iter, start_context, tokenizer)
    return history.train_losses, history.val_losses, history.track_tokens_seen


def plot_losses(epochs_seen, tokens_seen, train_losses, val_losses, path: str | Path) -> Path:
    """Write the book's loss plot as PNG: losses against epochs (bottom axis) and tokens seen (top axis).

    ``epochs_seen`` and ``tokens_seen`` give the x position of each loss, e.g.
    ``torch.linspace(0, num_epochs, len(train_losses))`` and ``track_tokens_seen``.
    """
    return plot_values(epochs_seen, tokens_seen, train_losses, val_losses, "loss", path, seen_label="Tokens seen")


def plot_history(history: PretrainingHistory, path: str | Path) -> Path:
    """:func:`plot_losses` of a run's history."""
    epochs = torch.linspace(0, history.epochs_done, len(history.train_losses))
    return plot_losses(epochs, history.track_tokens_seen, history.train_losses, history.val_losses, path)


# --- saving and loading a model with its optimizer (the book's model_and_optimizer.pth, without pickle) ----

def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name; a tied head appears once, as ``tok_emb.weight``."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def save_model_and_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: str | Path) -> Path:
    """Save the model's weights and the optimizer's state (AdamW's moments) to one safetensors file.

    Nothing is pickled; the file is written atomically and checked by SHA-256 when read back.
    """
    tensors = {f"model/{name}": tensor for name, tensor in model_tensors(model).items()}
    optimizer_tensors, optimizer_values = optimizer_state(optimizer)
    return save_checkpoint(path, {**tensors, **optimizer_tensors}, {"optimizer": optimizer_values})


def load_model_and_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                             path: str | Path) -> None:
    """Load what :func:`save_model_and_optimizer` wrote into ``model`` (same shape) and ``optimizer``.

    Build both as before saving (``GPTModel(cfg)``, ``AdamW(model.parameters(), ...)``);
    ``optimizer=None`` loads the weights only. Training then continues where it stopped.
    """
    tensors, values = read_checkpoint(path)
    load_trainable_state(model, tensors, path, expected=model_tensors(model))
    if optimizer is not None:
        load_optimizer_state(optimizer, tensors, values["optimizer"])
