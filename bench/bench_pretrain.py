"""Pretraining speed (book, chapter 5): one training step of GPT_CONFIG_124M, and the whole 10-epoch run.

The step is the book's: a batch of 2 windows of 256 tokens, forward, next-token
cross-entropy over all 512 positions, backward, AdamW (lr 4e-4, weight decay 0.1).
Ours is ``GPTModel`` (head untied, no qkv bias, dropout 0.1); the reference is a
``transformers.GPT2LMHeadModel`` of the same shape (``tie_word_embeddings=False``,
dropout 0.1; it always has qkv biases, 2,304 parameters per block more), both with
the same optimizer settings (foreach AdamW). The whole run is
``pretraining.train_model_simple`` on "The Verdict" as the book calls it.
Returns ``(tables, targets)`` as the other sections do.
"""

from __future__ import annotations

import contextlib
import io
import time

import torch
import torch.nn.functional as F

from common import SHARED, best_seconds

from gptlora.generation import get_tokenizer
from gptlora.model import GPTConfig, GPTModel
from gptlora.pretraining import train_model_simple
from gptlora.text_data import create_dataloader, read_text_file, split_text

BOOK_CONFIG = GPTConfig(context_length=256, drop_rate=0.1, qkv_bias=False)
ROWS, TOKENS = 2, 256


def lm_step(model, logits_of, inputs, targets):
    """``step()``: one optimizer step of next-token cross-entropy on ``inputs -> targets`` ([B, T] each)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1, foreach=True)
    model.train()

    def step():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits_of(inputs).flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()

    return step


def book_run_seconds(epochs: int) -> tuple[float, list[str]]:
    """Wall time of the book's run for ``epochs`` epochs (10: the book's), and the lines it printed."""
    text = read_text_file(SHARED / "data" / "the-verdict" / "the-verdict.txt")
    train_text, val_text = split_text(text, 0.90)
    tokenizer = get_tokenizer()
    torch.manual_seed(123)
    train = create_dataloader(train_text, 2, 256, 256, shuffle=True, drop_last=True, tokenizer=tokenizer)
    val = create_dataloader(val_text, 2, 256, 256, shuffle=False, drop_last=False, tokenizer=tokenizer)
    torch.manual_seed(123)
    model = GPTModel(BOOK_CONFIG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1, foreach=True)
    printed = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(printed):
        train_model_simple(model, train, val, optimizer, "cpu", epochs, 5, 5, "Every effort moves you", tokenizer)
    return time.perf_counter() - start, printed.getvalue().splitlines()


def pretrain_section(repeats: int, epochs: int):
    """The step, ours vs transformers, and the book's run of ``epochs`` epochs (0: skip it)."""
    import transformers

    from gptlora.formats.hf_layout import config_to_hf

    generator = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, 50257, (ROWS, TOKENS), generator=generator)
    targets = torch.randint(0, 50257, (ROWS, TOKENS), generator=generator)
    torch.manual_seed(123)
    ours = GPTModel(BOOK_CONFIG)
    hf_config = transformers.GPT2Config(**{**config_to_hf(GPTConfig(**{**BOOK_CONFIG.to_dict(), "qkv_bias": True})),
                                           "tie_word_embeddings": False, "resid_pdrop": 0.1, "embd_pdrop": 0.1,
                                           "attn_pdrop": 0.1})
    theirs = transformers.GPT2LMHeadModel(hf_config)
    seconds = best_seconds({"ours": lm_step(ours, ours, inputs, targets),
                            "theirs": lm_step(theirs, lambda ids: theirs(ids).logits, inputs, targets)},
                           repeats=repeats)
    del ours, theirs
    speedup = seconds["theirs"] / seconds["ours"]
    rows = [["transformers GPT2LMHeadModel (reference)", f"{seconds['theirs']:.2f}", "1.00x"],
            ["gptlora GPTModel", f"{seconds['ours']:.2f}", f"{speedup:.2f}x"]]
    targets_met = [("pretraining step (book config) vs transformers", f"{speedup:.2f}x", ">= 1.00x",
                    speedup >= 1.0)]
    tables = [(f"Pretraining step, GPT_CONFIG_124M, batch {ROWS} x {TOKENS}, forward + backward + AdamW",
               ["implementation", "s / step", "speed"], rows)]
    if epochs:
        run_seconds, printed = book_run_seconds(epochs)
        book = (SHARED / "data" / "the-verdict" / "book-ch05-training-log.txt").read_text().splitlines()
        same = sum(a == b for a, b in zip(printed, book))
        tables.append((f"The book's pretraining run on The Verdict, {epochs} epoch(s)",
                       ["what", "value"], [["wall time", f"{run_seconds:.0f} s"],
                                           ["printed lines equal to the book's", f"{same} of {len(printed)}"]]))
        targets_met.append((f"book run, {epochs} epochs", f"{run_seconds:.0f} s", "-", None))
    return tables, targets_met
