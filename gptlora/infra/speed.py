"""The options that make a training step faster or smaller without changing what it computes
(to float tolerance): ``--compile`` and ``--gradient-checkpointing`` (docs/performance.md), and
``to_device``, the pinned, non-blocking copy of every batch to a CUDA device.

``--precision`` changes the numbers more and lives in ``infra.precision``; fused AdamW is
``training.trainable_adamw``'s choice on CUDA.
"""

from __future__ import annotations

import sys

import torch


def compile_unavailable(device) -> str | None:
    """Why ``torch.compile`` cannot run on ``device`` here (one line), or None when it can.

    Compiling is lazy: a missing C compiler or an unsupported Python shows only at the first call,
    so this compiles and runs a two-element product once (a second or so).
    """
    try:
        doubled = torch.compile(lambda x: x * 2)(torch.ones(2, device=device))
        return None if doubled.tolist() == [2.0, 2.0] else "torch.compile gave a wrong result"
    except Exception as error:  # any failure means: train without it
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return f"{type(error).__name__}: {reason}"[:200]


def compile_for_training(model: torch.nn.Module, device) -> torch.nn.Module:
    """``torch.compile(model)``: a module that shares ``model``'s parameters (so saving ``model`` saves what
    trained). Where torch.compile cannot run, ``model`` itself after one line on stderr saying so."""
    reason = compile_unavailable(device)
    if reason:
        print(f"--compile: torch.compile cannot run here ({reason}); training without it", file=sys.stderr)
        return model
    return torch.compile(model)


def set_gradient_checkpointing(model: torch.nn.Module, enabled: bool = True) -> torch.nn.Module:
    """Switch per-block gradient checkpointing of the GPT model inside ``model`` (a LoRA-wrapped, prompt-tuned
    or classifier model too); the same gradients, less memory, ~a third more compute. Returns ``model``."""
    found = [module for module in model.modules() if hasattr(module, "gradient_checkpointing")]
    if not found:
        raise ValueError(f"--gradient-checkpointing: no GPT model inside {type(model).__name__}")
    for module in found:
        module.gradient_checkpointing = enabled
    return model


def speed_options(model: torch.nn.Module, settings, device) -> torch.nn.Module:
    """``model`` as a run's ``settings`` (``recipes.settings.ScheduleSettings``) ask to train it: with gradient
    checkpointing and/or compiled. Unchanged when neither is asked for."""
    if settings.gradient_checkpointing:
        set_gradient_checkpointing(model)
    return compile_for_training(model, device) if settings.compile else model


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """``tensor`` on ``device``: exactly ``tensor.to(device)``, except for a CPU tensor bound for a CUDA device,
    which goes through pinned memory with a non-blocking copy.

    Pinned (page-locked) host memory can be read by the GPU's copy engine directly, so the copy runs
    asynchronously and overlaps with the kernels already queued; from ordinary pageable memory CUDA first
    stages the data through a pinned buffer of its own and the CPU waits. ``non_blocking=True`` is safe here
    because the kernels that read the copy are queued on the same CUDA stream, after it. A tensor already
    pinned (a ``DataLoader(pin_memory=True)`` batch) is not pinned again. Shapes and dtype are unchanged.
    """
    if device is not None and tensor.device.type == "cpu" and torch.device(device).type == "cuda":
        host = tensor if tensor.is_pinned() else tensor.pin_memory()
        return host.to(device, non_blocking=True)
    return tensor.to(device)
