"""Training on several processes (GPUs or machines) with DistributedDataParallel.

``torchrun`` starts one process per GPU (or per CPU group) and tells each, in the
environment, who it is: ``RANK`` (0 .. WORLD_SIZE-1 over all machines),
``LOCAL_RANK`` (its GPU on this machine) and ``WORLD_SIZE``. Every process then
runs the same recipe on its own share of the data:

- the training split is cut by a :class:`~torch.utils.data.DistributedSampler`:
  one global batch of ``B`` rows is ``B / WORLD_SIZE`` rows on each process, and
  each epoch's order is drawn from ``(seed, epoch)``, the same on every process;
- :class:`~torch.nn.parallel.DistributedDataParallel` averages the gradients over
  the processes during ``backward()``, so each optimizer step sees the gradient of
  the whole global batch and every process keeps identical weights;
- losses and accuracies are sums and counts added up over the processes
  (:func:`sum_over_processes`), so they describe the whole batch, not one share;
- only the main process (rank 0) prints and writes files.

Run without ``torchrun`` nothing here changes anything: one process, the book's
loaders, no wrapper.
"""

from __future__ import annotations

import gc
import inspect
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, Sampler


@dataclass(frozen=True)
class Processes:
    """Where this process stands among those training together.

    ``distributed`` is False for a plain ``python``/``gptlora`` run (rank 0 of 1).
    ``device`` is the one this process trains on: ``cuda:LOCAL_RANK`` for GPUs.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool

    @property
    def is_main(self) -> bool:
        """True for the one process that prints and writes files (rank 0)."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when the environment holds the ``RANK`` and ``WORLD_SIZE`` that ``torchrun`` sets."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def start_processes(device) -> Processes:
    """Join the process group when started by ``torchrun``; otherwise describe the single process.

    Backend ``nccl`` for CUDA devices, ``gloo`` for CPUs. Under ``torchrun`` a
    CUDA ``device`` becomes ``cuda:LOCAL_RANK``: one GPU per process.
    """
    device = torch.device(device)
    if not launched_by_torchrun():
        return Processes(0, 1, 0, device, distributed=False)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Processes(dist.get_rank(), dist.get_world_size(), local_rank, device, distributed=True)


def stop_processes() -> None:
    """Leave the process group that :func:`start_processes` joined (nothing for a single process).

    Garbage is collected first: a DistributedDataParallel wrapper lives in reference cycles, and one
    freed only during the interpreter's shutdown, after the group, can take gloo's threads down with
    SIGABRT ("terminate called without an active exception", seen once in a loaded test run)."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def world_size() -> int:
    """How many processes train together: 1 unless a process group is running."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process() -> bool:
    """True for rank 0, and for a process that is not part of a group."""
    return not dist.is_initialized() or dist.get_rank() == 0


def sum_over_processes(*values: float) -> tuple[float, ...]:
    """Each value added up over all processes (returned unchanged when there is only one).

    Used for loss sums, counts of batches, correct rows and rows seen, so that a
    mean or an accuracy is taken over every process's share. Adds in float64,
    exact for counts below 2**53.
    """
    if not dist.is_initialized():
        return values
    backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    totals = torch.tensor(values, dtype=torch.float64, device=backend_device)
    dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    return tuple(totals.tolist())


def fail_together(function, *args, group=None, **kwargs):
    """``function(*args, **kwargs)`` on every process; if it raises on any process, it raises on all.

    For the checks before training (the run directory, the checkpoint): a process
    that stopped alone would leave the others waiting in their next collective call
    (DDP's set-up, an ``all_reduce``) until the group's timeout (PyTorch's default:
    10 minutes for nccl, 30 for gloo). Each process gets its own error, or else the
    first failing process's. ``group`` is the process group that carries the errors
    (default: the whole world's). Returns ``function``'s result; for a single process
    it is simply called.
    """
    if not dist.is_initialized():
        return function(*args, **kwargs)
    try:
        result, error = function(*args, **kwargs), None
    except Exception as raised:  # any kind: the others must learn of it, whatever it is
        result, error = None, raised
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error, group=group)  # exceptions pickle as their type and message
    if error is not None:
        raise error
    first = next((other for other in errors if other is not None), None)
    if first is not None:
        raise first
    return result


def local_rank() -> int:
    """This process's rank on its machine (``LOCAL_RANK``, set by ``torchrun``); 0 outside ``torchrun``."""
    return int(os.environ.get("LOCAL_RANK", 0)) if launched_by_torchrun() else 0


# How long the processes wait for each other while files are prepared. A download of gpt2-xl (6.4 GB) over
# a slow line takes hours, far beyond the default group's timeout (nccl: 10 minutes), so the waiting
# happens in a group of its own; training keeps the default, so that a real hang there is still caught.
PREPARATION_TIMEOUT = timedelta(hours=24)


def local_main_first(function, *args, **kwargs):
    """``function(*args, **kwargs)`` on every process, the local main process (``LOCAL_RANK`` 0 of each
    machine) first and the others after it; returns this process's result.

    For preparing files in local folders (downloading weights, building the data
    splits): one process per machine does the work while the others wait, then
    they call ``function`` too and find the files ready. An error on any process
    is raised on all of them (:func:`fail_together`), so none waits forever at the
    other turn. The others wait up to :data:`PREPARATION_TIMEOUT`, in a ``gloo``
    group made for it (on the CPU, whatever the training backend), not the default
    group's 10 or 30 minutes. Without a process group, ``function`` is simply called.
    Several machines sharing one folder take turns on its file locks (see ``locks``).
    """
    if not dist.is_initialized():
        return function(*args, **kwargs)
    waiting_room = dist.new_group(backend="gloo", timeout=PREPARATION_TIMEOUT)
    result = None
    try:
        for first_turn in (True, False):  # every process takes part in both turns: two collective calls
            mine = (local_rank() == 0) == first_turn
            outcome = fail_together(function if mine else _nothing, *args, group=waiting_room, **kwargs)
            result = outcome if mine else result
    finally:
        dist.destroy_process_group(waiting_room)
    return result


def _nothing(*args, **kwargs):
    return None


class ShardSampler(Sampler):
    """Every ``world_size``-th index from ``rank``, in order: ``rank, rank + W, rank + 2W, ...``.

    For evaluation: together the processes see each row exactly once (unlike
    ``DistributedSampler``, which repeats rows to even out the shares), and batch
    ``j`` of all processes together is batch ``j`` of a single process whose batch
    is ``world_size`` times larger.
    """

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = range(rank, length, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def shard_loaders(loaders, processes: Processes, seed: int):
    """``(train, validation, test)`` loaders cut into this process's share; unchanged for one process.

    ``loaders[i].batch_size`` is the global batch and must divide by the number of
    processes. Training: a ``DistributedSampler`` (shuffled from ``seed`` and the
    epoch, incomplete last batch dropped); evaluation: a :class:`ShardSampler`.
    """
    if not processes.distributed:
        return loaders
    train = loaders[0]
    if not isinstance(train.batch_sampler, BatchSampler) or train.batch_size is None:
        raise NotImplementedError("under torchrun the training batches are cut by a DistributedSampler; "
                                  "a custom batch sampler (such as length bucketing) is not supported there yet")
    for loader in loaders:
        if loader.batch_size % processes.world_size:
            raise ValueError(f"the batch size {loader.batch_size} is the global batch, split over "
                             f"{processes.world_size} processes; choose a multiple of {processes.world_size}")

    def rebuild(loader, sampler, drop_last):
        return DataLoader(loader.dataset, batch_size=loader.batch_size // processes.world_size, sampler=sampler,
                          drop_last=drop_last, collate_fn=loader.collate_fn, num_workers=loader.num_workers)

    train_sampler = DistributedSampler(train.dataset, processes.world_size, processes.rank, shuffle=True,
                                       seed=seed, drop_last=True)
    return (rebuild(train, train_sampler, drop_last=True),
            *(rebuild(loader, ShardSampler(len(loader.dataset), processes.rank, processes.world_size),
                      drop_last=loader.drop_last) for loader in loaders[1:]))


def set_sampler_epoch(loader, epoch: int) -> None:
    """Tell a ``DistributedSampler`` which epoch starts (its order is drawn from seed and epoch).

    Without this every epoch would repeat the first one's order. Other samplers
    draw a fresh order by themselves; for them this does nothing.
    """
    if isinstance(getattr(loader, "sampler", None), DistributedSampler):
        loader.sampler.set_epoch(epoch)


def wrap_for_training(model: torch.nn.Module, processes: Processes) -> torch.nn.Module:
    """``model`` in ``DistributedDataParallel`` under ``torchrun``; ``model`` itself otherwise.

    Buffers are not synchronised at each forward: the model's buffers never change,
    and syncing them would make each evaluation batch a collective call, which hangs
    when the processes evaluate different numbers of batches.
    """
    if not processes.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [processes.device.index] if processes.device.type == "cuda" else None
    # Newer PyTorch (2.13 here) deprecates broadcast_buffers in favour of forward_sync_buffers.
    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=device_ids, **no_buffer_sync)
