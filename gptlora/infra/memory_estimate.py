"""Peak training memory of spam fine-tuning (chapter 6), computed from tensor sizes, not measured.

:func:`finetune_memory` adds up, in bytes, for a GPT-2 size and a method (full, lora, qlora):

- **weights**: every parameter in float32 (4 bytes); under QLoRA the blocks' linear weights are NF4:
  half a byte each plus a float32 ``absmax`` per block of 64 (``quantization.NF4_BLOCKSIZE``);
- **gradients** and **AdamW's two moments**: 4 + 8 bytes per *trainable* parameter;
- **activations** kept for the backward pass, per token: ``16 x D`` float32 numbers per transformer block
  (the tensors autograd saves, counted on this model's code by ``tests/test_bench.py``: the block's input
  and its first LayerNorm's output, D each; Q, K, V, 3D; attention's output, D; the residual sum and the
  second LayerNorm's output, 2D; the feed-forward's first product and its GELU, 2 x 4D) plus ``2 x D``
  after the blocks (the final LayerNorm's input and output). Attention's T x T scores are not kept:
  PyTorch's fused attention (flash or memory-efficient) recomputes them. With gradient checkpointing a
  block keeps only its input (D per token), and one block's ``16 x D`` exist at a time, while it is
  recomputed;
- **workspace**: QLoRA dequantizes one weight at a time to float32 (the largest, ``4D x D``).

It leaves out the CUDA context (~0.3-0.5 GB), the allocator's rounding and fragmentation, and cuBLAS
workspaces: a measured peak is higher. The model is built on PyTorch's ``meta`` device (shapes only),
with the same ``classifier.prepare_for_classification`` the run uses, so the counts are the run's.
"""

from __future__ import annotations

import torch

FLOAT32 = 4
ACTIVATIONS_PER_BLOCK = 16  # float32 numbers per token and per unit of width (see the module docstring)
ACTIVATIONS_OUTSIDE_BLOCKS = 2
METHODS = ("full", "lora", "qlora")


def finetune_memory(preset: str, method: str, batch_size: int = 8, tokens: int = 120,
                    checkpointing: bool = False, lora_rank: int = 16) -> dict[str, int]:
    """Bytes of weights, gradients, optimizer, activations, workspace and their ``total`` for fine-tuning
    ``preset`` (gpt2-small, ...) as a spam classifier by ``method`` on batches of ``batch_size`` x ``tokens``
    (the book's chapter 6: 8 x 120)."""
    from ..classifier import prepare_for_classification
    from ..model import GPTConfig, GPTModel
    from ..quantization import NF4_BLOCKSIZE

    if method not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(METHODS)}, found {method!r}")
    config = GPTConfig.from_preset(preset, qkv_bias=True, drop_rate=0.0)
    with torch.device("meta"):
        model = GPTModel(config)
        options = dict(rank=lora_rank, alpha=lora_rank) if method != "full" else None
        prepare_for_classification(model, "full" if method == "full" else "lora", method_options=options)
    quantized = 0  # weights that QLoRA stores as NF4: the blocks' linear layers (not the head)
    if method == "qlora":
        quantized = sum(module.weight.numel() for module in model.trf_blocks.modules()
                        if isinstance(module, torch.nn.Linear) and not module.weight.requires_grad)
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    nf4_bytes = quantized // 2 + -(-quantized // NF4_BLOCKSIZE) * FLOAT32
    width, layers, rows = config.emb_dim, config.n_layers, batch_size * tokens
    if checkpointing:
        per_token = layers * width + ACTIVATIONS_PER_BLOCK * width
    else:
        per_token = layers * ACTIVATIONS_PER_BLOCK * width
    parts = dict(weights=(parameters - quantized) * FLOAT32 + nf4_bytes,
                 gradients=trainable * FLOAT32,
                 optimizer=2 * trainable * FLOAT32,
                 activations=rows * (per_token + ACTIVATIONS_OUTSIDE_BLOCKS * width) * FLOAT32,
                 workspace=4 * width * width * FLOAT32 if method == "qlora" else 0)
    return {**parts, "total": sum(parts.values())}
