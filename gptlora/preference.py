"""Direct Preference Optimization (DPO): the loss, its implicit rewards, and where the reference comes from.

DPO (Rafailov et al., 2023, "Direct Preference Optimization: Your Language Model is
Secretly a Reward Model", Eq. 7) tunes a *policy* model towards the chosen answer of
each pair and away from the rejected one, relative to a frozen *reference* model (the
instruction-tuned model it starts from). For one pair, with ``log pi(y|x)`` the
log-probability of answer ``y`` after prompt ``x``::

    logits = [log pi(chosen) - log pi(rejected)] - [log ref(chosen) - log ref(rejected)]
    loss   = -log sigmoid(beta * logits)

``beta`` (0.1 in the book) says how far the policy may move from the reference. While the
policy still equals its reference, ``logits`` is 0 and the loss is ``-log(1/2) = ln 2 =
0.6931``. The *implicit rewards* are ``log pi(y) - log ref(y)`` of each answer (the book
leaves out the factor ``beta`` the paper and ``trl`` put in front); their difference,
chosen minus rejected, is the *reward margin*, which rises as the policy learns.

The reference needs no second copy of the weights under LoRA (or DoRA): it is the same
network with its adapters switched off (``lora.lora_disabled``), as ``trl`` does with
``peft``. A full fine-tune needs a frozen copy (:func:`frozen_copy`).

Shapes: ``B`` pairs, ``T`` tokens, ``V`` vocabulary size.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .infra.distributed import sum_over_processes
from .lora import lora_disabled, lora_layers
from .model import evaluating
from .infra.checkpoint import NoCheckpoints
from .infra.precision import FP32, Precision
from .infra.speed import to_device
from .training import NO_SCHEDULE, TrainingSchedule, first_batches, train_epochs, unwrapped


def sequence_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, mask: torch.Tensor,
                      average: bool = True) -> torch.Tensor:
    """The log-probability of the masked tokens of each text: ``[B, T, V], [B, T], [B, T] -> [B]``.

    Token ``t`` is predicted by the logits at position ``t - 1``, so position 0 is never
    scored (the book's ``compute_logprobs``). ``mask`` (bool or 0/1) says which tokens count:
    the answer, not the prompt nor the padding (``preference_data.collate_preferences``).
    ``average=True`` (the default, the book's) divides each text's sum by its number of
    counted tokens; ``average=False`` gives the sum, the log-probability of the whole answer
    (the paper's and ``trl``'s). The default is the book's so that its printed losses and
    margins can be compared; a sum favours neither long nor short answers by construction
    but makes the margins grow with the answers' length (the loss saturates sooner).
    """
    log_probs = F.log_softmax(logits[:, :-1, :], dim=-1)
    selected = torch.gather(log_probs, -1, token_ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # [B, T-1]
    weights = mask[:, 1:].to(selected.dtype)
    total = (selected * weights).sum(-1)
    return total / weights.sum(-1) if average else total


@dataclass
class DPOResult:
    """What :func:`dpo_loss` returns: ``loss`` (a scalar, mean over the pairs) and the rewards ``[B]``."""
    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    @property
    def margins(self) -> torch.Tensor:
        """Chosen minus rejected reward, per pair ``[B]``."""
        return self.chosen_rewards - self.rejected_rewards


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float = 0.1) -> DPOResult:
    """The DPO loss of ``B`` pairs from four ``[B]`` log-probabilities (:func:`sequence_logprobs`).

    ``loss = mean(-log sigmoid(beta * ((pc - pr) - (rc - rr))))``; the rewards ``pc - rc`` and
    ``pr - rr`` are detached (they are read, not trained on). ``beta`` must be positive.
    """
    if not beta > 0:
        raise ValueError(f"beta must be positive (the book uses 0.1, typical values 0.1 to 0.5), found {beta}")
    logits = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    loss = -F.logsigmoid(beta * logits).mean()
    return DPOResult(loss, (policy_chosen - reference_chosen).detach(),
                     (policy_rejected - reference_rejected).detach())


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A reference for a full fine-tune: a copy of ``model`` in eval mode whose parameters do not train."""
    reference = copy.deepcopy(model).eval()
    for parameter in reference.parameters():
        parameter.requires_grad_(False)
    return reference


@contextlib.contextmanager
def reference_of(policy: torch.nn.Module, reference: torch.nn.Module | None = None):
    """``with reference_of(policy, reference) as ref: ref(ids)``: the reference model, in eval mode without
    gradients. ``reference=None`` means the policy with its LoRA/DoRA adapters switched off (no copy);
    a policy without adapters then is a ValueError (it would be its own reference: the loss stays ln 2)."""
    if reference is not None:
        with evaluating(reference):
            yield reference
        return
    policy = unwrapped(policy)  # under torchrun: the module inside DistributedDataParallel
    if not lora_layers(policy):
        raise ValueError("the policy has no LoRA adapters, so it cannot serve as its own reference; pass a "
                         "frozen copy (preference.frozen_copy) or add adapters (lora.apply_lora)")
    with evaluating(policy), lora_disabled(policy):
        yield policy


def pair_logprobs(model, batch: dict, average: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chosen [B], rejected [B])``: the answers' log-probabilities under ``model`` for a collated batch.

    One forward pass over both halves stacked (``[2B, T]``; the collate pads them to one width): half the
    calls, and one forward per backward, as ``DistributedDataParallel`` expects (``trl`` does the same).
    """
    ids = torch.cat([batch["chosen"], batch["rejected"]])
    masks = torch.cat([batch["chosen_mask"], batch["rejected_mask"]])
    return tuple(sequence_logprobs(model(ids), ids, masks, average).chunk(2))


def dpo_batch(policy, batch: dict, beta: float = 0.1, reference=None, average: bool = True) -> DPOResult:
    """The book's ``compute_dpo_loss_batch``: :func:`dpo_loss` of a collated batch (``preference_data``);
    ``reference`` as in :func:`reference_of` (None: the policy with its adapters off)."""
    with reference_of(policy, reference) as ref:
        reference_chosen, reference_rejected = pair_logprobs(ref, batch, average)
    return dpo_loss(*pair_logprobs(policy, batch, average), reference_chosen, reference_rejected, beta)


def on_device(batch: dict, device=None) -> dict:
    """A collated batch with its tensors on ``device`` (unchanged for None)."""
    return batch if device is None else {key: to_device(value, device) for key, value in batch.items()}


def dpo_scores(data_loader, policy, beta: float = 0.1, reference=None, num_batches: int | None = None,
               average: bool = True, device=None) -> dict:
    """The book's ``compute_dpo_loss_loader``: the mean loss, chosen and rejected rewards over the first
    ``num_batches`` batches (means of batch means, as the book), and ``margin`` (chosen minus rejected).
    In eval mode without gradients; under ``torchrun`` the sums of every process are added. NaN if no batch."""
    totals = [0.0, 0.0, 0.0]
    count = 0
    with evaluating(policy):
        for batch in first_batches(data_loader, num_batches):
            result = dpo_batch(policy, on_device(batch, device), beta, reference, average)
            for index, value in enumerate((result.loss, result.chosen_rewards.mean(), result.rejected_rewards.mean())):
                totals[index] += value.item()
            count += 1
    *totals, count = sum_over_processes(*totals, count)
    loss, chosen, rejected = (total / count if count else float("nan") for total in totals)
    return dict(loss=loss, chosen_reward=chosen, rejected_reward=rejected, margin=chosen - rejected)


# --- training: the one loop (training.train_epochs) with the DPO loss -----------------------

@dataclass
class PreferenceHistory:
    """What :func:`train_preference` records every ``eval_freq`` steps (the book's ``tracking``): the mean
    loss and rewards of ``eval_iter`` training and validation batches, and the tokens seen then."""

    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    train_chosen_rewards: list[float] = field(default_factory=list)
    train_rejected_rewards: list[float] = field(default_factory=list)
    val_chosen_rewards: list[float] = field(default_factory=list)
    val_rejected_rewards: list[float] = field(default_factory=list)
    track_tokens_seen: list[int] = field(default_factory=list)
    tokens_seen: int = 0
    global_step: int = -1  # as in the book: the first step is 0, so it is evaluated
    epochs_done: int = 0

    def count(self, tokens: int) -> None:
        """Add the tokens of one training step (all processes) to ``tokens_seen``."""
        self.tokens_seen += tokens

    def margins(self, split: str = "train") -> list[float]:
        """Chosen minus rejected reward at each evaluation, of ``split`` ("train" or "val")."""
        chosen, rejected = getattr(self, f"{split}_chosen_rewards"), getattr(self, f"{split}_rejected_rewards")
        return [c - r for c, r in zip(chosen, rejected)]


def train_preference(policy, train_loader, val_loader, optimizer, num_epochs: int, *, beta: float = 0.1,
                     reference=None, average: bool = True, eval_freq: int = 5, eval_iter: int = 5, device=None,
                     progress: bool = False, verbose: bool = True, history: PreferenceHistory | None = None,
                     checkpoints: NoCheckpoints | None = None,
                     schedule: TrainingSchedule = NO_SCHEDULE, precision: Precision = FP32) -> PreferenceHistory:
    """The book's ``train_model_dpo_simple`` through the one loop (``training.train_epochs``).

    Every ``eval_freq`` steps: :func:`dpo_scores` of ``eval_iter`` batches of each loader, printed
    as the book prints it (``Ep 1 (Step 000000): Train loss 0.692, Val loss 0.693, Train reward
    margins 0.014, Val reward margins 0.006``). ``reference`` as in :func:`reference_of` (None: the
    policy with its adapters off). ``device``: where batches go. ``history``, ``checkpoints`` and
    ``schedule`` (appendix D) and ``precision`` (``infra.precision``: autocast, fp16's scaler) as in
    ``pretraining.train_language_model``.
    """
    history = history or PreferenceHistory()
    log = tqdm.write if verbose else (lambda message: None)  # tqdm.write: print, below any bar

    def batch_loss(batch):
        batch = on_device(batch, device)
        return dpo_batch(policy, batch, beta, reference, average).loss, batch["chosen"].numel()

    def scores(loader):
        return dpo_scores(loader, policy, beta, reference, eval_iter, average, device)

    def evaluate(history):
        train, val = scores(train_loader), scores(val_loader)
        for split, values in (("train", train), ("val", val)):
            getattr(history, f"{split}_losses").append(values["loss"])
            getattr(history, f"{split}_chosen_rewards").append(values["chosen_reward"])
            getattr(history, f"{split}_rejected_rewards").append(values["rejected_reward"])
        history.track_tokens_seen.append(history.tokens_seen)
        log(f"Ep {history.epochs_done + 1} (Step {history.global_step:06d}): Train loss {train['loss']:.3f}, "
            f"Val loss {val['loss']:.3f}, Train reward margins {train['margin']:.3f}, "
            f"Val reward margins {val['margin']:.3f}")
        return dict(train_loss=f"{train['loss']:.3f}", val_margin=f"{val['margin']:.3f}")

    return train_epochs(policy, train_loader, optimizer, num_epochs, history, batch_loss=batch_loss,
                        eval_freq=eval_freq, evaluate=evaluate, end_epoch=lambda history, epoch: None,
                        progress=progress, checkpoints=checkpoints, schedule=schedule, precision=precision)
