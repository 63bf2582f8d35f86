"""QLoRA (Dettmers et al., 2023): a quantized, frozen base model under full-precision LoRA adapters.

``quantize_base(model, "nf4")`` replaces the frozen ``nn.Linear`` layers of any model
by ``NF4Linear`` (4-bit, see ``quantization.py``), ``"int8"`` by ``Int8Linear``; then
``apply_lora(model, ...)`` wraps them as it wraps plain linear layers, and only the
adapters train. The output head (``out_head``/``lm_head``) and the embeddings stay in
full precision unless asked otherwise: the head is small for a classifier and, for a
language model, often tied to the token embedding.

Merging an adapter into a quantized base is refused: the model trained is
``dequantize(Q) + scaling * A B``, and quantizing that sum again adds a fresh rounding
error of up to half a step per weight (NF4's steps are about absmax / 8 near zero),
comparable to the update itself (notebook 10 measures it). ``dequantize_base`` gives a
full-precision copy of the base into which the adapter merges exactly.
"""

from __future__ import annotations

from torch import nn

from .lora import set_submodule, lora_wrappers, select_names
from .quantization import NF4_BLOCKSIZE, Int8Linear, NF4Linear, QuantizedLinear, check_blocksize

METHODS = ("nf4", "int8")
HEAD_NAMES = ("out_head", "lm_head")


def check_quantize_method(method: str | None, finetune_method: str | None = None) -> None:
    """Raise ``ValueError`` unless ``method`` is None or one of ``METHODS``, and (with ``finetune_method``)
    it is used with LoRA, the only fine-tuning method that trains on top of a frozen, quantized base."""
    if method is None:
        return
    if method not in METHODS:
        raise ValueError(f"unknown quantization {method!r}; choose one of {', '.join(METHODS)}")
    if finetune_method is not None and finetune_method != "lora":
        raise ValueError(f"a quantized base ({method}) is frozen, so it trains only with --method lora, "
                         f"found --method {finetune_method}; use --method lora or leave out --quantize-base")


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    """Every quantized linear layer of ``model`` by name (inside LoRA wrappers too)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def quantize_base(model: nn.Module, method: str, target_modules=None, exclude_modules=None,
                  include_head: bool = False, blocksize: int | None = None, double_quant: bool = False,
                  fused_int8: bool = False) -> nn.Module:
    """Replace the ``nn.Linear`` layers of ``model`` by quantized ones, in place; returns ``model`` (frozen).

    ``method``: ``"nf4"`` (4-bit NormalFloat, blocks of ``blocksize`` weights, default 64, each
    with an absmax scale; ``double_quant`` quantizes those scales too) or ``"int8"`` (per
    output channel; ``fused_int8`` uses PyTorch's fused int8 kernel when no gradient is
    needed, see ``Int8Linear``). ``target_modules``/``exclude_modules`` choose layers as
    in ``apply_lora`` (default: every linear layer except the head, which
    ``include_head=True`` quantizes too). For NF4, ``blocksize`` must divide each chosen
    layer's ``in_features``, so that no block straddles two output rows.

    Everything is checked before the model changes: an unknown method, a model that
    already holds quantized layers or LoRA wrappers (quantize the base first, then
    ``apply_lora``), a bad block size, an option of the other method.
    """
    check_quantize_method(method)
    other_method = ({"blocksize": blocksize, "double_quant": double_quant or None} if method == "int8"
                    else {"fused_int8": fused_int8 or None})
    given = [f"{name}={value!r}" for name, value in other_method.items() if value is not None]
    if given:
        other = "nf4" if method == "int8" else "int8"
        raise ValueError(f"{' and '.join(given)} {'is an option' if len(given) == 1 else 'are options'} of {other} "
                         f"quantization, not {method}: leave {'it' if len(given) == 1 else 'them'} out, "
                         f"or quantize with {other!r}")
    blocksize = NF4_BLOCKSIZE if blocksize is None else blocksize
    check_blocksize(blocksize)
    if quantized_layers(model):
        raise ValueError(f"this model is already quantized ({len(quantized_layers(model))} quantized layers); "
                         "quantize a fresh copy of the full-precision model, or call dequantize_base first")
    if lora_wrappers(model):
        raise ValueError("this model already holds LoRA adapters: quantize the base first, then apply_lora")
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    candidates = [n for n in linears if include_head or n.rpartition(".")[2] not in HEAD_NAMES]
    targets = select_names(candidates, target_modules, "target_modules")
    if exclude_modules is not None:
        excluded = set(select_names(candidates, exclude_modules, "exclude_modules"))
        targets = [n for n in targets if n not in excluded]
    if not targets:
        raise ValueError(f"no linear layer to quantize; linear layers: {', '.join(linears) or '(none)'}")
    if method == "nf4":
        misfits = [f"{n} ({model.get_submodule(n).in_features})" for n in targets
                   if model.get_submodule(n).in_features % blocksize]
        if misfits:
            raise ValueError(f"blocksize {blocksize} must divide the input width of every layer to quantize; it does "
                             f"not divide {', '.join(misfits[:5])}: choose a divisor (64 suits GPT-2) or exclude them")
    for name in targets:
        linear = model.get_submodule(name)
        layer = (NF4Linear.from_linear(linear, blocksize, double_quant) if method == "nf4"
                 else Int8Linear.from_linear(linear, fused_int8))
        set_submodule(model, name, layer)
    return model.requires_grad_(False)


def dequantize_base(model: nn.Module) -> nn.Module:
    """Replace every quantized layer (LoRA-wrapped or not) by an ``nn.Linear`` holding its dequantized
    weight, in place; returns ``model``. Then ``merge_lora`` can fold adapters in exactly."""
    for name, layer in quantized_layers(model).items():
        set_submodule(model, name, layer.to_linear())
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by ``model``'s parameters and buffers (a tensor shared by two modules, a tied head,
    counted once). Works on the meta device too: shapes and dtypes decide, so the bytes of a model
    too large to build (gpt2-xl) can be counted without allocating it."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])

