"""The pretraining recipe end to end, and the run directories it writes (``gptlora pretrain``).

``run_pretrain`` (with a ``settings.PretrainSettings``; ``pretrain_on_text`` takes the
settings as keywords) is the first half of chapter 5 of "Build a Large Language
Model (From Scratch)" as one call: split the text 90/10, cut it into windows,
build the model, train with AdamW, print the book's log, and save a run directory
that ``load_language_model`` (and ``gptlora generate --model RUN_DIR``) reads back.

Two kinds of run:

- ``full`` (the book): every weight trains; the run saves the whole model
  (``model.safetensors``). The default base is the book's ``GPT_CONFIG_124M``
  from random weights: GPT-2 small's shape, context 256, dropout 0.1, no
  query/key/value bias (:func:`book_config`).
- ``lora``: continued pretraining of a pretrained GPT-2 on your own text (domain
  adaptation): only low-rank adapters train, and the run saves only them
  (``adapter/``), with a record of how to rebuild the base. ``gptlora export-peft``
  turns such a run into a peft adapter for ``transformers.GPT2LMHeadModel``.
- ``p-tuning``: the same, with a soft prompt made by a trained prompt encoder
  (``p_tuning.py``) in front of every window instead of adapters; the windows are
  ``n`` tokens shorter than the model's context, to leave room for the prompt.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch

from ..infra.atomic import replace_atomically, write_json
from ..infra.checkpoint import Checkpointer
from ..infra.distributed import fail_together, shard_loaders, start_processes, wrap_for_training
from ..generation import get_tokenizer
from ..formats.hf_layout import config_from_hf
from ..lora import apply_lora
from ..formats.lora_io import load_adapter, save_adapter
from ..formats.lora_peft_export import export_peft
from ..formats.prompt_tuning_io import export_prompt_peft, load_prompt, save_prompt
from ..model import GPTConfig, GPTModel, count_parameters
from ..pretrained import load_pretrained
from ..pretraining import PretrainingHistory, perplexity, plot_history, train_language_model
from ..prompt_tuning import apply_virtual_tokens, check_virtual_tokens
from ..text_data import create_dataloader, split_text
from ..infra.precision import precision_record
from ..infra.speed import speed_options
from ..training import schedule_fingerprint, trainable_adamw
from .run_dir import ADAPTER_DIR, frozen_weights_sha256, open_run_dir, peft_base_name
from .run_dir import base_source  # noqa: F401  (notebooks build a run's base_source next to pretrain_on_text)
from .settings import PretrainSettings, schedule_keywords

RUN_INFO = "language_model.json"  # marks a pretraining run directory
WEIGHTS = "model.safetensors"
BOOK_CONTEXT_LENGTH = 256


# --- the base model --------------------------------------------------------------------

def book_config(name_or_dir: str = "gpt2-small", context_length: int | None = None) -> GPTConfig:
    """The book's from-scratch config (dropout 0.1, no qkv bias, context 256) in the shape of a preset
    or of a checkpoint directory's ``config.json``; ``context_length`` above that shape's is a ValueError."""
    directory = Path(name_or_dir)
    if directory.is_dir():
        config_path = directory / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found; random weights take their shape from a checkpoint "
                                    "directory's config.json, or from a GPT-2 name such as gpt2-small")
        shape = config_from_hf(json.loads(config_path.read_text()))
    else:
        shape = GPTConfig.from_preset(str(name_or_dir))
    context_length = context_length or min(BOOK_CONTEXT_LENGTH, shape.context_length)
    check_context_length(context_length, shape.context_length, str(name_or_dir))
    return GPTConfig(**{**shape.to_dict(), "context_length": context_length, "drop_rate": 0.1, "qkv_bias": False})


def check_context_length(wanted: int, available: int, model_name: str) -> None:
    """One-line ValueError unless ``1 <= wanted <= available``."""
    if not 1 <= wanted <= available:
        raise ValueError(f"--context-length {wanted} is not possible for {model_name}, whose context length is "
                         f"{available}; choose a value from 1 to {available}")


def base_context_length(source: dict, limit: bool = False) -> int:
    """The context length of the base :func:`load_base` builds, read without building it; with
    ``limit``, the longest its shape allows (a random base may be built shorter, as the book's 256)."""
    if source["random_init"] and not limit:
        return book_config(source["model"], source.get("context_length")).context_length
    directory = Path(source["model"])
    if directory.is_dir() and (directory / "config.json").is_file():
        return config_from_hf(json.loads((directory / "config.json").read_text())).context_length
    return GPTConfig.from_preset(source["model"]).context_length


def load_base(source: dict) -> GPTModel:
    """The base of ``run_dir.base_source``: seeded with ``source["seed"]``, then :func:`book_config` random
    weights (as the book draws them after ``torch.manual_seed(123)``) or the pretrained checkpoint."""
    torch.manual_seed(source["seed"])
    if source["random_init"]:
        return GPTModel(book_config(source["model"], source.get("context_length")))
    return load_pretrained(source["model"], source["models_dir"])


# --- run directories -------------------------------------------------------------------

def is_pretraining_run(path: str | Path) -> bool:
    """True for a directory written by :func:`pretrain_on_text` (it holds ``language_model.json``)."""
    return (Path(path) / RUN_INFO).is_file()


def save_language_model(model: GPTModel, run_dir: str | Path, info: dict) -> Path:
    """``model.safetensors`` (full) or ``adapter/`` (LoRA) and ``language_model.json`` in ``run_dir``.

    The info file is written last: a directory without it is not (yet) a run.
    """
    from safetensors.torch import save_model

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if info["method"] == "lora":
        save_adapter(model, run_dir / ADAPTER_DIR, verbose=False)
    elif info["method"] == "p-tuning":
        save_prompt(model, run_dir / ADAPTER_DIR, info["method_options"]["init_text"], verbose=False)
    else:
        with replace_atomically(run_dir / WEIGHTS) as tmp:
            save_model(model, str(tmp))  # copes with a tied head
        # A GPT-2 base has its head tied to the token embedding; save_model stores that tensor once,
        # so the loader must tie the two again before it reads the file.
        info = {**info, "weights_tied": model.weights_tied}
    write_json({**info, "config": model.cfg.to_dict()}, run_dir / RUN_INFO)
    return run_dir


def load_language_model(run_dir: str | Path, device="cpu") -> tuple[GPTModel, dict]:
    """The model of a pretraining run (eval mode, on ``device``) and its ``language_model.json``.

    A LoRA run's base is rebuilt from its ``base_source`` and must be the one trained on
    (the adapter's fingerprint is checked).
    """
    from safetensors.torch import load_model

    run_dir = Path(run_dir)
    if not is_pretraining_run(run_dir):
        raise FileNotFoundError(f"{run_dir / RUN_INFO} not found; is {run_dir} the --out directory of a "
                                "finished `gptlora pretrain` run?")
    info = json.loads((run_dir / RUN_INFO).read_text())
    if info["method"] == "lora":
        model = load_base(info["base_source"])
        load_adapter(model, run_dir / ADAPTER_DIR)
    elif info["method"] == "p-tuning":
        model = load_prompt(load_base(info["base_source"]), run_dir / ADAPTER_DIR)
    else:
        model = GPTModel(GPTConfig(**info["config"]))
        if info.get("weights_tied"):
            model.tie_weights()
        load_model(model, str(run_dir / WEIGHTS), strict=True)
    return model.to(device).eval(), info


def export_pretraining_run_to_peft(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a LoRA or P-tuning pretraining run's adapter as a peft adapter for ``transformers.GPT2LMHeadModel``."""
    model, info = load_language_model(run_dir)
    if info["method"] == "full":
        raise ValueError(f"{run_dir} is a {info['method']!r} run, which saves a whole model; only a "
                         "`--method lora` (or p-tuning) run has an adapter to export")
    base_name = peft_base_name(info["base_source"], lambda: load_base(info["base_source"]), out_dir)
    export = export_peft if info["method"] == "lora" else export_prompt_peft
    return export(model, out_dir, base_model_name_or_path=base_name)


# --- the whole recipe ------------------------------------------------------------------

def text_loaders(text: str, tokenizer, context_length: int, batch_size: int, train_ratio: float = 0.90):
    """The book's ``(train, validation)`` loaders: windows of ``context_length`` tokens, stride the same.

    Training is shuffled with incomplete last batches dropped; validation keeps
    every window, in order. A text too short for a batch of each is a ValueError.
    """
    train_text, val_text = split_text(text, train_ratio)
    loaders = []
    for name, part, training in (("training", train_text, True), ("validation", val_text, False)):
        try:
            loaders.append(create_dataloader(part, batch_size, context_length, context_length, shuffle=training,
                                             drop_last=training, tokenizer=tokenizer))
        except ValueError as error:
            raise ValueError(f"the {name} part of the text ({1 - train_ratio if not training else train_ratio:.0%} "
                             f"of its characters): {error}") from None
    if len(loaders[0]) == 0:
        windows = len(loaders[0].dataset)
        raise ValueError(f"the training part of the text gives {windows} window(s) of {context_length} tokens, "
                         f"fewer than one batch of {batch_size}; use a longer text, a smaller --batch-size "
                         "or a shorter --context-length")
    return loaders


def pretrain_on_text(text: str, out_dir: str | Path, source: dict, *, device="cpu", tokenizer=None,
                     progress: bool = True, verbose: bool = True, resume: bool = False, overwrite: bool = True,
                     schedule=None, **settings) -> dict:
    """Chapter 5 end to end, settings as keywords: ``run_pretrain`` with
    ``PretrainSettings(base_source=source, **settings)`` (``method``, ``epochs``, ``lr``, ``context_length``, ...;
    ``schedule``, a ``training.TrainingSchedule``, gives the appendix-D fields at once)."""
    settings = PretrainSettings(base_source=source, **settings, **schedule_keywords(schedule))
    return run_pretrain(text, settings, out_dir, device=device, tokenizer=tokenizer, progress=progress,
                        verbose=verbose, resume=resume, overwrite=overwrite)


def run_pretrain(text: str, settings: PretrainSettings, out_dir: str | Path, *, device="cpu", tokenizer=None,
                 progress: bool = True, verbose: bool = True, resume: bool = False, overwrite: bool = True,
                 command_options: dict | None = None, loaders: tuple | None = None,
                 info_extra: dict | None = None, seed_before_training: bool = False) -> dict:
    """Train the base of ``settings.base_source`` (``run_dir.base_source``) on ``text``; save the run in ``out_dir``.

    Seeds as the book does (``seed`` before the loaders and again before the
    model), trains with AdamW, prints the book's log, and writes the model (or the
    LoRA adapter), ``language_model.json``, ``metrics.json`` and ``loss.png`` to
    ``out_dir``. ``settings.context_length`` (default: the model's, less a P-tuning prompt's
    virtual tokens) sets the window length. Checkpoints, ``resume``, ``overwrite``, ``command_options``
    and ``torchrun`` work as in ``finetune.run_finetune``; the settings' schedule adds appendix D.
    Returns the metrics dict.

    ``loaders``, ``(train, validation)`` loaders of ``(inputs, targets)`` batches, replace the
    windows of ``text`` (instruction fine-tuning brings its own; ``text`` then only identifies
    the data in the checkpoint's fingerprint); ``info_extra`` adds entries to ``language_model.json``.
    ``seed_before_training`` seeds once more right before the loop, as the book's chapter 7 does after
    loading GPT-2 (so the first epoch's shuffle does not depend on how many numbers loading drew).
    """
    source, method = settings.base_source, settings.method
    tokenizer = tokenizer or get_tokenizer()
    processes = start_processes(device)
    device = processes.device
    precision = settings.precision_on(device)  # tf32 on a CPU fails here, before anything is written
    virtual = settings.method_options["num_virtual_tokens"] if method == "p-tuning" else 0  # room for the prompt
    if virtual:  # n virtual tokens and a window (of at least one token) must fit in the model's context
        check_virtual_tokens(virtual, base_context_length(source), settings.context_length or 1)
    context_length = settings.context_length or base_context_length(source) - virtual
    check_context_length(context_length, base_context_length(source, limit=True), source["model"])
    torch.manual_seed(settings.seed)  # the book seeds before the loaders (their shuffles draw later) ...
    windows = loaders is None
    if windows:
        loaders = text_loaders(text, tokenizer, context_length, settings.batch_size, settings.train_ratio)
    model = load_base(source)  # ... and again before the model: load_base seeds with source["seed"]
    # Every process checks (one that failed alone would leave the others waiting); one removes. After the
    # checks of the text and options and after the base is loaded (or failed to download), so that a bad
    # one leaves an old run untouched even with --overwrite. open_run_dir draws no random numbers.
    checkpoint_path = fail_together(open_run_dir, out_dir, resume, overwrite, removes_old_run=processes.is_main)
    if method == "lora":
        apply_lora(model, **settings.method_options, verbose=False)
    elif method == "p-tuning":  # the base frozen and wrapped: the prompt goes before every window
        model = apply_virtual_tokens(model, method, settings.method_options)
    model.to(device)
    optimizer = trainable_adamw(model, settings.lr, settings.weight_decay)
    fingerprint = dict(config=model.cfg.to_dict(), **{**settings.fingerprint(), "context_length": context_length},
                       frozen_weights=frozen_weights_sha256(model), text=hashlib.sha256(text.encode("utf-8")).hexdigest(),
                       data_order="distributed" if processes.distributed else "book")
    checkpoints = Checkpointer(checkpoint_path, model, optimizer, fingerprint, settings.save_every,
                               writes_files=processes.is_main, extra=command_options)
    # Tokens per epoch, as the book counts them (batches x rows x tokens), before sharding.
    train_tokens = len(loaders[0]) * settings.batch_size * context_length if windows else None
    val_tokens = len(loaders[1].dataset) * context_length if windows else None
    loaders = shard_loaders(loaders, processes, settings.seed)
    if seed_before_training:
        torch.manual_seed(settings.seed)
    history = PretrainingHistory(**checkpoints.resume()) if resume else None  # last: it sets the generators
    history = train_language_model(wrap_for_training(speed_options(model, settings, device), processes), loaders[0],
                                   loaders[1], optimizer, device,
                                   settings.epochs, settings.eval_freq, settings.eval_iter, settings.prompt, tokenizer,
                                   sample_tokens=settings.sample_tokens, progress=progress and processes.is_main,
                                   verbose=verbose and processes.is_main, history=history, checkpoints=checkpoints,
                                   schedule=settings.schedule, precision=precision)
    info = dict(method=method, method_options=settings.method_options, base_source=source, seed=settings.seed,
                context_length=context_length, text=settings.text_name, prompt=settings.prompt, **(info_extra or {}))
    final = dict(train_loss=history.train_losses[-1], val_loss=history.val_losses[-1]) if history.train_losses else {}
    metrics = dict(settings.to_json(), **info, **final, **{f"{k}_perplexity": perplexity(v) for k, v in final.items()},
                   **schedule_fingerprint(settings.schedule), **precision_record(precision),
                   training_seconds=round(checkpoints.training_seconds(), 1),
                   trainable_parameters=count_parameters(model, trainable_only=True),
                   train_tokens=train_tokens, val_tokens=val_tokens, history=asdict(history))
    if processes.is_main:  # under torchrun, one process writes the run directory
        write_json(metrics, Path(out_dir) / "metrics.json")
        plot_history(history, Path(out_dir) / "loss.png")
        save_language_model(model, out_dir, info)  # last: language_model.json marks a finished run
    return metrics
