"""Mixed precision for the training loop: which number format the matrix products use.

``--precision`` takes one of :data:`PRECISIONS`:

- ``fp32``: float32 everywhere (the book; the CPU default, bit for bit today's runs);
- ``tf32``: float32 tensors, but CUDA's matrix products round their inputs to TensorFloat-32
  (10-bit mantissa) on tensor cores (Ampere and later);
- ``bf16``: ``torch.autocast`` runs matrix products in bfloat16 (8-bit exponent like float32,
  so no loss scaling is needed);
- ``fp16``: autocast in float16, whose small range makes tiny gradients underflow to zero, so the
  loss is multiplied by a large factor before ``backward`` (``torch.amp.GradScaler``); a step
  whose gradients hold an inf or NaN is skipped (the weights stay) and counted, and the factor shrinks;
- ``auto``: bf16 on a CUDA device that supports it, else fp32 (so on a CPU: fp32).

In every case the weights ("master weights") and AdamW's states stay float32: autocast casts
copies of them for each product, and the optimizer updates the float32 originals.
"""

from __future__ import annotations

import contextlib

import torch

from .ranges import PRECISIONS, check_precision

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(name: str, device) -> str:
    """The precision ``name`` means on ``device``: ``auto`` becomes bf16 or fp32; one the device cannot
    run is a ValueError saying what to use instead (tf32 exists only on CUDA)."""
    device = torch.device(device)
    check_precision(name)
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name == "tf32" and device.type != "cuda":
        raise ValueError(f"precision tf32 is a setting of CUDA's tensor cores, found device {device.type}; "
                         "use fp32 or bf16 there")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16; use fp16 or fp32")
    return name


class Precision:
    """How one training run computes: ``Precision("bf16", "cuda")``. Used by ``training.train_epochs``.

    ``autocast()`` is the context for forward passes and losses; ``backward(loss)``, ``unscale(optimizer)``
    (before clipping) and ``step(optimizer)`` replace ``loss.backward()`` and ``optimizer.step()``. For fp32
    they are exactly those calls, so the default loop is unchanged. ``skipped_steps`` counts the fp16
    steps skipped for an inf or NaN gradient.
    """

    def __init__(self, name: str = "fp32", device="cpu"):
        self.device = torch.device(device)
        self.name = resolve_precision(name, self.device)
        self.dtype = AUTOCAST_DTYPES.get(self.name)  # None: no autocast
        self.scaler = torch.amp.GradScaler(self.device.type) if self.name == "fp16" else None
        self.skipped_steps = 0

    @property
    def is_default(self) -> bool:
        """Whether this is plain float32 (nothing changes in the loop)."""
        return self.name == "fp32"

    @contextlib.contextmanager
    def autocast(self):
        """Autocast to bf16/fp16, or TF32 matrix products, for the duration; nothing for fp32."""
        if self.dtype is not None:
            with torch.autocast(self.device.type, dtype=self.dtype):
                yield
        elif self.name == "tf32":
            before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
            torch.set_float32_matmul_precision("high")  # TF32 in matrix products
            torch.backends.cudnn.allow_tf32 = True
            try:
                yield
            finally:
                torch.set_float32_matmul_precision(before[0])
                torch.backends.cudnn.allow_tf32 = before[1]
        else:
            yield

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, with the loss scaled up first under fp16."""
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def unscale(self, optimizer) -> None:
        """Divide the gradients by the fp16 scale (before clipping them); nothing otherwise."""
        if self.scaler:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer) -> bool:
        """``optimizer.step()``; under fp16 the scaler's step, which skips a step with an inf or NaN gradient.
        Returns whether the weights were updated."""
        if not self.scaler:
            optimizer.step()
            return True
        scale = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()  # the scale shrinks exactly when the step was skipped (found inf/NaN)
        if self.scaler.get_scale() < scale:
            self.skipped_steps += 1
            return False
        return True


FP32 = Precision("fp32")


def precision_record(precision: Precision) -> dict:
    """What a run's ``metrics.json`` records of its precision: nothing for fp32 (runs as they were), else
    the precision used (``auto`` resolved) and the fp16 steps skipped."""
    return {} if precision.is_default else {"precision_used": precision.name, "skipped_steps": precision.skipped_steps}
