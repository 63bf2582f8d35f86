"""Prompt tuning and prefix tuning: trainable virtual tokens in front of every input, the model frozen.

(P-tuning, a soft prompt made by a small encoder, reuses all of this: ``p_tuning.py``.)

Two ways to steer a frozen GPT with a few thousand numbers instead of new weights:

- Prompt tuning (Lester et al., 2021): ``n`` trainable vectors ``[n, D]`` (a *soft
  prompt*) are placed before the token embeddings of every input. They pass through
  every block like real tokens, so only the input changes.
- Prefix tuning (Li & Liang, 2021): ``n`` trainable keys and values at *every* layer,
  ``L x 2 x [n, D]``. Every real token attends to them as if ``n`` earlier tokens had
  been seen: a learned prefix is a KV cache that was not computed from tokens, so it
  goes into the model's own ``KVCache`` and the model's one attention path does the
  rest. Optionally (the paper's reparameterisation) the prefix comes out of a small
  MLP, ``[n, D] -> hidden -> tanh -> [n, L*2*D]``, which trains more stably.

Both wrap a ``GPTModel`` (``PromptTunedGPT(base, SoftPrompt(...))``): the wrapper's
``forward(ids)`` gives logits ``[B, T, V]`` for the real tokens only, aligned with
``ids`` like the base's, so losses, accuracies and the classifier's last-token choice
work unchanged. Files and the ``peft`` export live in ``formats/prompt_tuning_io.py``.

Positions, as ``peft`` places them on ``transformers``' GPT-2 (checked in the tests):
a soft prompt takes positions ``0..n-1`` and the text ``n..n+T-1``; with a prefix the
text also starts at position ``n``. Either way ``n + T`` must fit the context length.

Shapes: ``B`` batch, ``T`` tokens, ``n`` virtual tokens, ``D`` width, ``L`` layers,
``H`` heads, ``hd = D / H``.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn

from .lora import inject_adapter, mark_trainable, saved_modules
from .model import GPTModel

PROMPT_METHODS = ("prompt-tuning", "prefix-tuning", "p-tuning")
DEFAULT_INIT_TEXT = "Classify if the message is spam or not spam.\n"


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_num_virtual_tokens(num_virtual_tokens) -> None:
    """Raise ``ValueError`` unless ``num_virtual_tokens`` is a positive integer (before the model is known;
    ``check_virtual_tokens`` checks the room it leaves in a context)."""
    if not _is_positive_int(num_virtual_tokens):
        raise ValueError(f"the number of virtual tokens must be a positive integer (e.g. 20), "
                         f"found {num_virtual_tokens!r}")


def check_virtual_tokens(num_virtual_tokens, context_length: int, longest_input: int = 1) -> None:
    """Raise ``ValueError`` unless ``num_virtual_tokens`` is a positive integer leaving room for
    ``longest_input`` real tokens in a context of ``context_length``."""
    n = num_virtual_tokens
    check_num_virtual_tokens(n)
    if n + longest_input > context_length:
        tokens = "1 token" if longest_input == 1 else f"{longest_input} tokens"
        raise ValueError(f"{n} virtual tokens + {tokens} of input exceed the context length "
                         f"{context_length}; use at most {context_length - longest_input} virtual tokens")


def check_prefix_hidden(hidden) -> None:
    """Raise ``ValueError`` unless ``hidden`` (the prefix MLP's width) is None (no MLP) or a positive integer."""
    if hidden is not None and not _is_positive_int(hidden):
        raise ValueError(f"the prefix MLP's hidden width must be a positive integer (e.g. 512), found {hidden!r}")


def init_token_ids(text: str, tokenizer, num_virtual_tokens: int) -> list[int]:
    """The ``num_virtual_tokens`` token ids a soft prompt starts from: ``text`` repeated or cut to length.

    As ``peft``'s ``prompt_tuning_init="TEXT"``. Empty text is a ``ValueError``; a text
    longer than ``num_virtual_tokens`` tokens is cut, with a warning that says so.
    """
    ids = tokenizer.encode(text) if text else []
    if not ids:
        raise ValueError("the prompt's init text is empty; pass a sentence describing the task "
                         f"(e.g. {DEFAULT_INIT_TEXT!r}) or leave it out for random vocabulary rows")
    if len(ids) > num_virtual_tokens:
        warnings.warn(f"the init text has {len(ids)} tokens; only its first {num_virtual_tokens} start the "
                      "soft prompt (pass more virtual tokens to keep it all)", stacklevel=2)
    repeats = -(-num_virtual_tokens // len(ids))  # ceil
    return (ids * repeats)[:num_virtual_tokens]


# ----------------------------------------------------------------------------- the maths

class SoftPrompt(nn.Module):
    """``n`` trainable vectors ``weight [n, D]``; ``forward(B)`` gives them for a batch, ``[B, n, D]``."""

    def __init__(self, initial: torch.Tensor):
        super().__init__()
        if initial.dim() != 2:
            raise ValueError(f"a soft prompt is a matrix [virtual tokens, width], found shape {list(initial.shape)}")
        self.weight = nn.Parameter(initial.detach().clone())

    num_virtual_tokens = property(lambda self: self.weight.shape[0])

    def vectors(self) -> torch.Tensor:
        """The soft prompt ``[n, D]`` itself (for P-tuning's encoder: its output)."""
        return self.weight

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.weight.unsqueeze(0).expand(batch_size, -1, -1)


class PrefixEncoder(nn.Module):
    """Keys and values of ``n`` virtual tokens at every layer.

    Without ``hidden`` the prefix itself trains: ``embedding [n, L*2*D]``. With
    ``hidden`` (the paper's reparameterisation) ``embedding [n, D]`` goes through
    ``Linear(D, hidden) -> tanh -> Linear(hidden, L*2*D)``, and both train. The flat
    row of a virtual token is laid out as ``peft`` does: layer, then key/value, then
    head, then ``hd``.
    """

    def __init__(self, num_virtual_tokens: int, n_layers: int, n_heads: int, emb_dim: int,
                 hidden: int | None = None, initial: torch.Tensor | None = None):
        super().__init__()
        self.n_layers, self.n_heads, self.emb_dim, self.hidden = n_layers, n_heads, emb_dim, hidden
        width = emb_dim if hidden else n_layers * 2 * emb_dim
        if initial is not None and tuple(initial.shape) != (num_virtual_tokens, width):
            raise ValueError(f"initial prefix: expected shape {(num_virtual_tokens, width)}, "
                             f"found {tuple(initial.shape)}")
        start = initial.detach().clone() if initial is not None else torch.randn(num_virtual_tokens, width)
        self.embedding = nn.Parameter(start)
        self.transform = nn.Sequential(nn.Linear(emb_dim, hidden), nn.Tanh(),
                                       nn.Linear(hidden, n_layers * 2 * emb_dim)) if hidden else None

    num_virtual_tokens = property(lambda self: self.embedding.shape[0])

    def flat(self) -> torch.Tensor:
        """The whole prefix, ``[n, L*2*D]`` (what ``peft`` saves as ``prompt_embeddings``)."""
        return self.transform(self.embedding) if self.transform is not None else self.embedding

    def key_values(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, ``(keys, values)`` ``[B, H, n, hd]`` for a batch (the same for every row)."""
        n, hd = self.num_virtual_tokens, self.emb_dim // self.n_heads
        per_layer = self.flat().view(n, self.n_layers, 2, self.n_heads, hd).permute(1, 2, 3, 0, 4)  # [L,2,H,n,hd]
        return [(layer[0].expand(batch_size, -1, -1, -1), layer[1].expand(batch_size, -1, -1, -1))
                for layer in per_layer]


# ----------------------------------------------------------------------------- the wrapped models

class VirtualTokenModel(nn.Module):
    """A frozen ``GPTModel`` (``.base``) steered by virtual tokens (``.prompt``); ``[B, T] -> [B, T, V]``.

    ``cfg`` is the base's with the context length reduced by ``n`` (the room left for
    real tokens), and ``out_head`` the base's head, so code written for a ``GPTModel``
    (classification, ``generate(..., use_cache=False)``) runs on it.
    """

    method = ""

    def __init__(self, base: GPTModel, prompt: nn.Module):
        super().__init__()
        self.base, self.prompt = base, prompt
        check_virtual_tokens(prompt.num_virtual_tokens, base.cfg.context_length)

    num_virtual_tokens = property(lambda self: self.prompt.num_virtual_tokens)
    out_head = property(lambda self: self.base.out_head)

    @property
    def cfg(self):
        return dataclasses.replace(self.base.cfg, context_length=self.base.cfg.context_length - self.num_virtual_tokens)

    def check_input(self, in_idx: torch.Tensor) -> None:
        """Raise a clear error for ids ``[B, T]`` that do not fit after the ``n`` virtual tokens (or that
        the base's embeddings cannot take)."""
        n, context = self.num_virtual_tokens, self.base.cfg.context_length
        if in_idx.dim() == 2 and in_idx.shape[1] > context - n:
            room = context - n
            raise ValueError(f"input of {in_idx.shape[1]} tokens does not fit after the {n} virtual tokens in the "
                             f"context length {context}; keep only the last {room} tokens, e.g. ids[:, -{room}:]")
        self.base.check_input(in_idx, past=n)

    def new_cache(self, *args, **kwargs):
        raise NotImplementedError(f"generation with a KV cache is not supported for {self.method}: the "
                                  "virtual tokens would have to stay when the cache slides; use "
                                  "generate(..., use_cache=False)")


class PromptTunedGPT(VirtualTokenModel):
    """Prompt tuning: the soft prompt ``[n, D]`` goes before the token embeddings of every row.

    ``forward(ids [B, T])`` embeds ``[prompt; tokens]`` at positions ``0..n+T-1`` (as
    ``peft`` does), runs the blocks, and applies the final norm and head to the real
    tokens only: logits ``[B, T, V]``.
    """

    method = "prompt-tuning"

    def forward(self, in_idx: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        base, n = self.base, self.num_virtual_tokens
        self.check_input(in_idx)
        vectors = torch.cat([self.prompt(in_idx.shape[0]), base.tok_emb(in_idx)], dim=1)  # [B, n+T, D]
        return base.forward_embedded(base.embed_vectors(vectors), last_only=last_only, output_from=n)


class PrefixTunedGPT(VirtualTokenModel):
    """Prefix tuning: every layer's attention sees ``n`` learned keys and values before the text.

    ``forward(ids [B, T])`` fills a fresh ``KVCache`` with the prefix (length ``n``) and
    runs the base on it, so the text sits at positions ``n..n+T-1`` and attends to the
    prefix through the ordinary cached attention: logits ``[B, T, V]``.
    """

    method = "prefix-tuning"

    def prefix_cache(self, batch_size: int, room: int):
        """A ``KVCache`` holding the prefix (``length == n``) with room for ``room`` more tokens."""
        n = self.num_virtual_tokens
        cache = self.base.new_cache(batch_size, n + room)
        for layer, (keys, values) in enumerate(self.prompt.key_values(batch_size)):
            cache.update(layer, keys.to(cache.keys[layer].dtype), values.to(cache.keys[layer].dtype))
        cache.length = n
        return cache

    def forward(self, in_idx: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        self.check_input(in_idx)
        return self.base(in_idx, cache=self.prefix_cache(in_idx.shape[0], in_idx.shape[1]), last_only=last_only)


# ----------------------------------------------------------------------------- injection

def freeze_base(base: GPTModel, modules_to_save) -> None:
    """Freeze ``base``; each of ``modules_to_save`` (e.g. a new classification head) gets a trainable
    copy, as LoRA's ``modules_to_save`` (the frozen original keeps the base fingerprint meaningful)."""
    inject_adapter(base, "default", {}, list(modules_to_save or ()))
    mark_trainable(base, "default")
    for module in saved_modules(base).values():
        module.active_adapter = "default"


def apply_prompt_tuning(base: GPTModel, num_virtual_tokens: int, init_ids: list[int] | None = None,
                        modules_to_save=None) -> PromptTunedGPT:
    """Freeze ``base`` and return it wrapped with a trainable soft prompt of ``num_virtual_tokens``.

    The prompt starts as the token embeddings of ``init_ids`` (``init_token_ids``: a
    task description), or of ``n`` random vocabulary ids drawn from PyTorch's global
    generator. ``modules_to_save`` (e.g. ``["out_head"]``) also train, in full.
    """
    check_virtual_tokens(num_virtual_tokens, base.cfg.context_length)
    if init_ids is None:
        init_ids = torch.randint(base.cfg.vocab_size, (num_virtual_tokens,), device="cpu").tolist()
    if len(init_ids) != num_virtual_tokens:
        raise ValueError(f"expected {num_virtual_tokens} init token ids, found {len(init_ids)}; see init_token_ids")
    with torch.no_grad():
        initial = base.tok_emb(torch.tensor(init_ids, device=base.tok_emb.weight.device))
    freeze_base(base, modules_to_save)
    return PromptTunedGPT(base, SoftPrompt(initial))


def apply_prefix_tuning(base: GPTModel, num_virtual_tokens: int, hidden: int | None = None,
                        init_ids: list[int] | None = None, modules_to_save=None) -> PrefixTunedGPT:
    """Freeze ``base`` and return it wrapped with a trainable prefix of ``num_virtual_tokens`` per layer.

    ``hidden`` adds the reparameterisation MLP of that width. Without it, ``init_ids``
    start the prefix as the keys and values the frozen model computes for those tokens
    (Li & Liang found real activations a better start than random ones); otherwise the
    prefix (or the MLP's input) starts as standard normal draws.
    """
    cfg = base.cfg
    check_virtual_tokens(num_virtual_tokens, cfg.context_length)
    check_prefix_hidden(hidden)
    initial = None
    if init_ids is not None and hidden is None:
        initial = activations_as_prefix(base, init_ids)
    prefix = PrefixEncoder(num_virtual_tokens, cfg.n_layers, cfg.n_heads, cfg.emb_dim, hidden, initial)
    prefix.to(base.tok_emb.weight.device)
    freeze_base(base, modules_to_save)
    return PrefixTunedGPT(base, prefix)


def activations_as_prefix(base: GPTModel, token_ids: list[int]) -> torch.Tensor:
    """The keys and values ``base`` computes for ``token_ids`` at every layer, as a flat prefix ``[n, L*2*D]``."""
    from .model import evaluating

    cfg, n = base.cfg, len(token_ids)
    with evaluating(base):
        cache = base.new_cache(1, n)
        base(torch.tensor([token_ids], device=base.tok_emb.weight.device), cache=cache)
    keys = torch.stack([k[0, :, :n] for k in cache.keys])  # [L, H, n, hd]
    values = torch.stack([v[0, :, :n] for v in cache.values])
    return torch.stack([keys, values], dim=1).permute(3, 0, 1, 2, 4).reshape(n, cfg.n_layers * 2 * cfg.emb_dim)


# ----------------------------------------------------------------------------- as a fine-tuning method

# The options of `--method prompt-tuning` / `prefix-tuning` / `p-tuning` (hidden: the prefix MLP's or the
# prompt encoder's width; encoder: P-tuning's "mlp" (the default) or "lstm").
PROMPT_DEFAULTS = dict(num_virtual_tokens=20, init_text=DEFAULT_INIT_TEXT, hidden=None, encoder=None)


def prompt_method_options(method: str, method_options: dict | None) -> dict:
    """``PROMPT_DEFAULTS`` updated with ``method_options``, checked (``ValueError`` naming the bad one).

    ``init_text=None`` starts from random vocabulary rows (prompt) or random draws (prefix).
    """
    unknown = sorted(set(method_options or {}) - set(PROMPT_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown {method} option(s) {unknown}; expected some of {', '.join(PROMPT_DEFAULTS)}")
    options = {**PROMPT_DEFAULTS, **(method_options or {})}
    check_num_virtual_tokens(options["num_virtual_tokens"])  # the room in the context: once the model is known
    text = options["init_text"]
    if text is not None and (not isinstance(text, str) or not text.strip()):
        raise ValueError(f"the prompt's init text must be a non-empty sentence describing the task, found {text!r}; "
                         "leave it out for the default, or ask for a random start")
    hidden = options["hidden"]
    if hidden is not None and method == "prompt-tuning":
        raise ValueError("a hidden width (the reparameterisation MLP) belongs to prefix-tuning (or, as the prompt "
                         "encoder's, to p-tuning), not prompt-tuning")
    check_prefix_hidden(hidden)
    if options["encoder"] is not None and method != "p-tuning":
        raise ValueError(f"a prompt encoder (mlp or lstm) belongs to p-tuning, not {method}")
    if method == "p-tuning":
        from .p_tuning import check_encoder

        options["encoder"] = options["encoder"] or "mlp"
        check_encoder(options["encoder"], hidden)
    return options


def apply_virtual_tokens(base: GPTModel, method: str, options: dict, modules_to_save=None) -> VirtualTokenModel:
    """``apply_prompt_tuning``, ``apply_prefix_tuning`` or ``p_tuning.apply_p_tuning`` with checked ``options``
    (``prompt_method_options``).

    The init text is encoded with GPT-2's tokenizer and repeated or cut to the number of
    virtual tokens. For a prefix with its MLP, and for P-tuning's encoder, the text starts
    the input vectors.
    """
    from .generation import get_tokenizer

    n, text, hidden = options["num_virtual_tokens"], options["init_text"], options["hidden"]
    init_ids = init_token_ids(text, get_tokenizer(), n) if text is not None else None
    if method == "prompt-tuning":
        return apply_prompt_tuning(base, n, init_ids, modules_to_save)
    if method == "p-tuning":
        from .p_tuning import apply_p_tuning  # p_tuning builds on this module

        return apply_p_tuning(base, n, options["encoder"], hidden, init_ids, modules_to_save)
    model = apply_prefix_tuning(base, n, hidden, init_ids, modules_to_save)
    if hidden is not None and init_ids is not None:
        with torch.no_grad():
            model.prompt.embedding.copy_(base.tok_emb(torch.tensor(init_ids, device=base.tok_emb.weight.device)))
    return model
