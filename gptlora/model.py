"""The GPT-2 architecture in one file: config, layers, and the model.

Module and parameter names follow "Build a Large Language Model (From Scratch)"
(``tok_emb``, ``trf_blocks.0.att.W_query``, ...), so a reader can hold this file
next to the book. Parameters are created in the book's order with PyTorch's default
initialisation: under the same seed we get the book's untrained model bit for bit.

Shapes used in the docstrings:
    B  batch size            T  tokens in the input
    D  embedding width       H  attention heads, hd = D // H
    V  vocabulary size
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn


@dataclass
class GPTConfig:
    """Hyper-parameters of a GPT-2-shaped model.

    The defaults are GPT-2 small (124M). ``qkv_bias`` is False in the book's
    from-scratch chapters and True for the released OpenAI weights.
    """

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.1
    qkv_bias: bool = False

    def __post_init__(self):
        if self.emb_dim % self.n_heads != 0:
            raise ValueError(
                f"emb_dim must be divisible by n_heads, found emb_dim={self.emb_dim} "
                f"and n_heads={self.n_heads}; choose an emb_dim that is a multiple of n_heads"
            )

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        """Config of one of the four GPT-2 sizes, e.g. ``"gpt2-small"`` or ``"124M"``.

        Keyword ``overrides`` replace fields, e.g. ``from_preset("gpt2-small", qkv_bias=True)``.
        """
        return cls(**{**PRESETS[canonical_preset(name)], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


# Widths, depths and head counts of the released GPT-2 models (Radford et al., 2019).
PRESETS = {
    "gpt2-small": dict(emb_dim=768, n_layers=12, n_heads=12),
    "gpt2-medium": dict(emb_dim=1024, n_layers=24, n_heads=16),
    "gpt2-large": dict(emb_dim=1280, n_layers=36, n_heads=20),
    "gpt2-xl": dict(emb_dim=1600, n_layers=48, n_heads=25),
}
PRESET_ALIASES = {"124M": "gpt2-small", "355M": "gpt2-medium", "774M": "gpt2-large", "1558M": "gpt2-xl"}


def canonical_preset(name: str) -> str:
    """The canonical name of a GPT-2 size: ``"124M"`` -> ``"gpt2-small"``; ValueError listing the known names."""
    canonical = PRESET_ALIASES.get(name, name)
    if canonical not in PRESETS:
        known = ", ".join(list(PRESETS) + list(PRESET_ALIASES))
        raise ValueError(f"unknown GPT-2 preset {name!r}; known presets: {known}")
    return canonical


class LayerNorm(nn.Module):
    """Layer normalisation over the last dimension, with GPT-2's epsilon (1e-5).

    Input and output: ``[..., D]``.
    """

    def __init__(self, emb_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same maths as the book's mean/var formulation (biased variance), in one fused kernel.
        return F.layer_norm(x, self.scale.shape, self.scale, self.shift, self.eps)


class GELU(nn.Module):
    """GELU with GPT-2's tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


class FeedForward(nn.Module):
    """Position-wise MLP: ``[..., D] -> [..., 4D] -> GELU -> [..., D]``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim),
            GELU(),
            nn.Linear(4 * cfg.emb_dim, cfg.emb_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated.

    Each layer's buffer is ``[B, H, max_len, hd]``; ``length`` tokens are filled.
    Writing into a preallocated buffer avoids re-copying the whole history with
    ``torch.cat`` at every generated token.
    """

    def __init__(self, n_layers, batch_size, n_heads, max_len, head_dim, device=None, dtype=None):
        shape = (batch_size, n_heads, max_len, head_dim)
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.values = [torch.empty(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0  # tokens stored; also the position of the next token

    def reset(self) -> None:
        """Forget every stored token (the buffers are kept and overwritten)."""
        self.length = 0

    def attention_mask(self, t: int, device) -> tuple[torch.Tensor | None, bool]:
        """``(attn_mask, is_causal)`` for ``scaled_dot_product_attention`` of ``t`` new tokens after the cached ones."""
        past = self.length
        if past == 0:  # plain causal attention over the T new tokens
            return None, True
        if t == 1:  # one new token may see every cached token: no mask needed
            return None, False
        # several new tokens after a cached prefix: new token i sees positions <= past + i
        return torch.ones(t, past + t, dtype=torch.bool, device=device).tril(diagonal=past), False

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Append ``k, v`` (``[B, H, T_new, hd]``) for ``layer``; return all keys and values so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"the KV cache holds at most {self.max_len} tokens, asked to hold {end}; call "
                             "cache.reset() and feed the last tokens again, or make a larger one with model.new_cache")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention: ``[B, T, D] -> [B, T, D]``.

    The readable formulation, for every head (``Q, K, V`` are ``[B, H, T, hd]``)::

        scores  = Q @ K.transpose(-2, -1) / sqrt(hd)     # [B, H, T, T]
        scores  = scores.masked_fill(future_mask, -inf)   # token t sees tokens <= t
        weights = dropout(softmax(scores, dim=-1))
        context = weights @ V                             # [B, H, T, hd]

    ``forward`` computes exactly this with ``F.scaled_dot_product_attention``, one
    fused kernel that never materialises the ``T x T`` matrix on most back ends;
    ``attention_reference`` keeps the formulation above for tests and notebooks.
    """

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int, qkv_bias=False):
        super().__init__()
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = dropout

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, D] -> [B, H, T, hd]``."""
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        b, t, _ = x.shape
        q = self._split_heads(self.W_query(x))
        k = self._split_heads(self.W_key(x))
        v = self._split_heads(self.W_value(x))
        if cache is None:  # plain causal attention over the T new tokens
            mask, is_causal = None, True
        else:
            mask, is_causal = cache.attention_mask(t, x.device)  # before the update: it depends on the past
            k, v = cache.update(layer, k, v)
        dropout_p = self.dropout if self.training else 0.0
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)
        return self.out_proj(context.transpose(1, 2).reshape(b, t, self.d_out))

    def attention_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The book's explicit formulation (no cache, no dropout), for checking ``forward``."""
        b, t, _ = x.shape
        q = self._split_heads(self.W_query(x))
        k = self._split_heads(self.W_key(x))
        v = self._split_heads(self.W_value(x))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(diagonal=1)
        weights = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
        return self.out_proj((weights @ v).transpose(1, 2).reshape(b, t, self.d_out))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: ``x + attn(norm1(x))`` then ``x + ff(norm2(x))``; ``[B, T, D]`` in and out."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.att = MultiHeadAttention(
            d_in=cfg.emb_dim,
            d_out=cfg.emb_dim,
            context_length=cfg.context_length,
            dropout=cfg.drop_rate,
            num_heads=cfg.n_heads,
            qkv_bias=cfg.qkv_bias,
        )
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg.emb_dim)
        self.norm2 = LayerNorm(cfg.emb_dim)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x), cache=cache, layer=layer))
        x = x + self.drop_shortcut(self.ff(self.norm2(x)))
        return x


class GPTModel(nn.Module):
    """GPT-2: token ids ``[B, T]`` -> logits ``[B, T, V]``.

    The output head is a separate ``Linear(D, V, bias=False)``, as in the book, so a
    fresh model has 163,009,536 parameters at GPT-2 small size. The released GPT-2
    weights tie it to the token embedding; ``tie_weights()`` does that (124,439,808
    parameters then, with ``qkv_bias=True``).
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = LayerNorm(cfg.emb_dim)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        # Training only: recompute each block's activations in the backward pass instead of keeping them.
        self.gradient_checkpointing = False

    def tie_weights(self) -> None:
        """Make the output head share the token embedding's tensor (GPT-2's weight tying)."""
        self.out_head.weight = self.tok_emb.weight

    @property
    def weights_tied(self) -> bool:
        """Whether the output head is the token embedding's tensor (not a copy of its values)."""
        return self.out_head.weight is self.tok_emb.weight

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache for up to ``max_len`` tokens (default: the context length)."""
        weight = self.tok_emb.weight
        return KVCache(
            self.cfg.n_layers,
            batch_size,
            self.cfg.n_heads,
            max_len or self.cfg.context_length,
            self.cfg.emb_dim // self.cfg.n_heads,
            device=weight.device,
            dtype=weight.dtype,
        )

    def check_input(self, in_idx: torch.Tensor, past: int = 0) -> None:
        """Raise a clear error for inputs the embeddings cannot take."""
        if in_idx.dim() != 2:
            raise ValueError(f"expected token ids of shape [batch, tokens], found shape {list(in_idx.shape)}; "
                             "add a batch dimension with ids.unsqueeze(0)")
        t = in_idx.shape[1]
        if past + t > self.cfg.context_length:
            raise ValueError(
                f"input of {past + t} tokens is longer than the context length {self.cfg.context_length}; "
                f"keep only the last {self.cfg.context_length} tokens, e.g. ids[:, -{self.cfg.context_length}:]"
            )
        if in_idx.numel() and (in_idx.min() < 0 or in_idx.max() >= self.cfg.vocab_size):
            raise ValueError(
                f"token ids must lie in [0, {self.cfg.vocab_size - 1}], found ids from {int(in_idx.min())} "
                f"to {int(in_idx.max())}; was the text encoded with another tokenizer?"
            )

    def embed(self, in_idx: torch.Tensor, past: int = 0) -> torch.Tensor:
        """Token plus position embeddings, after dropout: ``[B, T]`` -> ``[B, T, D]``."""
        self.check_input(in_idx, past)
        return self.embed_vectors(self.tok_emb(in_idx), past)

    def embed_vectors(self, vectors: torch.Tensor, past: int = 0) -> torch.Tensor:
        """Position embeddings added to input vectors ``[B, T, D]`` that follow ``past`` tokens, then dropout.

        ``embed`` passes the token embeddings; prompt tuning passes its soft prompt
        before them. The caller checks that ``past + T`` fits the context.
        """
        positions = torch.arange(past, past + vectors.shape[1], device=vectors.device)
        return self.drop_emb(vectors + self.pos_emb(positions))

    def forward(self, in_idx: torch.Tensor, cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits ``[B, T, V]`` for token ids ``[B, T]`` (``[B, 1, V]`` with ``last_only``).

        With a ``cache``, ``in_idx`` holds only the new tokens: they are placed after
        the ``cache.length`` cached ones, and their keys and values are added to it.
        ``last_only`` applies the output head to the last position alone: generation
        needs nothing else, and the head (``D x V``) is the largest matrix of the model.
        """
        past = cache.length if cache is not None else 0
        return self.forward_embedded(self.embed(in_idx, past), cache, last_only)

    def forward_embedded(self, x: torch.Tensor, cache: KVCache | None = None, last_only: bool = False,
                         output_from: int = 0) -> torch.Tensor:
        """The blocks, final norm and head on embedded inputs ``[B, T, D]`` (from ``embed``): ``[B, T, V]``.

        ``output_from`` applies the norm and head from that position on only (``[B, T - output_from, V]``):
        prompt tuning drops its virtual tokens' outputs this way.
        """
        # Gradient checkpointing keeps only each block's input: memory per block drops from its activations
        # (~34 x B x T x D numbers) to B x T x D, for one more forward pass of the blocks in backward.
        checkpointing = self.gradient_checkpointing and cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.trf_blocks):
            if checkpointing:  # the same dropout masks when recomputed (preserve_rng_state, the default)
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, cache=cache, layer=i)
        if cache is not None:
            cache.length += x.shape[1]
        x = x[:, -1:, :] if last_only else x[:, output_from:, :]
        return self.out_head(self.final_norm(x))


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters; a tensor shared by two modules (a tied head) is counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """``with evaluating(model): ...`` runs in eval mode (no dropout) without gradients,
    then puts back the mode ``model`` had (training or not), even after an error."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
