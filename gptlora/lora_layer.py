"""The LoRA maths: the low-rank update, the wrapper around a linear layer, and tools to study it.

A frozen linear layer ``y = x W^T + b`` gets a trainable low-rank update::

    y = x W^T + b + scaling * dropout(x) @ A @ B        A: [in, r]   B: [r, out]

Only ``A`` and ``B`` train: ``r * (in + out)`` numbers instead of ``in * out``.
``B`` starts at zero, so the adapted model starts exactly where the base model is.

DoRA (Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation") splits the adapted
weight into a length per output unit and a direction, and trains both::

    W' = m * (W + scaling * (A @ B)^T) / ||W + scaling * (A @ B)^T||      m: [out]

The norm is taken over each row of the ``[out, in]`` weight (one length per output
unit, as in ``peft``) and ``m`` starts at ``||W||``, so the model again starts at the
base. As the paper and ``peft`` do, the norm is treated as a constant in the backward
pass: the gradient then has no term through it, which saves memory and changes little.
Injection into a model lives in ``lora.py``, files in ``formats/lora_io.py``, the peft export in
``formats/lora_peft_export.py``.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .quantization import QuantizedLinear

# Why the rule matters: with Adam every entry of A and B moves by about the learning
# rate per step, so the update x @ A @ B, a sum over `rank` terms, grows with the rank.
# Dividing by the rank (the LoRA paper) keeps its size roughly independent of the rank,
# so a learning rate tuned at one rank needs no retuning at another; plain "alpha"
# lets it grow with the rank; rsLoRA (Kalajdzievski, 2023) shows that alpha/rank
# over-corrects at large ranks (learning slows) and that alpha/sqrt(rank) keeps it stable.
SCALINGS = {
    "alpha/rank": lambda alpha, rank: alpha / rank,  # LoRA paper, peft, the book's current text
    "alpha": lambda alpha, rank: alpha,  # the book's original appendix and several tutorials
    "alpha/sqrt(rank)": lambda alpha, rank: alpha / math.sqrt(rank),  # rsLoRA
}


def check_lora_hyperparameters(rank: int, alpha: float, dropout: float = 0.0, scaling: str = "alpha/rank") -> None:
    """Raise ``ValueError`` unless these make a valid adapter: ``rank`` a positive integer, ``alpha``
    a real number, ``dropout`` a probability in [0, 1) and ``scaling`` a key of ``SCALINGS``.

    Called before a model is changed (``inject_adapter``, ``lora_options``), so bad settings
    fail with this message rather than half-way through wrapping layers.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer (e.g. 8 or 16), found {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"LoRA alpha must be a finite number (e.g. 16), found {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be a probability in [0, 1) (0 turns it off), found {dropout!r}")
    if scaling not in SCALINGS:
        raise ValueError(f"unknown LoRA scaling {scaling!r}; choose one of {', '.join(SCALINGS)}")


def lora_scaling(alpha: float, rank: int, scaling: str) -> float:
    """The factor that multiplies ``x @ A @ B`` under the rule ``scaling`` (a key of ``SCALINGS``)."""
    check_lora_hyperparameters(rank, alpha, scaling=scaling)
    return SCALINGS[scaling](alpha, rank)


BASE = "__base__"  # in a mixed batch, the rows that use no adapter (as in peft)


def rows_by_adapter(row_adapters: list[str], device=None) -> dict[str, torch.Tensor]:
    """``{adapter name: row indices [k]}`` for a mixed batch, names in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(row_adapters):
        groups.setdefault(name, []).append(row)
    return {name: torch.tensor(rows, device=device) for name, rows in groups.items()}


class LoRALayer(nn.Module):
    """The low-rank update alone: ``[..., in_dim] -> [..., out_dim]``, ``scaling * dropout(x) @ A @ B``.

    ``A`` is ``[in_dim, rank]`` with Kaiming-uniform initialisation (``a=sqrt(5)``, as
    the book: torch takes the fan-in from A's second dimension, the rank); ``B`` is
    ``[rank, out_dim]`` zeros. ``scaling`` names the rule in ``SCALINGS``:
    ``"alpha/rank"`` (default), ``"alpha"`` or ``"alpha/sqrt(rank)"`` (rsLoRA). The
    rule matters as soon as you change the rank: only with a rank-aware rule does the
    learning rate you tuned at one rank stay sensible at another.
    """

    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float, dropout: float = 0.0,
                 scaling: str = "alpha/rank", device=None, dtype=None, use_dora: bool = False):
        super().__init__()
        check_lora_hyperparameters(rank, alpha, dropout, scaling)
        self.rank, self.alpha, self.scaling_rule, self.dropout_p = rank, alpha, scaling, dropout
        self.scaling = lora_scaling(alpha, rank, scaling)
        self.A = nn.Parameter(torch.empty(in_dim, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(rank, out_dim, device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # DoRA's magnitude m [out_dim]; ones until init_magnitude sets it to the base weight's row norms.
        self.magnitude = nn.Parameter(torch.ones(out_dim, device=device, dtype=dtype)) if use_dora else None

    use_dora = property(lambda self: self.magnitude is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaling * (self.dropout(x) @ self.A @ self.B)

    def delta_weight(self) -> torch.Tensor:
        """The update in ``nn.Linear``'s layout, ``[out_dim, in_dim]``: ``scaling * (A @ B)^T``."""
        return self.scaling * (self.A @ self.B).T

    # ------------------------------------------------------------------ DoRA

    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """DoRA's ``||W + scaling * (A @ B)^T||`` per output unit: ``weight`` ``[out, in]`` -> ``[out]``, detached
        (the paper's section 4.3 and ``peft`` treat it as a constant in the backward pass)."""
        return torch.linalg.norm(weight + self.delta_weight().detach(), dim=1).detach()

    def init_magnitude(self, weight: torch.Tensor) -> None:
        """Start DoRA's magnitude at the row norms of ``weight`` ``[out, in]`` (``B`` is 0 then: ``||W||``)."""
        with torch.no_grad():
            self.magnitude.copy_(self.weight_norm(weight.to(self.magnitude.dtype)))

    def adapted_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight ``[out, in]`` this adapter turns ``weight`` into: ``W + scaling * (A @ B)^T`` for LoRA,
        ``m / ||W + scaling * (A @ B)^T|| * (W + scaling * (A @ B)^T)`` (row by row) for DoRA."""
        adapted = weight + self.delta_weight()
        if not self.use_dora:
            return adapted
        return (self.magnitude / self.weight_norm(weight)).unsqueeze(1) * adapted

    def dora_update(self, x: torch.Tensor, weight: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """What DoRA adds to the base output: ``[..., in] -> [..., out]``.

        ``base_out`` is ``x @ W^T`` ``[..., out]`` without the bias (computed once by the
        wrapper). With ``ratio = m / ||W + scaling * (A @ B)^T||`` the adapted output is
        ``ratio * (x W^T + scaling * x A B) + b``, i.e. ``base_out + b`` plus this. In
        training with dropout, as in ``peft``, both terms see the dropped-out input.
        """
        ratio = self.magnitude / self.weight_norm(weight)  # [out]
        dropped = self.dropout(x)
        if self.training and self.dropout_p > 0:
            base_out = dropped @ weight.T
        return (ratio - 1) * base_out + ratio * (self.scaling * (dropped @ self.A @ self.B))


def check_dora_base(linear: nn.Module) -> None:
    """Raise ``ValueError`` if DoRA cannot wrap ``linear``: a quantized layer (its weight exists only as codes)."""
    if isinstance(linear, QuantizedLinear):
        raise ValueError(f"DoRA needs the base weight itself (its row norms, at every step), but this layer is "
                         f"quantized ({linear.method}): use plain LoRA on a quantized base, or DoRA on a "
                         "full-precision one")


class LinearWithLoRA(nn.Module):
    """``linear(x) + lora(x)`` for the active adapter; ``[..., in] -> [..., out]``.

    The wrapped layer stays reachable as ``.linear`` and the adapters as
    ``.lora[name]``, so state-dict keys read ``W_query.linear.weight`` and
    ``W_query.lora.default.A``. Passing ``rank`` and ``alpha`` adds an adapter at once,
    as the book's ``LinearWithLoRA(linear, rank, alpha)`` does.
    """

    def __init__(self, linear: nn.Linear | QuantizedLinear, rank: int | None = None, alpha: float | None = None,
                 dropout: float = 0.0, scaling: str = "alpha/rank", adapter_name: str = "default",
                 use_dora: bool = False):
        super().__init__()
        if not isinstance(linear, (nn.Linear, QuantizedLinear)):
            raise TypeError(f"LinearWithLoRA wraps an nn.Linear (or a quantized one), found {type(linear).__name__}")
        self.linear = linear
        self.lora = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.enabled = True
        self.row_adapters: list[str] | None = None  # one adapter name per batch row, during a mixed batch
        self._unmerged_weight: nn.Parameter | None = None  # set while an adapter is merged
        if rank is not None:
            self.add_adapter(adapter_name, rank, alpha, dropout, scaling, use_dora)
            self.active_adapter = adapter_name

    in_features = property(lambda self: self.linear.in_features)
    out_features = property(lambda self: self.linear.out_features)
    merged = property(lambda self: self._unmerged_weight is not None)

    def add_adapter(self, name: str, rank: int, alpha: float, dropout: float = 0.0, scaling: str = "alpha/rank",
                    use_dora: bool = False):
        """Add a fresh adapter ``name`` (``B`` = 0), on the wrapped layer's device and dtype (for a quantized
        layer, the dtype of the weight it was made from: QLoRA's adapters train in full precision).
        ``use_dora=True`` makes it a DoRA adapter, its magnitude the row norms of the base weight."""
        if name in self.lora:
            raise ValueError(f"this layer already has a LoRA adapter named {name!r}; pick another name")
        quantized = isinstance(self.linear, QuantizedLinear)
        if use_dora:
            check_dora_base(self.linear)
        reference = self.linear if quantized else self.linear.weight
        self.lora[name] = LoRALayer(self.in_features, self.out_features, rank, alpha, dropout, scaling,
                                    device=reference.device, dtype=reference.dtype, use_dora=use_dora)
        if use_dora:
            self.lora[name].init_magnitude(self.base_weight())

    def adapter_output(self, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """What adapter ``name`` adds to ``out = linear(x)`` ``[..., out]``: ``lora(x)``, or DoRA's update."""
        lora = self.lora[name]
        if not lora.use_dora:
            return lora(x)
        bias = self.linear.bias
        return lora.dora_update(x, self.linear.weight, out if bias is None else out - bias)

    def _uses_lora(self) -> bool:
        return self.enabled and not self.merged and self.active_adapter in self.lora

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        if self.row_adapters is not None and self.enabled:  # a mixed batch: each row its own adapter
            for name, rows in rows_by_adapter(self.row_adapters, x.device).items():
                if name in self.lora:  # a layer without that adapter gives those rows the base output
                    out[rows] += self.adapter_output(name, x[rows], out[rows])
        elif self._uses_lora():
            out = out + self.adapter_output(self.active_adapter, x, out)
        return out

    def base_weight(self) -> nn.Parameter:
        """The wrapped layer's own weight ``[out, in]``, whether or not an adapter is merged into it."""
        return self._unmerged_weight if self.merged else self.linear.weight

    def merge(self) -> None:
        """Fold the active adapter into the weight: ``W + scaling * (A @ B)^T`` (DoRA: scaled row by row
        to the magnitude, see ``LoRALayer.adapted_weight``).

        The original weight is kept aside rather than updated in place, so ``unmerge``
        restores it bit for bit and a weight tied to another layer (GPT-2's head and
        token embedding) is never modified. The price: one extra weight copy while merged.
        """
        if self.merged or self.active_adapter not in self.lora:
            return
        self.check_mergeable()
        original = self.linear.weight
        with torch.no_grad():
            merged = self.lora[self.active_adapter].adapted_weight(original.detach()).to(original.dtype)
        self._unmerged_weight = original
        self.linear.weight = nn.Parameter(merged, requires_grad=False)

    def check_mergeable(self) -> None:
        """Raise ``ValueError`` if ``merge`` would have to requantize: the wrapped layer is quantized."""
        if isinstance(self.linear, QuantizedLinear) and not self.merged and self.active_adapter in self.lora:
            raise ValueError(f"cannot merge a LoRA adapter into a {self.linear.method} base: requantizing "
                             "W + scaling * (A @ B)^T adds a new rounding error of up to half a quantization step "
                             "per weight, so the merged model would not be the one trained. Merge into a "
                             "full-precision copy instead: gptlora.qlora.dequantize_base(model), then merge_lora")

    def unmerge(self) -> None:
        """Put the original weight back (exactly) after ``merge``."""
        if self.merged:
            self.linear.weight, self._unmerged_weight = self._unmerged_weight, None


class ModuleToSave(nn.Module):
    """A module trained in full alongside the adapters (e.g. a new classification head).

    Keeps the ``original`` frozen and one trainable copy per adapter in ``copies``;
    forwards through the active adapter's copy, or the original when LoRA is disabled.
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.enabled = True
        self.row_adapters: list[str] | None = None  # one adapter name per batch row, during a mixed batch

    def add_adapter(self, name: str) -> None:
        """Add a trainable copy of ``original`` for adapter ``name`` (a deep copy: tied weights come untied)."""
        if name in self.copies:
            raise ValueError(f"this module already has a copy for adapter {name!r}; pick another name")
        self.copies[name] = copy.deepcopy(self.original)

    def current(self) -> nn.Module:
        """The module the forward pass uses now."""
        use_copy = self.enabled and self.active_adapter in self.copies
        return self.copies[self.active_adapter] if use_copy else self.original

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if self.row_adapters is None or not self.enabled:
            return self.current()(x, *args, **kwargs)
        # A mixed batch: each group of rows through its adapter's copy (or the original), then back in order.
        groups = rows_by_adapter(self.row_adapters, x.device)
        parts = [self.copies[name](x[rows], *args, **kwargs) if name in self.copies else
                 self.original(x[rows], *args, **kwargs) for name, rows in groups.items()]
        order = torch.argsort(torch.cat(list(groups.values())))
        return torch.cat(parts)[order]


# ----------------------------------------------------------------------------- understanding LoRA

def low_rank_approximation(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` approximation of ``matrix`` ``[m, n]`` as factors ``left @ right``.

    Returns ``left`` ``[m, rank]`` and ``right`` ``[rank, n]`` from the truncated SVD
    (Eckart-Young: no rank-``rank`` matrix is closer in Frobenius norm; the error is
    the root sum of squares of the discarded singular values).
    """
    if matrix.dim() != 2:
        raise ValueError(f"expected a matrix [m, n], found shape {list(matrix.shape)}")
    if not 1 <= rank <= min(matrix.shape):
        raise ValueError(f"rank must lie in [1, {min(matrix.shape)}] for a {list(matrix.shape)} matrix, found {rank}")
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank]


def amplification_factor(delta_w: torch.Tensor, w: torch.Tensor, rank: int | None = None) -> float:
    """How much an update ``delta_w`` amplifies directions that ``w`` barely uses (LoRA paper, sec. 7).

    ``||delta_w||_F / ||U^T w V||_F``, with ``U`` ``[m, r]`` and ``V`` ``[n, r]`` the
    top-``r`` singular vectors of ``delta_w`` (``r``: its numerical rank unless given).
    Both matrices are ``[m, n]`` (any consistent layout). A large factor means the
    update boosts features that were weak in ``w``, as the paper found for GPT-3.
    """
    if delta_w.shape != w.shape or delta_w.dim() != 2:
        raise ValueError(f"expected two matrices of one shape, found {list(delta_w.shape)} and {list(w.shape)}")
    delta, weight = delta_w.double(), w.double()
    rank = rank or int(torch.linalg.matrix_rank(delta))
    if rank == 0:
        raise ValueError("delta_w is zero: an update that changes nothing amplifies nothing")
    u, _, vh = torch.linalg.svd(delta, full_matrices=False)
    projected = u[:, :rank].T @ weight @ vh[:rank].T  # [r, r]: w seen through delta_w's subspaces
    return float(torch.linalg.norm(delta) / torch.linalg.norm(projected))
