"""Generation with a fixed-shape decode step, compiled once (``gptlora generate --compile``).

The approach of PyTorch's ``gpt-fast``: at batch 1 a 124M model spends most of each token launching
~200 small GPU kernels, not computing. If every step has the same shapes, ``torch.compile`` with
``mode="reduce-overhead"`` records the step as a CUDA graph once and replays it with one launch. Shapes
stay the same when

- the KV cache has a fixed length (:class:`StaticKVCache`, ``[B, H, max_len, hd]`` per layer, zeros at
  first) and each step writes its token's keys and values at a position given as a *tensor*, and
- attention always reads the whole cache, with a mask that hides the positions not written yet.

The prompt goes through the same one-token step (a prompt of P tokens: P steps), so one graph serves all.
Masked positions get probability exactly 0, so the tokens are eager generation's (greedy: the same ids,
``tests/test_generation_compiled.py``); the sums run over more (zero) terms, so logits may differ in the
last float bits.
"""

from __future__ import annotations

import torch

from .generation import next_token
from .model import GPTModel, KVCache


class StaticKVCache(KVCache):
    """A :class:`model.KVCache` of fixed shape: ``update`` writes at :attr:`position` (a 0-dim long tensor)
    and returns the whole buffers; :meth:`attention_mask` hides the positions after it."""

    def __init__(self, model: GPTModel, batch_size: int, max_len: int):
        weight = model.tok_emb.weight
        super().__init__(model.cfg.n_layers, batch_size, model.cfg.n_heads, max_len,
                         model.cfg.emb_dim // model.cfg.n_heads, device=weight.device, dtype=weight.dtype)
        for buffer in (*self.keys, *self.values):
            buffer.zero_()  # never NaN: a masked position still enters the product as 0 x value
            if hasattr(torch, "_dynamo"):  # the same addresses at every step: what a CUDA graph needs
                torch._dynamo.mark_static_address(buffer)
        self.slots = torch.arange(max_len, device=weight.device)
        self.position = torch.zeros((), dtype=torch.long, device=weight.device)

    def attention_mask(self, t: int, device):
        return (self.slots <= self.position).view(1, -1), False  # [1, max_len]: the written positions

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write ``k, v`` (``[B, H, 1, hd]``) at :attr:`position`; all ``max_len`` keys and values."""
        self.keys[layer].index_copy_(2, self.position.view(1), k)
        self.values[layer].index_copy_(2, self.position.view(1), v)
        return self.keys[layer], self.values[layer]


def decode_step(model: GPTModel, cache: StaticKVCache, token: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, V]`` after token ids ``token`` ``[B, 1]`` at ``cache.position``, whose keys and values
    join the cache. The same shapes at every position: what is compiled."""
    x = model.tok_emb(token) + model.pos_emb(cache.position.view(1))
    for i, block in enumerate(model.trf_blocks):
        x = block(x, cache=cache, layer=i)
    return model.out_head(model.final_norm(x))[:, -1, :]


class CompiledGenerator:
    """``generate(model, idx, n)`` with a fixed-shape step, compiled once: ``CompiledGenerator(model, max_len)``.

    ``max_len``: prompt plus new tokens, at most the context length (no sliding window: the cache is fixed).
    ``compile=False`` runs the same step eagerly (what the tests compare). The model must be in eval mode.
    """

    def __init__(self, model: GPTModel, max_len: int, batch_size: int = 1, compile: bool = True):
        if max_len > model.cfg.context_length:
            raise ValueError(f"generate --compile keeps the whole text in a fixed cache: the prompt and the new "
                             f"tokens ({max_len}) must fit the context length {model.cfg.context_length}; "
                             "ask for fewer tokens")
        self.model, self.max_len = model, max_len
        self.cache = StaticKVCache(model, batch_size, max_len)
        step = lambda token: decode_step(model, self.cache, token)  # noqa: E731
        self.step = torch.compile(step, mode="reduce-overhead", fullgraph=True) if compile else step

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None) -> torch.Tensor:
        """``idx`` ``[B, T]`` extended by ``max_new_tokens`` (``generation.next_token`` picks each)."""
        if idx.shape[1] + max_new_tokens > self.max_len:
            raise ValueError(f"{idx.shape[1]} prompt tokens and {max_new_tokens} new ones do not fit the "
                             f"{self.max_len} positions of this generator")
        self.model.check_input(idx, max_new_tokens)
        tokens = [idx[:, i:i + 1] for i in range(idx.shape[1])]
        for position in range(idx.shape[1] + max_new_tokens - 1):
            self.cache.position.fill_(position)
            logits = self.step(tokens[position])
            if position + 1 >= idx.shape[1]:  # past the prompt: choose the next token
                tokens.append(next_token(logits.clone(), temperature, top_k))
        return torch.cat(tokens, dim=1)
