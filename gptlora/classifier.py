"""Classification fine-tuning: a class head on GPT-2, loss and accuracy, training, plots, classify().

Chapter 6 of "Build a Large Language Model (From Scratch)": the vocabulary head
``Linear(D, V)`` becomes ``Linear(D, 2)`` and the class is read from the logits
of the last token, the only one that has attended to the whole message.

Everything below the head set-up is generic about the model: it is called as
``model(inputs)`` and must return ``[B, T, C]`` logits, whatever ``inputs`` are
(token ids, or cached hidden states for a smaller model). A batch is
``(inputs, labels)`` or, with dynamic padding, ``(inputs, labels, lengths)``.

Shapes: ``B`` batch size, ``T`` tokens, ``D`` embedding width, ``C`` classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .infra.checkpoint import NoCheckpoints
from .infra.distributed import sum_over_processes
from .infra.precision import FP32, Precision
from .infra.speed import to_device
from .generation import END_OF_TEXT_ID
from .lora import apply_lora, check_lora_hyperparameters
from .model import GPTModel, evaluating
from .prompt_tuning import PROMPT_METHODS, apply_virtual_tokens, check_virtual_tokens, prompt_method_options
from .training import NO_SCHEDULE, TrainingSchedule, first_batches, mean_batch_loss, plot_values, train_epochs

METHODS = ("last-block", "full", "lora", *PROMPT_METHODS)
LABEL_NAMES = ("not spam", "spam")  # index = class id (ham 0, spam 1)


def check_method(method: str) -> None:
    """Raise unless ``method`` is one this version can train (called before any slow work)."""
    if method not in METHODS:
        raise ValueError(f"unknown fine-tuning method {method!r}; choose one of {', '.join(METHODS)}")


# The recipe of the book's appendix E: rank 16, alpha 16 on every linear layer, the new head included.
LORA_DEFAULTS = dict(rank=16, alpha=16, target_modules=None, exclude_modules=None, modules_to_save=None,
                     dropout=0.0, scaling="alpha/rank", use_dora=False)


def lora_options(method_options: dict | None) -> dict:
    """``LORA_DEFAULTS`` updated with ``method_options``, checked: a key ``apply_lora`` does not take,
    or a bad rank, alpha, dropout or scaling, is a ValueError."""
    unknown = sorted(set(method_options or {}) - set(LORA_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown LoRA option(s) {unknown}; expected some of {', '.join(LORA_DEFAULTS)}")
    options = {**LORA_DEFAULTS, **(method_options or {})}
    check_lora_hyperparameters(options["rank"], options["alpha"], options["dropout"], options["scaling"])
    return options


def method_settings(method: str, method_options: dict | None = None) -> dict | None:
    """The checked, complete options of ``method``: ``lora_options`` for ``"lora"``,
    ``prompt_tuning.prompt_method_options`` for prompt and prefix tuning; None for the
    other methods, which take none (passing some is a ValueError rather than silently ignored).
    Calling it again on its own result gives the same result."""
    check_method(method)
    if method == "lora":
        return lora_options(method_options)
    if method in PROMPT_METHODS:
        return prompt_method_options(method, method_options)
    if method_options:
        raise ValueError(f"method {method!r} takes no options, found {sorted(method_options)}; "
                         "options such as rank and alpha belong to method 'lora'")
    return None


def add_classification_head(model: GPTModel, num_classes: int = 2) -> GPTModel:
    """Replace the vocabulary head by a fresh ``Linear(D, num_classes)``: ``[B, T, D] -> [B, T, C]``.

    Its initial weights come from PyTorch's global generator, so the same seed
    gives the same head: a LoRA run relies on this to rebuild its (frozen) head.
    """
    model.out_head = nn.Linear(model.cfg.emb_dim, num_classes)
    return model


def prepare_for_classification(model: GPTModel, method: str, num_classes: int = 2,
                               method_options: dict | None = None) -> GPTModel:
    """Give ``model`` a ``Linear(D, num_classes)`` head and choose what ``method`` trains.

    - ``last-block`` (the book): the last transformer block, the final LayerNorm and the head.
    - ``full``: every parameter.
    - ``lora``: low-rank adapters only (the book's appendix E); ``method_options``
      overrides ``LORA_DEFAULTS`` (rank 16, alpha 16, every linear layer, the new head
      included: 2,666,528 trainable parameters on gpt2-small). The head itself stays
      frozen, as the book has it; ``modules_to_save=["out_head"]`` trains it in full.
    - ``prompt-tuning``/``prefix-tuning``: a soft prompt (or per-layer prefix) of
      ``num_virtual_tokens`` (default 20, started from ``init_text``) and the head train;
      ``model`` is frozen and returned *wrapped* (``prompt_tuning.VirtualTokenModel``).

    The new head draws its initial weights from PyTorch's global generator: call
    ``torch.manual_seed`` first (the book uses 123). Modifies and returns ``model``
    (wrapped, for the prompt methods: use the returned model).
    """
    return apply_method(model, method, method_settings(method, method_options), num_classes)


def apply_method(model: GPTModel, method: str, options: dict | None, num_classes: int = 2) -> GPTModel:
    """:func:`prepare_for_classification` with ``options`` already complete and checked (the output of
    :func:`method_settings`, as ``recipes.settings.FinetuneSettings`` holds them): the head, then the method."""
    if method in PROMPT_METHODS:  # the virtual tokens must leave room in this model's context
        check_virtual_tokens(options["num_virtual_tokens"], model.cfg.context_length)
    add_classification_head(model, num_classes)
    if method == "full":
        model.requires_grad_(True)
    elif method == "last-block":
        model.requires_grad_(False)
        for part in (model.trf_blocks[-1], model.final_norm, model.out_head):
            part.requires_grad_(True)
    elif method in PROMPT_METHODS:
        return apply_virtual_tokens(model, method, options, modules_to_save=["out_head"])
    else:
        apply_lora(model, **options, verbose=False)  # freezes everything but the adapters
    return model


# --- from logits to a class: loss and accuracy ----------------------------------------

def classification_logits(logits: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Pick each row's class logits: ``[B, T, C] -> [B, C]``.

    Without ``lengths`` (the book, every row padded to the same length) the last
    position; with ``lengths [B]`` (dynamic padding) position ``lengths - 1``, the
    last real token. This is the one place that decides which position classifies.
    """
    if lengths is None:
        return logits[:, -1, :]
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, lengths.to(logits.device) - 1, :]


def split_batch(batch, device):
    """``(inputs, labels)`` or ``(inputs, labels, lengths)`` -> ``(inputs, labels, lengths or None)``.

    ``inputs`` are token ids ``[B, T]`` or cached hidden states ``[B, T, D]``, ``labels``
    ``[B]`` class ids, ``lengths`` ``[B]`` real tokens per row; inputs and labels are moved
    to ``device``, lengths stay where they are (``classification_logits`` moves them).
    """
    inputs, labels, *rest = batch
    return to_device(inputs, device), to_device(labels, device), (rest[0] if rest else None)


def calc_loss_batch(input_batch, target_batch, model, device, lengths=None) -> torch.Tensor:
    """Mean cross-entropy of one batch: a scalar tensor, with gradient when grad mode is on.

    ``input_batch`` is token ids ``[B, T]`` or cached hidden states ``[B, T, D]`` (whatever
    ``model`` takes), ``target_batch`` ``[B]`` class ids, ``lengths`` ``[B]`` real tokens per
    row with dynamic padding (None: read every row at its last position).
    """
    logits = classification_logits(model(to_device(input_batch, device)), lengths)
    return F.cross_entropy(logits, to_device(target_batch, device))


def calc_loss_loader(data_loader, model, device, num_batches=None) -> float:
    """Mean batch loss over the first ``num_batches`` batches; NaN for an empty loader.

    Under ``torchrun`` each process has its share of every batch: the sums and
    counts of all processes are added before dividing (``training.mean_batch_loss``).
    """
    def batch_loss(batch):
        inputs, labels, lengths = split_batch(batch, device)
        return calc_loss_batch(inputs, labels, model, device, lengths)

    return mean_batch_loss(data_loader, model, batch_loss, num_batches)


def calc_accuracy_loader(data_loader, model, device, num_batches=None) -> float:
    """Fraction (0 to 1) of rows classified correctly in the first ``num_batches`` batches."""
    correct = seen = 0
    with evaluating(model):
        for batch in first_batches(data_loader, num_batches):
            inputs, labels, lengths = split_batch(batch, device)
            predicted = classification_logits(model(inputs), lengths).argmax(dim=-1)
            correct += (predicted == labels).sum().item()
            seen += labels.shape[0]
    correct, seen = sum_over_processes(correct, seen)  # all processes' shares (see calc_loss_loader)
    return correct / seen if seen else float("nan")


def evaluate_model(model, train_loader, val_loader, device, eval_iter):
    """``(train_loss, val_loss)`` over the first ``eval_iter`` batches of each loader."""
    return (calc_loss_loader(train_loader, model, device, num_batches=eval_iter),
            calc_loss_loader(val_loader, model, device, num_batches=eval_iter))


# --- the training loop -----------------------------------------------------------------

@dataclass
class TrainingHistory:
    """What :func:`train_classifier` records, and where it stands.

    Losses are logged every ``eval_freq`` steps, accuracies (0 to 1) at each epoch
    end. It unpacks like the book's return value::

        train_losses, val_losses, train_accs, val_accs, examples_seen = history
    """

    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    train_accs: list[float] = field(default_factory=list)
    val_accs: list[float] = field(default_factory=list)
    examples_seen: int = 0
    global_step: int = -1  # as in the book: the first step is 0, so it is evaluated
    epochs_done: int = 0

    def __iter__(self):
        return iter((self.train_losses, self.val_losses, self.train_accs, self.val_accs, self.examples_seen))

    def count(self, examples: int) -> None:
        """Add the rows of one training step (all processes) to ``examples_seen``."""
        self.examples_seen += examples


def train_classifier(model, train_loader, val_loader, optimizer, device, num_epochs: int, eval_freq: int,
                     eval_iter: int, *, progress: bool = True, history: TrainingHistory | None = None,
                     checkpoints: NoCheckpoints | None = None,
                     schedule: TrainingSchedule = NO_SCHEDULE, precision: Precision = FP32) -> TrainingHistory:
    """Train for ``num_epochs`` epochs; the book's ``train_classifier_simple`` with a progress bar.

    Every ``eval_freq`` steps the mean loss over ``eval_iter`` batches of each
    loader is logged; after each epoch, the accuracy over ``eval_iter`` batches.
    The loaders are iterated exactly as the book does, so under the same seed the
    shuffles, and therefore the numbers, are the book's. Passing a ``history``
    continues from its ``epochs_done``. ``progress=False`` silences bar and log.

    ``checkpoints`` (a ``checkpoint.Checkpointer``) saves the training state after
    steps and epochs, and when resuming hands out only the batches still to train
    on. The same loop runs under ``torchrun`` (see ``distributed``); the loop itself
    is ``training.train_epochs``, shared with language-model pretraining; ``schedule``
    adds appendix D's warmup, cosine decay, clipping and accumulation (``training.TrainingSchedule``);
    ``precision`` (``infra.precision.Precision``): fp32 (the book), or autocast to bf16/fp16.
    """
    history = history or TrainingHistory()
    log = tqdm.write if progress else (lambda message: None)

    def batch_loss(batch):
        inputs, labels, lengths = split_batch(batch, device)
        return calc_loss_batch(inputs, labels, model, device, lengths), inputs.shape[0]

    def evaluate(history):
        train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, eval_iter)
        history.train_losses.append(train_loss)
        history.val_losses.append(val_loss)
        return dict(train_loss=f"{train_loss:.3f}", val_loss=f"{val_loss:.3f}")

    def end_epoch(history, epoch):
        history.train_accs.append(calc_accuracy_loader(train_loader, model, device, num_batches=eval_iter))
        history.val_accs.append(calc_accuracy_loader(val_loader, model, device, num_batches=eval_iter))
        log(f"epoch {epoch + 1}: training accuracy {history.train_accs[-1]:.2%}, "
            f"validation accuracy {history.val_accs[-1]:.2%} (over {eval_iter} batches)")

    return train_epochs(model, train_loader, optimizer, num_epochs, history, batch_loss=batch_loss,
                        eval_freq=eval_freq, evaluate=evaluate, end_epoch=end_epoch, progress=progress,
                        checkpoints=checkpoints, schedule=schedule, precision=precision)


# --- plots -----------------------------------------------------------------------------

def plot_history(history: TrainingHistory, out_dir: str | Path) -> list[Path]:
    """``loss.png`` and ``accuracy.png`` of a finished run in ``out_dir``."""
    out_dir = Path(out_dir)
    paths = []
    for label, train, val in (("loss", history.train_losses, history.val_losses),
                              ("accuracy", history.train_accs, history.val_accs)):
        epochs = torch.linspace(0, history.epochs_done, len(train))
        examples = torch.linspace(0, history.examples_seen, len(train))
        paths.append(plot_values(epochs, examples, train, val, label, out_dir / f"{label}.png"))
    return paths


# --- using a trained classifier --------------------------------------------------------

def classify(text: str, model: GPTModel, tokenizer, device, max_length: int, pad_to_max_length: bool = True,
             pad_token_id: int = END_OF_TEXT_ID, adapter_names: list[str] | None = None) -> str | list[str]:
    """``"spam"`` or ``"not spam"`` for one message.

    The text is prepared as in training: cut to its first ``max_length`` tokens
    (a longer message is judged by its beginning), then, for a model trained the
    book's way, padded to ``max_length`` and read at the last position; with
    ``pad_to_max_length=False`` (dynamic padding) read at its own last token.
    Empty or blank text raises ``ValueError``: there is nothing to classify.

    ``adapter_names`` (LoRA adapters of ``model``) classifies the text with each of them
    in one batch, one row per adapter (``model(ids, adapter_names=...)``), and returns
    one label per adapter.
    """
    if not text.strip():
        raise ValueError("cannot classify an empty message; pass at least one non-blank character")
    if max_length > model.cfg.context_length:
        raise ValueError(f"max_length {max_length} exceeds the model's context length {model.cfg.context_length}")
    ids = tokenizer.encode(text)[:max_length]
    if pad_to_max_length:
        ids = ids + [pad_token_id] * (max_length - len(ids))
    with evaluating(model):
        if adapter_names is not None:
            rows = torch.tensor([ids] * len(adapter_names), device=device)
            logits = classification_logits(model(rows, adapter_names=adapter_names))
            return [LABEL_NAMES[int(label)] for label in logits.argmax(dim=-1)]
        logits = classification_logits(model(torch.tensor([ids], device=device)))
    return LABEL_NAMES[int(logits.argmax(dim=-1))]
