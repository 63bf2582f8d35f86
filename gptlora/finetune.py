"""The spam fine-tuning recipe end to end, and the run directories it writes.

``finetune_spam`` is chapter 6 of "Build a Large Language Model (From Scratch)" as
one call: data, head, method, training, accuracies, plots, and a run directory
that ``load_classifier`` (and ``gptlora classify --run``) reads back. The pieces
it combines live in ``spam`` (data), ``classifier`` (head, loss, loop, plots) and
``lora`` (adapters); this module only decides how they fit together.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .atomic import replace_atomically, write_json
from .classifier import (LABEL_NAMES, calc_accuracy_loader, plot_history, prepare_for_classification,
                         train_classifier)
from .model import GPTConfig, GPTModel, count_parameters
from .prefix_cache import cache_frozen_prefix
from .spam import create_dataloaders


def save_classifier(model: GPTModel, run_dir: str | Path, info: dict) -> Path:
    """Save ``classifier.safetensors`` (all weights) and ``classifier.json`` in ``run_dir``.

    ``info`` must hold ``method`` and ``max_length``; the model config and class
    count are added. The whole model is saved, not just what was trained: a run
    directory then classifies on its own, without the base weights and without
    trusting that they are unchanged. (LoRA saves only its adapters.)
    Each file is written under a temporary name and renamed into place.
    """
    from safetensors.torch import save_model

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with replace_atomically(run_dir / "classifier.safetensors") as tmp:
        save_model(model, str(tmp))  # save_model, unlike save_file, copes with tied (shared) tensors
    full_info = {**info, "config": model.cfg.to_dict(), "num_classes": model.out_head.out_features}
    write_json(full_info, run_dir / "classifier.json")
    return run_dir


def load_classifier(run_dir: str | Path, device="cpu") -> tuple[GPTModel, dict]:
    """The model saved by :func:`save_classifier` (in eval mode, on ``device``) and its info dict."""
    from safetensors.torch import load_model

    run_dir = Path(run_dir)
    info_path, weights_path = run_dir / "classifier.json", run_dir / "classifier.safetensors"
    for path in (info_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; is {run_dir} the --out directory of a `gptlora finetune` run?")
    info = json.loads(info_path.read_text())
    model = GPTModel(GPTConfig(**info["config"]))
    prepare_for_classification(model, info["method"], info["num_classes"], info.get("method_options"))
    load_model(model, str(weights_path), strict=True)
    return model.to(device).eval(), info


# --- the whole recipe ------------------------------------------------------------------

def finetune_spam(model: GPTModel, tokenizer, data_dir: str | Path, out_dir: str | Path, method: str = "last-block",
                  *, epochs: int = 5, lr: float = 5e-5, weight_decay: float = 0.1, batch_size: int = 8,
                  seed: int = 123, eval_freq: int = 50, eval_iter: int = 5, dynamic_padding: bool = False,
                  device="cpu", base_model: str | None = None, method_options: dict | None = None,
                  progress: bool = True, bucket_by_length: bool = False, cache_prefix: bool = False) -> dict:
    """Chapter 6 end to end: fine-tune ``model`` on the spam splits in ``data_dir``, save the run.

    Seeds as the book does (before the loaders, the new head and the optimizer),
    trains with AdamW, measures accuracy on the full train/validation/test
    splits and writes ``classifier.safetensors``, ``classifier.json``,
    ``metrics.json``, ``loss.png`` and ``accuracy.png`` to ``out_dir``.
    Returns the metrics dict (accuracies 0 to 1, losses, timing).

    Speed options (see ``prefix_cache`` and ``spam``): ``cache_prefix`` runs the
    frozen blocks once per message instead of at every step (``last-block`` only;
    same numbers up to rounding); ``bucket_by_length`` (with ``dynamic_padding``)
    batches messages of similar length together.
    """
    if cache_prefix and method != "last-block":
        raise ValueError(f"cache_prefix works only with method 'last-block' (frozen blocks below the trained "
                         f"one); {method!r} trains the lower blocks too, so their output changes at every step")
    torch.manual_seed(seed)
    loaders = create_dataloaders(data_dir, tokenizer, batch_size, dynamic_padding=dynamic_padding,
                                 bucket_by_length=bucket_by_length)
    max_length = loaders[0].dataset.max_length
    if max_length > model.cfg.context_length:
        raise ValueError(f"the longest training text has {max_length} tokens but the model's context length is "
                         f"{model.cfg.context_length}; use a model with a longer context")
    torch.manual_seed(seed)
    prepare_for_classification(model, method, len(LABEL_NAMES), method_options).to(device)
    torch.manual_seed(seed)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    # foreach: one batched update for all tensors (PyTorch's default on GPUs, not on CPUs, where it
    # makes AdamW about 2.5x faster for a small model; the arithmetic is the same).
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay, foreach=True)
    start = time.perf_counter()
    trained_model = model  # with cache_prefix: the model's last block, norm and head, fed cached states
    if cache_prefix:
        trained_model, loaders = cache_frozen_prefix(model, loaders)
    history = train_classifier(trained_model, loaders[0], loaders[1], optimizer, device, epochs, eval_freq,
                               eval_iter, progress=progress)
    seconds = time.perf_counter() - start
    accuracy = {split: calc_accuracy_loader(loader, trained_model, device)
                for split, loader in zip(("train", "validation", "test"), loaders)}
    info = dict(method=method, method_options=method_options, max_length=max_length,
                dynamic_padding=dynamic_padding, base_model=base_model, accuracy=accuracy)
    save_classifier(model, out_dir, info)
    metrics = dict(info, training_seconds=round(seconds, 1), epochs=epochs, lr=lr, weight_decay=weight_decay,
                   bucket_by_length=bucket_by_length, cache_prefix=cache_prefix,
                   batch_size=batch_size, seed=seed, trainable_parameters=count_parameters(model, trainable_only=True),
                   history=asdict(history))
    write_json(metrics, Path(out_dir) / "metrics.json")
    plot_history(history, out_dir)
    return metrics
