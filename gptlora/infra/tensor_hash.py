"""One SHA-256 over a set of named tensors, used wherever weights must be recognised again.

A checkpoint stores it to detect a damaged file; a LoRA adapter stores it to refuse a
base other than the one it was trained on; a run's fingerprint uses it to make sure a
resumed run has the same frozen weights.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import torch


def tensors_sha256(named: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 (hex) over each tensor's name, dtype, shape and bytes, in name order.

    ``named`` is a dict or ``(name, tensor)`` pairs (e.g. ``model.named_parameters()``);
    tensors may live on any device. Each is copied to the CPU on its own, inside the
    loop, so hashing a model on a GPU never holds a second whole copy of it in memory.
    """
    pairs = named.items() if isinstance(named, Mapping) else named
    digest = hashlib.sha256()
    for name, tensor in sorted(pairs, key=lambda pair: pair[0]):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().data if tensor.numel() else b"")
    return digest.hexdigest()
