"""One epoch of the spam training set with the book's last-block recipe, four ways.

Plain loop (every row padded to 120 tokens, all 12 blocks run at each step),
frozen-prefix cache (the 11 frozen blocks run once per message, then only the
last block trains), dynamic padding with length bucketing (each batch padded to
its longest message), and both. Returns ``(tables, targets)`` as ``bench_model``'s
sections do.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from bench_model import gpt2_small
from common import SHARED, PeakRSS

from gptlora.classifier import prepare_for_classification, train_classifier
from gptlora.generation import get_tokenizer
from gptlora.recipes.prefix_cache import cache_frozen_prefix
from gptlora.recipes.method_comparison import first_messages
from gptlora.spam import create_dataloaders, prepare_spam_data

VARIANTS = {  # name: (dynamic padding with length bucketing, frozen-prefix cache)
    "plain loop (book: 120-token rows)": (False, False),
    "frozen-prefix cache": (False, True),
    "dynamic padding, bucketed": (True, False),
    "dynamic padding, bucketed + cache": (True, True),
}


def spam_splits(work_dir: Path, messages: int | None) -> Path:
    """The book's split in ``work_dir`` (from ``$GPTLORA_SPAM_SOURCE`` or ``../shared``); with ``messages``,
    only the first ``messages`` rows of each split (for a quick run)."""
    source = os.environ.get("GPTLORA_SPAM_SOURCE") or SHARED / "data/sms_spam_collection/SMSSpamCollection"
    prepare_spam_data(work_dir / "full", source=source)
    if messages is None:
        return work_dir / "full"
    return first_messages(work_dir / "full", work_dir / f"first-{messages}", messages)


def one_epoch(model, initial: dict, data_dir: Path, tokenizer, dynamic: bool, cache: bool) -> dict:
    """Reset the trained part to ``initial``, then time one epoch: ``{"build", "epoch", "tokens", "memory"}``.

    The epoch is :func:`train_classifier` with the fewest evaluations it allows
    (``eval_iter=1``: one batch of each loader at the first step and at the end).
    ``tokens`` counts the padded token positions of the training steps; ``memory``
    is the peak rise of resident memory (the cache included), in bytes.
    """
    model.load_state_dict(initial, strict=False)
    torch.manual_seed(123)
    loaders = create_dataloaders(data_dir, tokenizer, dynamic_padding=dynamic, bucket_by_length=dynamic)[:2]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5, weight_decay=0.1,
                                  foreach=True)
    with PeakRSS() as memory:
        start = time.perf_counter()
        trained = model
        if cache:
            trained, loaders = cache_frozen_prefix(model, loaders)
        built = time.perf_counter()
        tokens = []
        hook = trained.register_forward_pre_hook(
            lambda module, args: tokens.append(args[0].shape[0] * args[0].shape[1]) if module.training else None)
        train_classifier(trained, loaders[0], loaders[1], optimizer, "cpu", num_epochs=1, eval_freq=10**9,
                         eval_iter=1, progress=False)
        hook.remove()
        done = time.perf_counter()
    return dict(build=built - start, epoch=done - built, tokens=sum(tokens), memory=memory.rise)


def epoch_section(work_dir: Path, messages: int | None = None):
    """The four variants on random-weight gpt2-small (last-block), one epoch each."""
    data_dir = spam_splits(work_dir, messages)
    tokenizer = get_tokenizer()
    torch.manual_seed(123)
    model = prepare_for_classification(gpt2_small(), "last-block")
    initial = {name: value.clone() for name, value in model.state_dict().items()
               if name.startswith(("trf_blocks.11.", "final_norm.", "out_head."))}
    results = {name: one_epoch(model, initial, data_dir, tokenizer, *options) for name, options in VARIANTS.items()}

    plain = results["plain loop (book: 120-token rows)"]
    rows = []
    for name, r in results.items():
        rows.append([name, f"{r['build']:.1f}" if r["build"] > 0.01 else "-", f"{r['epoch']:.1f}",
                     f"{plain['epoch'] / r['epoch']:.2f}x", f"{plain['epoch'] / (r['build'] + r['epoch']):.2f}x",
                     f"{r['tokens']:,} ({r['tokens'] / plain['tokens']:.0%})", f"{r['memory'] / 2**20:.0f}"])
    cached = results["frozen-prefix cache"]
    dynamic = results["dynamic padding, bucketed"]
    cache_gain = plain["epoch"] / cached["epoch"]
    token_share, dynamic_gain = dynamic["tokens"] / plain["tokens"], plain["epoch"] / dynamic["epoch"]
    targets = [
        ("last-block epoch with prefix cache vs plain (cache built)", f"{cache_gain:.2f}x", ">= 3x", cache_gain >= 3),
        ("dynamic padding: share of the book's padded tokens", f"{token_share:.0%}", "<= 30%", token_share <= 0.30),
        ("dynamic padding: epoch vs plain", f"{dynamic_gain:.2f}x", ">= 2.5x", dynamic_gain >= 2.5),
    ]
    five = 5 * plain["epoch"] / (cached["build"] + 5 * cached["epoch"])
    count = "1,045" if messages is None else f"the first {messages}"
    title = (f"One epoch of the spam training set ({count} messages, batch 8), last-block, random gpt2-small; "
             f"5 epochs with the cache (built once) would be {five:.1f}x faster than plain")
    header = ["variant", "cache build s (train + val)", "epoch s", "epoch speed-up", "build + epoch speed-up",
              "padded tokens", "peak RSS rise MiB"]
    return [(title, header, rows)], targets

