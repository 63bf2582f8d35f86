"""Weight quantization from scratch: 4-bit NormalFloat (QLoRA) and per-channel int8, and the layers that hold them.

**NF4** (Dettmers et al., 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", sec. 3):
pretrained weights are roughly normally distributed, so the 16 levels of a 4-bit
code are placed at quantiles of N(0, 1), scaled to [-1, 1], each level then holding
about the same share of the weights; 0 is a level exactly (padding, zeros and
sparse weights stay exact). A weight matrix is flattened and cut into blocks of 64;
each block is divided by its absolute maximum (``absmax``, kept in float32), each
value is replaced by the index of its nearest level, and two 4-bit indices are
packed into one byte. Cost: 4 bits + 32/64 bits of scale = 4.5 bits per weight.

**Double quantization** (the paper's "DQ") quantizes those float32 scales too: their
mean is subtracted and they are stored as 8-bit codes in blocks of 256 with one
float32 scale per block: 8/64 + 32/(64 * 256) bits = 0.127 bits per weight instead of 0.5.

The rounding, packing order and file layout follow ``bitsandbytes``'
``quantize_4bit(..., quant_type="nf4")`` so that our bytes equal theirs (tested bit
for bit); ``bitsandbytes`` is never imported here.

**int8** (per output channel, symmetric): row ``i`` of ``W`` is stored as ``round(W_i / s_i)``
in [-127, 127] with ``s_i = max|W_i| / 127``; 8 bits + one scale per row.

Shapes: ``N`` elements of a flattened weight, ``blocks = ceil(N / blocksize)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# The 16 NF4 levels, as bitsandbytes hard-codes them (float32; QLoRA appendix E lists the same values).
# `normal_float_levels()` derives them from the normal distribution; they agree to float32 rounding.
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=torch.float32)
NF4_BLOCKSIZE = 64
ABSMAX_BLOCKSIZE = 256  # blocks of the second quantization (double quantization)
TINY = 1e-38  # an all-zero block is divided by this instead of 0 (its codes then all mean 0.0)


def normal_float_levels(offset: float = 0.9677083) -> torch.Tensor:
    """The 16 NF4 levels derived from N(0, 1): ``[16]`` float64, sorted, from -1 to 1 with an exact 0.

    An asymmetric 4-bit code with a zero: 8 positive levels at the quantiles of
    ``linspace(0.5, offset, 9)`` (the 0.5 quantile, 0, dropped), 7 negative ones at
    ``linspace(0.5, offset, 8)``, and 0; then divided by the largest. ``offset``
    (QLoRA's choice, ``1 - 0.5 * (1/(2*15) + 1/(2*16))``) keeps the extreme quantile finite.
    """
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    positive = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return levels / levels.abs().max()


def dynamic_tree_levels() -> torch.Tensor:
    """The 256 levels of the signed 8-bit "dynamic" code that stores double-quantized scales: ``[256]`` float32.

    Dettmers (2016, "8-Bit Approximations for Parallelism in Deep Learning"): for
    each decade ``10^(e-6)``, e = 0..6, ``2^e`` evenly spaced levels (the midpoints
    of ``linspace(0.1, 1, 2^e + 1)``) of both signs, plus 0 and 1: fine steps near
    zero, coarse ones near 1. The same construction as ``bitsandbytes``' default code,
    computed in the same float32 order so the levels are bitwise the same.
    """
    values = [0.0, 1.0]
    for exponent in range(7):
        edges = torch.linspace(0.1, 1, 2 ** exponent + 1, dtype=torch.float32)
        means = (10 ** (exponent - 6)) * ((edges[:-1] + edges[1:]) / 2.0)
        values += means.tolist() + (-means).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def check_blocksize(blocksize: int, what: str = "blocksize") -> None:
    """Raise ``ValueError`` unless ``blocksize`` is an integer >= 2 (two codes share a byte)."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 2:
        raise ValueError(f"{what} must be an integer of at least 2 (e.g. 64), found {blocksize!r}")


# ----------------------------------------------------------------------------- blockwise absmax

def blockwise_scale(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``flat`` ``[N]`` into blocks and scale each into [-1, 1] by its absolute maximum.

    Returns ``scaled`` ``[N]`` float32 and ``absmax`` ``[blocks]`` float32. A full block is
    multiplied by ``1 / absmax``; the last, partial block (when ``blocksize`` does not
    divide ``N``) is divided by it, and an all-zero partial block stores ``absmax`` 1e-38:
    both exactly as ``bitsandbytes`` does on the CPU, so that the bits agree.
    """
    flat = flat.reshape(-1).float()
    full = flat.numel() - flat.numel() % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=TINY)).unsqueeze(1)).view(-1)
    if full < flat.numel():
        rest = flat[full:]
        rest_absmax = rest.abs().max().clamp(min=TINY)
        absmax = torch.cat([absmax, rest_absmax.view(1)])
        scaled = torch.cat([scaled, rest / rest_absmax])
    return scaled.clamp(-1, 1), absmax  # rounding can push x * (1/absmax) just past 1


def nearest_level(scaled: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index ``[...]`` uint8 of the nearest of the sorted ``levels`` to each value of ``scaled``.

    The boundaries are the midpoints between neighbouring levels; a value exactly on
    one goes to the lower level (``torch.bucketize``'s rule, and bitsandbytes').
    """
    midpoints = (levels[:-1] + levels[1:]) / 2
    return torch.bucketize(scaled, midpoints).to(torch.uint8)


def blockwise_rescale(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``values`` ``[N]`` (levels in [-1, 1]) times the absmax ``[blocks]`` of their block: ``[N]`` float32."""
    n = values.numel()
    padded = F.pad(values, (0, absmax.numel() * blocksize - n))
    return (padded.view(-1, blocksize) * absmax.unsqueeze(1)).view(-1)[:n]


# ----------------------------------------------------------------------------- 4-bit packing

def pack_4bit(codes: torch.Tensor, pad_code: int = 7) -> torch.Tensor:
    """Two 4-bit codes per byte: ``[N]`` uint8 (values < 16) -> ``[ceil(N / 2)]`` uint8.

    The first code of each pair goes in the high nibble (bitsandbytes' order). An odd
    ``N`` is padded with ``pad_code`` (7 is NF4's exact zero).
    """
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), pad_code)])
    return (codes[0::2] << 4) | codes[1::2]


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Undo ``pack_4bit``: ``[ceil(n / 2)]`` uint8 -> the first ``n`` codes ``[n]`` uint8."""
    return torch.stack([packed >> 4, packed & 0xF], dim=1).view(-1)[:n]


# ----------------------------------------------------------------------------- NF4 (+ double quantization)

def quantize_blockwise_8bit(values: torch.Tensor, blocksize: int = ABSMAX_BLOCKSIZE) -> dict[str, torch.Tensor]:
    """8-bit blockwise quantization with the dynamic code: ``values`` ``[M]`` -> ``codes`` ``[M]`` uint8
    and ``absmax`` ``[ceil(M / blocksize)]`` float32 (bitsandbytes' ``quantize_blockwise``)."""
    scaled, absmax = blockwise_scale(values, blocksize)
    return {"codes": nearest_level(scaled, dynamic_tree_levels()), "absmax": absmax}


def dequantize_blockwise_8bit(codes: torch.Tensor, absmax: torch.Tensor,
                              blocksize: int = ABSMAX_BLOCKSIZE) -> torch.Tensor:
    """Undo ``quantize_blockwise_8bit``: ``[M]`` float32."""
    return blockwise_rescale(dynamic_tree_levels().to(codes.device)[codes.long()], absmax, blocksize)


def quantize_nf4(weight: torch.Tensor, blocksize: int = NF4_BLOCKSIZE,
                 double_quant: bool = False) -> dict[str, torch.Tensor]:
    """NF4-quantize ``weight`` (any shape, N elements; float32, float16 or bfloat16).

    Returns a dict of tensors:
      - ``packed`` ``[ceil(N / 2)]`` uint8: the level indices, two per byte (``pack_4bit``);
      - without ``double_quant``: ``absmax`` ``[blocks]`` float32, one scale per block;
      - with ``double_quant``: ``absmax_codes`` ``[blocks]`` uint8, ``absmax_absmax``
        ``[ceil(blocks / 256)]`` float32 and ``absmax_offset`` ``[]`` float32 (the mean
        subtracted before the 8-bit quantization; the scales are all positive, so
        centring them uses the signed code's range).
    ``weight``'s shape and dtype are not stored: ``dequantize_nf4`` takes them.
    """
    check_blocksize(blocksize)
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"NF4 quantizes float32, float16 or bfloat16 weights, found {weight.dtype}")
    scaled, absmax = blockwise_scale(weight, blocksize)
    state = {"packed": pack_4bit(nearest_level(scaled, NF4_LEVELS.to(scaled.device)))}
    if not double_quant:
        return {**state, "absmax": absmax}
    offset = absmax.mean()
    second = quantize_blockwise_8bit(absmax - offset)
    return {**state, "absmax_codes": second["codes"], "absmax_absmax": second["absmax"], "absmax_offset": offset}


def nf4_absmax(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The per-block scales ``[blocks]`` float32 of a ``quantize_nf4`` result (decoded if double-quantized)."""
    if "absmax" in state:
        return state["absmax"]
    return dequantize_blockwise_8bit(state["absmax_codes"], state["absmax_absmax"]) + state["absmax_offset"]


def dequantize_nf4(state: dict[str, torch.Tensor], shape, blocksize: int = NF4_BLOCKSIZE,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight of ``shape`` (and ``dtype``) that ``state`` (from ``quantize_nf4``) encodes:
    ``NF4_LEVELS[code] * absmax`` of its block, computed in float32."""
    n = math.prod(shape)
    codes = unpack_4bit(state["packed"], n)
    values = NF4_LEVELS.to(codes.device)[codes.long()]
    return blockwise_rescale(values, nf4_absmax(state), blocksize).view(shape).to(dtype)


# ----------------------------------------------------------------------------- int8, per output channel

def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``weight`` ``[out, in]`` -> ``(codes [out, in] int8, scales [out] float32)``
    with ``weight ~ codes * scales[:, None]``; an all-zero row gets scale 1 (its codes are 0)."""
    if weight.dim() != 2:
        raise ValueError(f"int8 quantization expects a matrix [out, in], found shape {list(weight.shape)}")
    weight = weight.float()
    scales = weight.abs().amax(dim=1) / 127
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(weight / scales.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return codes, scales


def dequantize_int8(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Undo ``quantize_int8``: ``[out, in]`` in ``dtype``."""
    return (codes.float() * scales.unsqueeze(1)).to(dtype)


# ----------------------------------------------------------------------------- the quantized linear layers

class _DequantizingLinear(torch.autograd.Function):
    """``x W^T + b`` with ``W`` rebuilt from its quantized form in the forward pass and again in the
    backward pass, so that no full-precision weight is kept alive between them (QLoRA's memory saving:
    autograd would otherwise store each layer's dequantized ``W`` for the input's gradient)."""

    @staticmethod
    def forward(ctx, x, layer, bias):
        ctx.layer = layer
        return F.linear(x, layer.dequantized_weight(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        # The base is frozen: only the input needs a gradient (for the adapters of earlier layers).
        grad_x = grad_out @ ctx.layer.dequantized_weight(grad_out.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


class QuantizedLinear(nn.Module):
    """A frozen ``nn.Linear`` stored quantized: ``[..., in_features] -> [..., out_features]``.

    The codes and scales are buffers (they never train and are saved in ``state_dict``);
    the bias, if any, stays a frozen float parameter. ``forward`` dequantizes the weight
    and applies it, equal to an ``nn.Linear`` holding ``dequantized_weight()``.
    Subclasses define ``dequantized_weight`` and ``from_linear``.
    """

    method = ""  # "nf4" or "int8"

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def device(self) -> torch.device:
        return next(self.buffers()).device

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight ``[out_features, in_features]`` these codes stand for, in ``dtype`` (default: ``self.dtype``)."""
        raise NotImplementedError

    def _apply(self, fn, recurse=True):
        """``model.to(...)``, ``.half()``, ``.bfloat16()``, ``.cuda()`` go through here. The codes and scales
        move to the new device but keep their dtypes: rounding the float32 scales to 16 bits would change
        every weight; the bias and ``self.dtype`` (the dequantized weight's, and new adapters') follow the cast."""
        buffers = {id(b) for b in self._buffers.values() if b is not None}

        def keep_buffer_dtypes(tensor):
            converted = fn(tensor)
            if id(tensor) in buffers and converted.dtype != tensor.dtype:
                return tensor.to(converted.device)
            return converted

        self.dtype = fn(torch.empty(0, dtype=self.dtype, device=self.device)).dtype
        return super()._apply(keep_buffer_dtypes, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return _DequantizingLinear.apply(x, self, bias)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` (frozen) holding the dequantized weight and this bias."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.device, dtype=self.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dequantized_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class NF4Linear(QuantizedLinear):
    """A linear layer whose weight is NF4: ``packed`` ``[out * in / 2]`` uint8 and the block scales
    (``absmax`` ``[out * in / blocksize]``, or their double-quantized form; see ``quantize_nf4``)."""

    method = "nf4"

    def __init__(self, state: dict[str, torch.Tensor], in_features: int, out_features: int, blocksize: int,
                 bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
        super().__init__(in_features, out_features, bias, dtype)
        self.blocksize = blocksize
        for name, tensor in state.items():
            self.register_buffer(name, tensor)
        self._state_names = tuple(state)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = NF4_BLOCKSIZE, double_quant: bool = False) -> NF4Linear:
        weight = linear.weight.detach()
        return cls(quantize_nf4(weight, blocksize, double_quant), linear.in_features, linear.out_features,
                   blocksize, linear.bias, weight.dtype)

    @property
    def double_quant(self) -> bool:
        return "absmax_codes" in self._state_names

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        state = {name: getattr(self, name) for name in self._state_names}
        return dequantize_nf4(state, (self.out_features, self.in_features), self.blocksize, dtype or self.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, blocksize={self.blocksize}, double_quant={self.double_quant}"


def fused_int8_kernel_available(device: torch.device | str = "cpu") -> bool:
    """Whether PyTorch has a fused int8-weight matrix product on ``device`` (``torch._weight_int8pack_mm``,
    a private operator of recent versions), probed once with a small product."""
    device = torch.device(device)
    if device.type not in _INT8_KERNEL:
        try:
            x = torch.ones(1, 32, dtype=torch.bfloat16, device=device)
            w = torch.ones(8, 32, dtype=torch.int8, device=device)
            out = torch._weight_int8pack_mm(x, w, torch.ones(8, dtype=torch.bfloat16, device=device))
            _INT8_KERNEL[device.type] = bool(out.shape == (1, 8) and float(out[0, 0]) == 32.0)
        except (AttributeError, RuntimeError, NotImplementedError):
            _INT8_KERNEL[device.type] = False
    return _INT8_KERNEL[device.type]


_INT8_KERNEL: dict[str, bool] = {}

# PyTorch's CPU kernel (aten/src/ATen/native/cpu/int8mm_kernel.cpp) reads a row 16 values at a time with
# AVX-512 (8 with AVX2 or Arm NEON), with aligned loads and no loop for a remainder: another input width
# reads past the end of each row (garbage, measured up to 1e30, or a segmentation fault), and an input
# whose data does not start on a 32-byte boundary crashes it. So the fused path takes only widths that
# are a multiple of 16 and a freshly allocated (64-byte aligned) activation; anything else dequantizes.
FUSED_INT8_WIDTH = 16


def _aligned(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is contiguous and its data starts on a 64-byte boundary (PyTorch's CPU allocations do)."""
    return tensor.is_contiguous() and tensor.data_ptr() % 64 == 0


class Int8Linear(QuantizedLinear):
    """A linear layer with per-output-channel int8 weights: ``weight_int8`` ``[out, in]``, ``scales`` ``[out]``.

    With ``fused=True``, no gradient needed and ``in_features`` a multiple of
    ``FUSED_INT8_WIDTH`` (16), the product runs in PyTorch's fused int8-weight kernel
    (``torch._weight_int8pack_mm``: bfloat16 activations and scales, the weight read as
    int8, a quarter of float32's bytes); otherwise the weight is dequantized to float
    and applied (exact to ``dequantized_weight()``).
    """

    method = "int8"

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32, fused: bool = False):
        super().__init__(weight_int8.shape[1], weight_int8.shape[0], bias, dtype)
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scales", scales)
        self.fused = fused

    @classmethod
    def from_linear(cls, linear: nn.Linear, fused: bool = False) -> Int8Linear:
        codes, scales = quantize_int8(linear.weight.detach())
        return cls(codes, scales, linear.bias, linear.weight.dtype, fused)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_int8(self.weight_int8, self.scales, dtype or self.dtype)

    def uses_fused_kernel(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` runs in the fused kernel (see the class docstring and ``FUSED_INT8_WIDTH``)."""
        return (self.fused and not (torch.is_grad_enabled() and x.requires_grad)
                and self.in_features % FUSED_INT8_WIDTH == 0 and _aligned(self.weight_int8)
                and fused_int8_kernel_available(x.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_fused_kernel(x):
            flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
            if not _aligned(flat):  # x was already bfloat16: a view (e.g. x[:, -1:]) may start mid-allocation
                flat = flat.clone(memory_format=torch.contiguous_format)
            out = torch._weight_int8pack_mm(flat, self.weight_int8, self.scales.to(torch.bfloat16)).to(x.dtype)
            out = out.view(*x.shape[:-1], self.out_features)
            return out if self.bias is None else out + self.bias.to(x.dtype)
        return super().forward(x)
