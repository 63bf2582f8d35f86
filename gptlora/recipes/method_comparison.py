"""Fine-tuning methods side by side on the spam task: what each trains, saves, costs and reaches.

``compare_methods`` runs ``finetune_spam`` once per entry of ``COMPARED`` (every method, and
DoRA as LoRA with ``use_dora``) on fresh copies of one
base and measures, for each: trainable parameters, the bytes its run directory needs
for the weights (the whole model, or the adapter / prompt alone), the time and the
peak resident-memory rise of one training step (batch ``[8, 120]``, forward +
backward + AdamW, best of a few), and the accuracies. ``trainable_on_meta`` counts
the trainable parameters of any GPT-2 size without allocating it.

On a base of random weights the accuracies say little about the methods: what a
soft prompt or a prefix can do depends on what the frozen model already knows.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from ..classifier import METHODS, calc_loss_batch, prepare_for_classification, split_batch
from .finetune import ADAPTER_DIR, finetune_spam
from ..infra.memory import PeakRSS
from ..model import GPTConfig, GPTModel, count_parameters
from ..prompt_tuning import PROMPT_METHODS
from ..spam import create_dataloaders, split_paths

# What is compared: a row name -> (method, method options). DoRA is LoRA's option, with LoRA's defaults.
COMPARED = {**{method: (method, None) for method in METHODS}, "dora": ("lora", {"use_dora": True})}
# Learning rates of the comparison: the method defaults, except full and last-block, whose 5e-5 suits
# pretrained weights; from random weights they need 1e-3 (the README's tiny runs).
COMPARISON_LR = {"full": 1e-3, "last-block": 1e-3}


def first_messages(data_dir, out_dir, messages: int) -> Path:
    """The first ``messages`` rows of each split in ``data_dir`` as parquet files in ``out_dir`` (a quick run)."""
    import pandas as pd

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, path in split_paths(data_dir).items():
        pd.read_parquet(path).head(messages).to_parquet(out_dir / f"{split}.parquet", index=False)
    return out_dir


def weights_bytes(run_dir: str | Path) -> int:
    """Bytes of the weight files a run directory needs: ``classifier.safetensors``, or ``adapter/`` whole."""
    run_dir = Path(run_dir)
    if (run_dir / ADAPTER_DIR).is_dir():
        return sum(path.stat().st_size for path in (run_dir / ADAPTER_DIR).iterdir())
    return (run_dir / "classifier.safetensors").stat().st_size


def time_training_step(model, batch, repeats: int = 3) -> tuple[float, int]:
    """``(seconds, bytes)``: the fastest of ``repeats`` AdamW training steps on ``batch`` (after one
    untimed), and the peak rise of resident memory over all of them (optimizer state included).

    The optimizer is the one ``finetune_spam`` trains with (AdamW on the trainable parameters,
    ``foreach=True``), so the step measured is the step trained; the learning rate does not change
    its cost. (Issue 11 lifts the training loop and its optimizer builder into ``training.py``:
    this should then call that builder.)"""
    inputs, labels, lengths = split_batch(batch, "cpu")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    model.train()
    times = []
    with PeakRSS() as memory:
        for _ in range(repeats + 1):
            start = time.perf_counter()
            optimizer.zero_grad()
            calc_loss_batch(inputs, labels, model, "cpu", lengths).backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
    return min(times[1:]), memory.rise


def compare_methods(make_base: Callable[[], GPTModel], data_dir, tokenizer, runs_dir, methods=tuple(COMPARED),
                    epochs: int = 3, seed: int = 123, lrs: dict | None = None, progress: bool = False) -> list[dict]:
    """Fine-tune a fresh ``make_base()`` with each of ``methods``, names of :data:`COMPARED` (run
    directories in ``runs_dir/NAME``).

    Returns one dict per name: ``method`` (the name), ``trainable``, ``saved_bytes``, ``step_seconds``,
    ``peak_memory_bytes``, ``lr``, ``train``/``validation``/``test`` accuracy (0 to 1).
    ``lrs`` maps names to learning rates (default :data:`COMPARISON_LR`; absent: the method's default).
    """
    lrs = {**COMPARISON_LR, **(lrs or {})}
    torch.manual_seed(seed)
    step_batch = next(iter(create_dataloaders(data_dir, tokenizer, batch_size=8)[0]))
    rows = []
    for name in methods:
        method, options = COMPARED[name]
        run_dir = Path(runs_dir) / name
        metrics = finetune_spam(make_base(), tokenizer, data_dir, run_dir, method, epochs=epochs, lr=lrs.get(name),
                                seed=seed, progress=progress, method_options=options)
        torch.manual_seed(seed)
        model = prepare_for_classification(make_base(), method, method_options=options)
        seconds, memory = time_training_step(model, step_batch)
        rows.append(dict(method=name, trainable=metrics["trainable_parameters"], saved_bytes=weights_bytes(run_dir),
                         step_seconds=seconds, peak_memory_bytes=memory, lr=metrics["lr"], **metrics["accuracy"]))
    return rows


def trainable_on_meta(name: str, preset: str = "gpt2-small") -> int:
    """Trainable parameters of ``name`` (of :data:`COMPARED`) on a GPT-2 size (released layout: q/k/v
    biases, tied head), built on the meta device: shapes only, nothing allocated."""
    method, options = COMPARED[name]
    with torch.device("meta"):
        model = GPTModel(GPTConfig.from_preset(preset, qkv_bias=True))
        model.tie_weights()
        # (a prompt's start does not change the count, and a prefix started from text would run the model)
        if method in PROMPT_METHODS:
            options = {**(options or {}), "init_text": None}
        model = prepare_for_classification(model, method, method_options=options)
    return count_parameters(model, trainable_only=True)
