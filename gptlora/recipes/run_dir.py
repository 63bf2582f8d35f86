"""What every run directory shares, for both recipes (``finetune`` and ``pretrain_run``).

- :func:`base_source`: how a run records the model it started from, so that a run which saves
  only an adapter can rebuild its base (a GPT-2 name, a checkpoint directory, or random weights
  under a seed; optionally quantized, optionally with a shorter context).
- :data:`RUN_FILES` and :func:`open_run_dir`: which files a run owns, and the check (and, with
  ``overwrite``, the clean-up) before a run starts in a directory.
- :func:`frozen_weights_sha256`: the fingerprint of what a checkpoint does not hold.
- :func:`peft_base_name`: the base an exported peft adapter names.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..infra.checkpoint import CHECKPOINT_NAME, read_checkpoint_values
from ..infra.tensor_hash import tensors_sha256
from ..model import canonical_preset
from ..pretrained import HUB_REPOS, save_hf

# Inside a LoRA, prompt- or prefix-tuning run directory: adapter_model.safetensors + adapter_config.json.
ADAPTER_DIR = "adapter"
# What a run writes in its directory, the checkpoint and the file that marks a finished run coming first:
# --overwrite removes them in this order. One list for both kinds of run (a spam classifier's files and a
# pretraining run's language_model.json and model.safetensors), so that no other run survives in it.
RUN_FILES = (CHECKPOINT_NAME, "classifier.json", "language_model.json", "classifier.safetensors",
             "model.safetensors", ADAPTER_DIR, "metrics.json", "loss.png", "accuracy.png")


def base_source(name_or_dir: str, models_dir: str | Path = "weights", random_init: bool = False, seed: int = 123,
                quantize: dict | None = None, context_length: int | None = None) -> dict:
    """How to rebuild a run's base (``finetune.load_base``, ``pretrain_run.load_base``): recorded in the run.

    Directories are stored as absolute paths, so the run loads from any working directory.
    ``quantize`` (QLoRA) holds ``qlora.quantize_base`` keywords, e.g. ``{"method": "nf4"}``;
    ``context_length`` shortens a random base's context (pretraining; None: the recipe's default).
    ``quantize`` and ``context_length`` are recorded only when given.
    """
    directory = Path(name_or_dir)
    source = dict(model=str(directory.resolve()) if directory.is_dir() else str(name_or_dir),
                  models_dir=str(Path(models_dir).resolve()), random_init=random_init, seed=seed)
    if quantize:
        source["quantize"] = dict(quantize)
    if context_length is not None:
        source["context_length"] = context_length
    return source


def preset_to_download(source: dict) -> str | None:
    """The GPT-2 preset a base source (:func:`base_source`) must download (canonical name), or None for a
    directory or random weights. An unknown name is a ValueError, before anything is downloaded."""
    from ..pretrained import preset_named

    if source["random_init"] or Path(source["model"]).is_dir():
        return None
    return preset_named(source["model"])


def download_base(source: dict) -> None:
    """Download the named GPT-2 a run will load, if any (``pretrained.download_gpt2``: verified, resumable)."""
    from ..pretrained import download_gpt2

    name = preset_to_download(source)
    if name is not None:
        download_gpt2(name, source["models_dir"])


def open_run_dir(out_dir: str | Path, resume: bool, overwrite: bool, removes_old_run: bool = True,
                 run_files: tuple[str, ...] = RUN_FILES) -> Path:
    """Check that ``out_dir`` may receive this run; with ``overwrite``, remove the earlier run's files.

    ``resume`` (which takes precedence) needs the checkpoint of an earlier run: its
    header is read here, so a missing, damaged or foreign file fails before any slow
    work. A fresh run needs a missing or empty directory, or ``overwrite``, which
    removes every file of ``run_files`` (:data:`RUN_FILES`): a new run that stops early must leave
    neither a checkpoint to be resumed nor a model to be loaded as its own.
    Other files are left alone. ``removes_old_run=False`` only checks (under
    ``torchrun``, on every process but the main one). Returns the checkpoint's path.
    """
    out_dir = Path(out_dir)
    path = out_dir / CHECKPOINT_NAME
    if resume:  # continues the run in the directory, so nothing is overwritten
        read_checkpoint_values(path)
        return path
    existing = sorted(entry.name for entry in out_dir.iterdir()) if out_dir.is_dir() else []
    if existing and not overwrite:
        raise FileExistsError(f"{out_dir} already holds files ({', '.join(existing[:5])}); pass --resume {out_dir} "
                              "to continue that run, --overwrite to replace it, or choose another --out")
    for name in run_files if removes_old_run else ():
        stale = out_dir / name
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale)
        else:
            stale.unlink(missing_ok=True)
    return path


def frozen_weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of the parameters that do not train, and of the buffers (a quantized base's codes): a
    checkpoint holds only the others, so resuming needs these exactly as they were (the same base model)."""
    frozen = [(name, parameter) for name, parameter in model.named_parameters() if not parameter.requires_grad]
    return tensors_sha256(frozen + list(model.named_buffers()))


def peft_base_name(source: dict, build_base, out_dir: str | Path, pad_token_id: int | None = None) -> str:
    """What an exported adapter names as its ``base_model_name_or_path``: the Hub repository of a GPT-2
    name, or the checkpoint directory; a random base (``build_base()``) is first written to ``out_dir/base``,
    with ``pad_token_id`` in its ``config.json`` (a classifier's padding token)."""
    if source["random_init"]:
        return str(save_hf(build_base(), Path(out_dir) / "base", pad_token_id=pad_token_id))
    if Path(source["model"]).is_dir():
        return source["model"]
    return HUB_REPOS[canonical_preset(source["model"])]
