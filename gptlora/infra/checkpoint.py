"""Training checkpoints: stop a run at any moment, resume it, and end where it would have ended.

A checkpoint is one safetensors file, ``checkpoint.safetensors`` in the run
directory, holding everything the rest of the run depends on:

- the trainable weights by name (for LoRA: the adapters; ``full``: everything)
  and the model's buffers,
- the optimizer's state (AdamW's moments and step counts),
- the random generators: PyTorch's (CPU, and the current GPU's), Python's and NumPy's,
- where the data loader stands: the epoch, the batches of it already trained on,
  and PyTorch's generator as it was when the epoch's shuffle was drawn,
- the :class:`~gptlora.classifier.TrainingHistory` (step, epoch, examples, metrics),
- a fingerprint of the run (model shape, method and options, data, seed, ...)
  that must match on resume: a checkpoint of another run is refused, not
  silently trained on.

Tensors go into the file's tensor section, everything else as JSON in its
metadata; a SHA-256 over the tensors catches a damaged file. Nothing is pickled,
so loading a checkpoint cannot run code. The file is written under a temporary
name and renamed (``replace_atomically``): a crash mid-save leaves the previous
checkpoint intact.

Resuming mid-epoch replays the epoch's shuffle: the loader's order is drawn from
PyTorch's global generator when the epoch starts, so the generator is set back to
that moment, the batches already trained on are drawn and skipped, and then every
generator is set to its state at the checkpoint. The resumed run therefore sees
the same batches and draws the same random numbers as one never interrupted.
(A sampler must draw its order from the global generator, or from seed and epoch
like ``DistributedSampler``, for this to hold.)
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .atomic import replace_atomically
from .distributed import fail_together
from .tensor_hash import tensors_sha256

CHECKPOINT_NAME = "checkpoint.safetensors"
FORMAT = "gptlora-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: damaged, or made by a different run."""


# --- what gets saved -------------------------------------------------------------------

def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (``requires_grad``) and all buffers, by name."""
    state = {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}
    state.update(model.named_buffers())
    return state


def rng_states() -> tuple[dict[str, torch.Tensor], dict]:
    """Every random generator's state, as ``(tensors, json_values)``."""
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()  # this process's GPU
    version, python_state, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    return tensors, {"python": [version, list(python_state), gauss],
                     "numpy": [name, keys.tolist(), position, has_gauss, cached]}


def restore_rng_states(tensors: dict[str, torch.Tensor], values: dict) -> None:
    """Set every random generator back to what :func:`rng_states` recorded."""
    torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    version, python_state, gauss = values["python"]
    random.setstate((version, tuple(python_state), gauss))
    name, keys, position, has_gauss, cached = values["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached))


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's ``state_dict`` as ``(tensors, json_values)``."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer/{index}/{key}"] = value
            else:
                scalars[f"{index}/{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict, values: dict) -> None:
    """Load into ``optimizer`` what :func:`optimizer_state` produced."""
    state: dict[int, dict] = {}
    for name, tensor in tensors.items():
        if name.startswith("optimizer/"):
            _, index, key = name.split("/", 2)
            state.setdefault(int(index), {})[key] = tensor
    for name, value in values["scalars"].items():
        index, key = name.split("/", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": values["param_groups"]})


def normalized(value):
    """``value`` as it reads back from JSON (tuples become lists), so saved and current values compare."""
    return json.loads(json.dumps(value))


# --- writing and reading the file ------------------------------------------------------

def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], values: dict) -> Path:
    """Write ``tensors`` and the JSON-able ``values`` to ``path`` in one atomic step."""
    from safetensors.torch import save_file

    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    metadata = {"format": FORMAT, "sha256": tensors_sha256(tensors), "values": json.dumps(values)}
    with replace_atomically(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


@contextlib.contextmanager
def open_checkpoint(path: Path):
    """Yield ``(file, metadata)`` of the checkpoint at ``path``, its header read once and its format checked.

    ``file`` is safetensors' ``safe_open`` handle, which reads a tensor only when asked for it.
    """
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; nothing to resume. Was {path.parent} written by "
                                "`gptlora finetune`, and had it saved a checkpoint before it stopped? If not, "
                                "start the run anew (--overwrite)")
    try:
        file = safe_open(str(path), framework="pt")
        metadata = file.metadata() or {}
    except Exception as error:  # safetensors raises its own error type for a damaged header
        raise CheckpointError(damaged(path, error)) from None
    with file:
        if metadata.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not a gptlora training checkpoint (format "
                                  f"{metadata.get('format')!r}, expected {FORMAT!r})")
        yield file, metadata


def read_checkpoint_values(path: str | Path) -> dict:
    """The JSON part of a checkpoint, read from the file header alone (quick: no tensors)."""
    with open_checkpoint(Path(path)) as (_, metadata):
        return json.loads(metadata["values"])


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, values)`` of the checkpoint at ``path``, after checking that it is whole."""
    path = Path(path)
    with open_checkpoint(path) as (file, metadata):
        try:
            tensors = {name: file.get_tensor(name) for name in file.keys()}
        except Exception as error:
            raise CheckpointError(damaged(path, error)) from None
    if tensors_sha256(tensors) != metadata["sha256"]:
        raise CheckpointError(damaged(path, "the tensors' SHA-256 differs from the one saved with them"))
    return tensors, json.loads(metadata["values"])


def damaged(path: Path, reason) -> str:
    """The message for a checkpoint at ``path`` that cannot be read back, and what to do about it."""
    return (f"the checkpoint {path} is damaged ({reason}); it cannot be resumed from. Start the run anew "
            "(--overwrite), or restore the file from a backup")


def check_fingerprint(path: Path, saved: dict, current: dict) -> None:
    """Raise :class:`CheckpointError` listing every setting in which the two runs differ."""
    current = normalized(current)
    differences = [f"  {key}: {saved.get(key)!r} in the checkpoint, {current.get(key)!r} now"
                   for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]
    if differences:
        raise CheckpointError(f"the checkpoint {path} belongs to a different run ({len(differences)} setting(s) "
                              f"differ, first {differences[0].strip()}); resume with the run's own settings, or start "
                              "a new run in another directory\n" + "\n".join(differences))


def load_trainable_state(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path,
                         expected: dict[str, torch.Tensor] | None = None) -> None:
    """Copy the checkpoint's ``model/...`` tensors into ``model``'s trainable parameters and buffers
    (or into the tensors of ``expected``, by name); nothing is copied unless every name and shape fits."""
    expected = trainable_state(model) if expected is None else expected
    saved = {name.removeprefix("model/"): tensor for name, tensor in tensors.items() if name.startswith("model/")}
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    wrong_shape = [f"{name} {tuple(saved[name].shape)} != {tuple(expected[name].shape)}"
                   for name in set(saved) & set(expected) if saved[name].shape != expected[name].shape]
    if missing or unexpected or wrong_shape:
        raise CheckpointError(f"the checkpoint {path} does not fit this model's parameters: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {wrong_shape[:5]}")
    with torch.no_grad():
        for name, target in expected.items():
            target.copy_(saved[name])


# --- the hooks of the training loop ----------------------------------------------------

class NoCheckpoints:
    """What :func:`~gptlora.classifier.train_classifier` uses when nothing is saved: every hook does nothing."""

    def epoch_batches(self, loader, epoch: int):
        """The batches of ``epoch``, in the loader's order.

        A generator, so the loader's iterator (and with it the epoch's shuffle) is
        made when the first batch is asked for, once per epoch, as in the book's
        ``for batch in train_loader``. (``tqdm.auto`` given the loader itself makes
        a second, unused iterator: one more draw from the generator per epoch.)
        """
        yield from loader

    def step_done(self, history) -> None:
        """Called after every optimizer step (and its logging)."""

    def epoch_done(self, history) -> None:
        """Called after each epoch's accuracies are recorded."""


class Checkpointer(NoCheckpoints):
    """Saves the training state to ``path`` every ``save_every`` steps and at each epoch end; resumes from it.

    ``fingerprint`` (JSON-able) describes the run; ``model`` is the module whose
    trainable parameters are saved (not a ``DistributedDataParallel`` wrapper).
    ``writes_files=False`` on all but the main process. ``extra`` is stored as is
    (the command line's options, so that ``gptlora finetune --resume`` can repeat them).
    """

    def __init__(self, path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, fingerprint: dict,
                 save_every: int | None = None, writes_files: bool = True, extra: dict | None = None):
        if save_every is not None and save_every < 1:
            raise ValueError(f"save_every must be a positive number of steps, got {save_every}")
        self.path, self.model, self.optimizer = Path(path), model, optimizer
        self.fingerprint, self.save_every, self.writes_files, self.extra = fingerprint, save_every, writes_files, extra
        self.epoch, self.batches_done, self.epoch_start_rng = 0, 0, None
        self.epoch_length = None  # batches in the epoch being trained
        self.resumed: tuple[dict, dict] | None = None  # (tensors, values) until the loop has caught up
        self.seconds_before, self.started = 0.0, time.perf_counter()

    def training_seconds(self) -> float:
        """Seconds spent training, over every session of this run."""
        return self.seconds_before + time.perf_counter() - self.started

    def resume(self) -> dict:
        """Load the checkpoint into the model and optimizer; return the saved ``TrainingHistory`` fields.

        Every process reads the file itself (under ``torchrun`` the run directory is
        on a file system they share), and all stop if one fails. Call it last before
        training: it sets the random generators to their saved state.
        """
        return fail_together(self._load)

    def _load(self) -> dict:
        tensors, values = read_checkpoint(self.path)
        check_fingerprint(self.path, values["fingerprint"], self.fingerprint)
        load_trainable_state(self.model, tensors, self.path)
        try:
            load_optimizer_state(self.optimizer, tensors, values["optimizer"])
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"the optimizer state in {self.path} does not fit this optimizer: {error}") from None
        restore_rng_states(tensors, values["rng"])
        self.epoch, self.batches_done = values["position"]["epoch"], values["position"]["batches_done"]
        self.seconds_before = values["seconds"]
        self.resumed = (tensors, values)
        return values["history"]

    def epoch_batches(self, loader, epoch: int):
        """The batches of ``epoch`` still to train on, recording how far the epoch has got."""
        self.epoch_length = len(loader)
        if self.resumed is not None and self.batches_done and epoch == self.epoch:
            batches = self._replay(loader)
        else:
            self.epoch, self.batches_done = epoch, 0
            self.epoch_start_rng = torch.get_rng_state()  # the loader draws the epoch's order from here
            batches = iter(loader)
        self.resumed = None
        for batch in batches:
            self.batches_done += 1
            yield batch

    def _replay(self, loader):
        """The loader's iterator, drawn as at the saved epoch's start and advanced past the batches done."""
        tensors, values = self.resumed
        self.epoch_start_rng = tensors["position/epoch_start_rng"]
        torch.set_rng_state(self.epoch_start_rng)
        batches = iter(loader)
        for _ in range(self.batches_done):
            next(batches)
        restore_rng_states(tensors, values["rng"])  # back to the moment of the checkpoint
        return batches

    def step_done(self, history) -> None:
        """Save every ``save_every`` steps, but not after an epoch's last batch: :meth:`epoch_done`
        saves moments later, with the epoch's accuracies, and would only write the file again."""
        if (self.save_every and (history.global_step + 1) % self.save_every == 0
                and self.batches_done != self.epoch_length):
            self.save(history)

    def epoch_done(self, history) -> None:
        """Save at every epoch end."""
        self.epoch, self.batches_done = history.epochs_done, 0
        self.save(history)

    def save(self, history) -> None:
        """Write the checkpoint (main process only): weights, optimizer, generators, position, history."""
        if not self.writes_files:
            return
        model_tensors = {f"model/{name}": tensor for name, tensor in trainable_state(self.model).items()}
        optimizer_tensors, optimizer_values = optimizer_state(self.optimizer)
        rng_tensors, rng_values = rng_states()
        tensors = {**model_tensors, **optimizer_tensors, **rng_tensors}
        if self.batches_done:  # mid-epoch: resuming replays this epoch's order
            tensors["position/epoch_start_rng"] = self.epoch_start_rng
        values = dict(fingerprint=normalized(self.fingerprint), history=asdict(history), optimizer=optimizer_values,
                      rng=rng_values, position=dict(epoch=self.epoch, batches_done=self.batches_done),
                      seconds=self.training_seconds(), extra=self.extra)
        save_checkpoint(self.path, tensors, values)
