"""Hardware facts for ``gptlora bench``: a device's peak FLOP/s, a measured matrix-product rate, the
FLOPs a GPT model spends per trained token, and MFU (model FLOPs utilisation).

MFU = (tokens per second x FLOPs per token) / peak FLOP/s: the share of the chip's arithmetic that went
into the model's own products (PaLM, Chowdhery et al. 2022, appendix B; nanoGPT's ``estimate_mfu``).
Recomputation (gradient checkpointing) does not count: it is the model's FLOPs, not the chip's.
"""

from __future__ import annotations

import time

import torch

TERA = 1e12

# Dense peak TFLOP/s (no 2:4 sparsity) by device-name fragment, most specific first:
# (fragment, bf16/fp16 tensor cores with float32 accumulation, tf32 tensor cores, plain float32).
# Sources: NVIDIA's datasheets for H100/H200 (SXM; PCIe H100 is its own row), A100 (SXM and PCIe), L4 and
# T4 (T4: fp16 only, no bf16 tensor cores); the Ampere GA102, Ada AD102 and Blackwell GB202 whitepapers for
# the RTX cards ("FP16 tensor with FP32 accumulate", the rate autocast gets on GeForce). Apple: the GPU's
# float32 rate from Apple's announcements (M1 2.6, M1 Pro 5.2, M1 Max 10.4, M2 3.6, M2 Max 13.6); Apple
# publishes no other rate, and the M3/M4 are not listed: the bench then falls back to the measured rate.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0, 378.0, 51.2),
    ("H100", 989.4, 494.7, 66.9),
    ("H200", 989.4, 494.7, 66.9),
    ("A100", 312.0, 156.0, 19.5),
    ("L4", 121.0, 60.0, 30.3),
    ("T4", 65.0, None, 8.1),
    ("RTX 3090", 71.0, 35.6, 35.6),
    ("RTX 3080", 59.5, 29.8, 29.8),
    ("RTX 4090", 165.2, 82.6, 82.6),
    ("RTX 4080", 97.5, 48.7, 48.7),
    ("RTX 5090", 209.5, 104.8, 104.8),
    ("Apple M1 Max", None, None, 10.4),
    ("Apple M1 Pro", None, None, 5.2),
    ("Apple M1", None, None, 2.6),
    ("Apple M2 Max", None, None, 13.6),
    ("Apple M2", None, None, 3.6),
)
COLUMN = {"bf16": 1, "fp16": 1, "tf32": 2, "fp32": 3}


def device_name(device) -> str:
    """What the device calls itself: the CUDA name, ``"Apple ..."`` for MPS (from sysctl), or ``"cpu"``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        import subprocess

        brand = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
        return brand.stdout.strip() or "Apple (unknown chip)"
    return "cpu"


def peak_flops(name: str, precision: str) -> float | None:
    """The published dense peak FLOP/s of the device called ``name`` in ``precision`` (bf16, fp16, tf32,
    fp32), or None when the table does not know it (a CPU, an unlisted chip or format)."""
    for fragment, *rates in PEAK_TFLOPS:
        if fragment.lower() in name.lower():
            rate = rates[COLUMN[precision] - 1]
            return None if rate is None else rate * TERA
    return None


def measured_matmul_flops(device, dtype=torch.float32, size: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of ``size x size`` matrix products in ``dtype`` on ``device``, measured now (2 size^3 FLOPs each;
    the best of ``repeats`` timed products, after one to warm up)."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for index in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        if index:  # the first product warms up (kernel choice, caches)
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def synchronize(device) -> None:
    """Wait for the device's queued work (CUDA and MPS run asynchronously; a CPU does not)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def flops_per_token(n_params: int, n_layers: int, emb_dim: int, context_length: int) -> int:
    """Training FLOPs per token of a GPT: 6N for the weights' products (2N forward, 4N backward), plus
    attention's 12 x layers x width x context (the scores and their weighted sum: PaLM appendix B).

    ``n_params``: parameters in matrix products: all but the position embeddings (nanoGPT's count);
    the token embedding counts when the head shares it, as in GPT-2.
    """
    return 6 * n_params + 12 * n_layers * emb_dim * context_length


def model_flops_per_token(model: torch.nn.Module, context_length: int) -> int:
    """:func:`flops_per_token` of a ``model.GPTModel`` (its position embeddings left out)."""
    parameters = sum(p.numel() for p in model.parameters()) - model.pos_emb.weight.numel()
    return flops_per_token(parameters, model.cfg.n_layers, model.cfg.emb_dim, context_length)


def mfu(tokens_per_second: float, flops_per_token: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation: the share (0..1) of ``peak`` FLOP/s the training's own FLOPs used."""
    return None if not peak else tokens_per_second * flops_per_token / peak
