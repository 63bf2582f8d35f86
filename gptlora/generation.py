"""From text to token ids and back, and autoregressive generation with a KV cache.

Shapes: ``B`` batch size, ``T`` tokens, ``V`` vocabulary size.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .model import GPTModel

END_OF_TEXT = "<|endoftext|>"
END_OF_TEXT_ID = 50256


def get_tokenizer():
    """GPT-2's byte-pair encoding from tiktoken.

    tiktoken downloads its files once; offline, point ``TIKTOKEN_CACHE_DIR`` at a
    folder that holds them (see docs/offline.md).
    """
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as error:  # tiktoken raises requests/URL errors when offline
        # An OSError: the user's to fix (a cache folder or network access), so the command says it in one line.
        raise OSError(
            "could not load tiktoken's 'gpt2' encoding; it is fetched from the internet on first use. "
            "Offline, set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached gpt2 files "
            f"(in this project: ../shared/tiktoken-cache). Cause: {error}"
        ) from error


def text_to_token_ids(text: str, tokenizer) -> torch.Tensor:
    """Encode ``text`` into ids of shape ``[1, T]``; ``<|endoftext|>`` is allowed."""
    ids = tokenizer.encode(text, allowed_special={END_OF_TEXT})
    return torch.tensor(ids, dtype=torch.long).unsqueeze(0)


def token_ids_to_text(token_ids: torch.Tensor, tokenizer) -> str:
    """Decode ids of shape ``[1, T]`` or ``[T]`` back into text."""
    if token_ids.dim() == 2:
        if token_ids.shape[0] != 1:
            raise ValueError(f"expected one sequence ([1, T] or [T]), found shape {list(token_ids.shape)}; "
                             "decode each row separately")
        token_ids = token_ids[0]
    return tokenizer.decode(token_ids.tolist())


def next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None) -> torch.Tensor:
    """Choose the next token from last-position logits ``[B, V]``; returns ids ``[B, 1]``.

    ``top_k`` keeps the k largest logits; ``temperature`` 0 is greedy (argmax),
    above 0 it divides the logits before sampling from their softmax, so values
    below 1 sharpen and above 1 flatten the distribution.
    """
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, found {top_k}")
        kth_largest = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), found {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    scaled = logits / temperature
    if (torch.isinf(scaled) & torch.isfinite(logits)).any():  # a tiny temperature overflowed: inf - inf = nan
        # The same distribution, shifted so that the largest logit is 0 before dividing: the others
        # then overflow only to -inf, probability 0, and sampling tends to greedy as it should.
        scaled = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    probs = torch.softmax(scaled, dim=-1)
    return torch.multinomial(probs, num_samples=1)


@torch.inference_mode()
def generate(
    model: GPTModel,
    idx: torch.Tensor,
    max_new_tokens: int,
    context_size: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """Extend the token ids ``idx`` (``[B, T]``) by up to ``max_new_tokens``; returns ``[B, T + n]``.

    Sampling draws from PyTorch's global generator: call ``torch.manual_seed`` first
    for a reproducible result. With ``eos_id``, a row's text ends at its first
    ``eos_id``: a row that finishes early is padded with ``eos_id`` from there on, and
    generation stops once every row has finished, without appending that last step
    (so with one row, as in the book, the end-of-text token is never appended).

    With ``use_cache`` each step feeds only the newest token and reuses the keys and
    values of the earlier ones. The model sees at most ``context_size`` tokens
    (default: its context length). Once the text is longer, the window slides and,
    because GPT-2's position embeddings are absolute, every token in it moves to a
    new position: cached keys no longer apply, so the window is recomputed from
    scratch. Output is token-for-token the same as without the cache. ``progress``
    shows a bar of the tokens generated (on stderr; the ``gptlora generate`` command uses it).
    """
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(f"expected a prompt of token ids of shape [batch, tokens] with at least one token, "
                         f"found shape {list(idx.shape)}; to start from nothing, use [[{END_OF_TEXT_ID}]] "
                         "(<|endoftext|>), as GPT-2 was trained to")
    context_size = min(context_size or model.cfg.context_length, model.cfg.context_length)
    finished = torch.zeros(idx.shape[0], 1, dtype=torch.bool, device=idx.device)
    cache = model.new_cache(idx.shape[0], context_size) if use_cache else None
    for _ in tqdm(range(max_new_tokens), desc="generating", unit="token", disable=not progress, leave=False):
        if not use_cache:
            logits = model(idx[:, -context_size:], last_only=True)
        elif 0 < cache.length < context_size:
            logits = model(idx[:, -1:], cache=cache, last_only=True)
        else:  # first step, or the window slid: refill the cache with the whole window
            cache.reset()
            logits = model(idx[:, -context_size:], cache=cache, last_only=True)
        idx_next = next_token(logits[:, -1, :], temperature, top_k)
        if eos_id is not None:
            now_finished = finished | (idx_next == eos_id)
            if now_finished.all():
                break
            idx_next = idx_next.masked_fill(finished, eos_id)
            finished = now_finished
        idx = torch.cat([idx, idx_next], dim=1)
    return idx


def generate_text(model: GPTModel, prompt: str, tokenizer, max_new_tokens: int, **kwargs) -> str:
    """Convenience wrapper: encode ``prompt``, call :func:`generate`, decode the result."""
    device = next(model.parameters()).device
    ids = text_to_token_ids(prompt, tokenizer).to(device)
    return token_ids_to_text(generate(model, ids, max_new_tokens, **kwargs), tokenizer)
