"""The spam fine-tuning recipe end to end, and the run directories it writes.

``run_finetune`` (with a ``settings.FinetuneSettings``; ``finetune_spam`` takes the settings as
keywords) is chapter 6 of "Build a Large Language Model (From Scratch)" as
one call: data, head, method, training, accuracies, plots, and a run directory
that ``load_classifier`` (and ``gptlora classify --run``) reads back. The pieces
it combines live in ``spam`` (data), ``classifier`` (head, loss, loop, plots) and
``lora`` (adapters); this module only decides how they fit together.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..infra.atomic import read_json_object, replace_atomically, write_json
from ..infra.checkpoint import Checkpointer
from ..classifier import (LABEL_NAMES, add_classification_head, apply_method, calc_accuracy_loader,
                          plot_history, prepare_for_classification, train_classifier, TrainingHistory)
from ..infra.distributed import fail_together, shard_loaders, start_processes, wrap_for_training
from ..infra.download import sha256_of
from ..formats.lora_io import BaseMismatchError, load_adapter, save_adapter
from ..formats.lora_peft_export import export_peft
from ..generation import END_OF_TEXT_ID
from ..model import GPTConfig, GPTModel, count_parameters
from .prefix_cache import cache_frozen_prefix
from ..pretrained import pretrained_or_random, safetensors_shapes
from ..prompt_tuning import PROMPT_METHODS, VirtualTokenModel, check_virtual_tokens
from ..formats.prompt_tuning_io import export_prompt_peft, load_prompt, save_prompt
from ..qlora import check_quantize_method, quantize_base, quantized_layers
from ..spam import create_dataloaders, split_paths
from ..infra.precision import precision_record
from ..infra.speed import speed_options
from ..training import schedule_fingerprint, trainable_adamw
from .run_dir import ADAPTER_DIR, RUN_FILES, open_run_dir, frozen_weights_sha256, peft_base_name  # noqa: F401
from .run_dir import base_source  # noqa: F401  (notebooks build a run's base_source next to finetune_spam)
from .settings import DEFAULT_LR, FinetuneSettings, schedule_keywords  # noqa: F401  (DEFAULT_LR: the rates lr=None takes)


# --- the base model of a run -----------------------------------------------------------

def load_base(source: dict) -> GPTModel:
    """The base described by ``source`` (from ``run_dir.base_source``); random weights are drawn after
    seeding with ``source["seed"]``, so the same source always gives the same weights. A source with
    ``quantize`` is quantized the same way again (quantization draws nothing at random)."""
    torch.manual_seed(source["seed"])
    model = pretrained_or_random(source["model"], source["models_dir"], source["random_init"])
    return quantize_base(model, **source["quantize"]) if source.get("quantize") else model


# --- run directories -------------------------------------------------------------------

def save_classifier(model: GPTModel, run_dir: str | Path, info: dict) -> Path:
    """Save ``classifier.safetensors`` (all weights) and ``classifier.json`` in ``run_dir``.

    ``info`` must hold ``method`` and ``max_length``; the model config and class
    count are added. The whole model is saved, not just what was trained: a run
    directory then classifies on its own, without the base weights and without
    trusting that they are unchanged.

    LoRA is the exception, its point being small files: ``adapter/`` holds only the
    adapter (``save_adapter``), with a fingerprint of the base it was trained on. The
    new head is part of that base (frozen, with a LoRA on it, as in the book), and is
    rebuilt from the seed in ``info`` rather than shipped: this keeps the book's
    2,666,528 trainable parameters, while the fingerprint still refuses a base whose
    body or head differs. (``modules_to_save=["out_head"]`` instead trains the head in
    full and ships it in the adapter.) Each file is written under a temporary name
    and renamed into place.
    """
    from safetensors.torch import save_model

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if info["method"] == "lora":
        save_adapter(model, run_dir / ADAPTER_DIR, verbose=False)
    elif info["method"] in PROMPT_METHODS:  # the prompt and the trained head, like a LoRA adapter
        save_prompt(model, run_dir / ADAPTER_DIR, init_text=info["method_options"]["init_text"], verbose=False)
        model = model.base
    else:
        with replace_atomically(run_dir / "classifier.safetensors") as tmp:
            save_model(model, str(tmp))  # save_model, unlike save_file, copes with tied (shared) tensors
    head = getattr(model.out_head, "original", model.out_head)  # the frozen original of a trained copy
    full_info = {**info, "config": model.cfg.to_dict(), "num_classes": head.out_features}
    write_json(full_info, run_dir / "classifier.json")
    return run_dir


def load_classifier(run_dir: str | Path, device="cpu", base: GPTModel | None = None) -> tuple[GPTModel, dict]:
    """The model saved by :func:`save_classifier` (in eval mode, on ``device``) and its info dict.

    A LoRA run holds only its adapter: it is loaded onto ``base`` (the model the run
    started from, with its language-model head) or, by default, onto the base rebuilt
    from the run's ``base_source``, with the head redrawn under the run's seed. A
    base other than the one trained on is a ValueError (the fingerprint differs).
    """
    from safetensors.torch import load_model

    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    if info["method"] == "lora" or info["method"] in PROMPT_METHODS:
        return _load_adapter_classifier(run_dir, info, base).to(device).eval(), info
    weights_path = _run_file(run_dir, "classifier.safetensors")
    model = GPTModel(GPTConfig(**info["config"]))
    prepare_for_classification(model, info["method"], info["num_classes"], info.get("method_options"))
    safetensors_shapes(weights_path, remedy="Train the run again (gptlora finetune ... --overwrite)")
    load_model(model, str(weights_path), strict=True)
    return model.to(device).eval(), info


def load_runs_sharing_a_base(run_dirs, device="cpu") -> tuple[GPTModel, list[str], dict]:
    """One base carrying the adapters of several LoRA runs, for classifying with all of them in one batch.

    The runs must share their base (same ``base_source`` and seed, so the same head;
    each adapter's fingerprint is checked too) and their padding settings. Returns the
    model (eval mode), the adapter names (``run0``, ``run1``, ... in the order given, for
    ``model(ids, adapter_names=...)``) and the shared run info.
    """
    run_dirs = [Path(run_dir) for run_dir in run_dirs]
    infos = [read_run_info(run_dir) for run_dir in run_dirs]
    for run_dir, info in zip(run_dirs, infos):
        if info["method"] != "lora":
            raise ValueError(f"{run_dir} is a {info['method']!r} run; only LoRA runs share a base in one batch: "
                             "classify it with --run alone")
    shared = ("base_source", "seed", "num_classes", "max_length", "dynamic_padding")
    for run_dir, info in zip(run_dirs[1:], infos[1:]):
        differ = [key for key in shared if info.get(key) != infos[0].get(key)]
        if differ:
            raise ValueError(f"{run_dir} and {run_dirs[0]} differ in {', '.join(differ)}, so they cannot share "
                             "one base in one batch; classify them one --run at a time")
    source = _recorded_base_source(run_dirs[0], infos[0])
    base = load_base(source)
    torch.manual_seed(infos[0]["seed"])  # the head belongs to the base, as in _load_adapter_classifier
    add_classification_head(base, infos[0]["num_classes"])
    names = [f"run{index}" for index in range(len(run_dirs))]
    for run_dir, name in zip(run_dirs, names):
        load_adapter(base, run_dir / ADAPTER_DIR, adapter_name=name)
    return base.to(device).eval(), names, infos[0]


RUN_INFO_KEYS = ("method", "max_length", "num_classes", "config", "dynamic_padding")  # what every run records


def read_run_info(run_dir: str | Path) -> dict:
    """The contents of a run's ``classifier.json`` (method, max_length, config, base_source, ...)."""
    path = _run_file(Path(run_dir), "classifier.json")
    info = read_json_object(path, "the run description that `gptlora finetune` writes")
    missing = [key for key in RUN_INFO_KEYS if key not in info]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(map(repr, missing))}; is it the classifier.json of a "
                         "`gptlora finetune` run? Run finetune again to make a complete one")
    return info


def _run_file(run_dir: Path, name: str) -> Path:
    path = run_dir / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; is {run_dir} the --out directory of a `gptlora finetune` run?")
    return path


def _recorded_base_source(run_dir: Path, info: dict) -> dict:
    """``info["base_source"]``, or a ValueError saying that the base must be passed in."""
    if info.get("base_source") is None:
        raise ValueError(f"{run_dir} holds only a LoRA adapter and does not record how its base was made; "
                         "pass the model it was trained from: load_classifier(run_dir, base=model)")
    return info["base_source"]


def _load_adapter_classifier(run_dir: Path, info: dict, base: GPTModel | None, origin: str = "passed in") -> GPTModel:
    """A run that saved only ``adapter/`` (LoRA, prompt or prefix tuning), as a classifier: the base (given,
    or rebuilt from ``info["base_source"]``) + the seeded head + the run's LoRA adapter (for a prompt- or
    prefix-tuning run: the base wrapped with its prompt, see ``load_prompt``).

    ``origin`` says where a given ``base`` came from, for the message when it is not the run's base.
    """
    if not (run_dir / ADAPTER_DIR / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{run_dir / ADAPTER_DIR / 'adapter_config.json'} not found: the {info['method']} "
                                f"run {run_dir} has lost its adapter; train the run again "
                                "(gptlora finetune ... --overwrite)")
    if base is None:
        source = _recorded_base_source(run_dir, info)
        base, origin = load_base(source), f"rebuilt from {source}"
    torch.manual_seed(info["seed"])  # the head belongs to the base: the run's seed redraws it
    add_classification_head(base, info["num_classes"])
    try:
        if info["method"] in PROMPT_METHODS:
            return load_prompt(base, run_dir / ADAPTER_DIR)
        load_adapter(base, run_dir / ADAPTER_DIR)
    except BaseMismatchError as error:
        raise BaseMismatchError(f"{error.mismatch}; the base was {origin}",
                                f"the run {run_dir} needs the exact base it was trained on (the model it started "
                                "from, before fine-tuning)") from None
    return base


def export_run_to_peft(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a LoRA run's adapter as a Hugging Face ``peft`` adapter in ``out_dir`` (see ``export_peft``).

    Its ``base_model_name_or_path`` names the base the run started from: the Hub
    repository of a GPT-2 name, or the checkpoint directory. A base of random weights
    has neither, so it is written to ``out_dir/base`` (``save_hf``) and named instead,
    with ``pad_token_id`` 50256 in its ``config.json``: the classifier pads with GPT-2's
    end-of-text, and ``transformers.GPT2ForSequenceClassification`` classifies a batch of
    several messages only with a padding token (it reads each row at its last other token).
    A Hub or directory base's config is not ours to change: load it with ``pad_token_id=50256``.
    A failed export removes ``out_dir`` if it created it.
    """
    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    if info["method"] != "lora" and info["method"] not in PROMPT_METHODS:
        raise ValueError(f"{run_dir} is a {info['method']!r} run, which saves a whole model; only a "
                         "`--method lora` run has an adapter to export (or a prompt- or prefix-tuning run)")
    source = _recorded_base_source(run_dir, info)
    if source.get("quantize"):
        raise ValueError(f"{run_dir} was trained on a quantized base (QLoRA, {source['quantize']['method']}); peft "
                         "would apply its adapter to the full-precision base. Keep the run's own adapter files")
    made_out_dir = not Path(out_dir).exists()
    try:
        return _export(run_dir, info, source, out_dir)
    except BaseException:
        if made_out_dir:  # a failed export leaves nothing behind (a random base is written first)
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _export(run_dir: Path, info: dict, source: dict, out_dir: str | Path) -> Path:
    base = load_base(source)  # built once: a random base is also written out, before its head is replaced
    base_name = peft_base_name(source, lambda: base, out_dir, pad_token_id=END_OF_TEXT_ID)  # as classify pads
    model = _load_adapter_classifier(run_dir, info, base, origin=f"rebuilt from {source}").eval()
    export = export_prompt_peft if isinstance(model, VirtualTokenModel) else export_peft
    return export(model, out_dir, base_model_name_or_path=base_name)


# --- the whole recipe ------------------------------------------------------------------

def finetune_spam(model: GPTModel, tokenizer, data_dir: str | Path, out_dir: str | Path, method: str = "last-block",
                  *, device="cpu", progress: bool = True, resume: bool = False, overwrite: bool = True,
                  schedule=None, **settings) -> dict:
    """Chapter 6 end to end, in the book's words: ``run_finetune`` with
    ``FinetuneSettings(data_dir=data_dir, method=method, **settings)`` (``epochs``, ``lr``,
    ``method_options``, ``base_source``, ...: the fields of :class:`~.settings.FinetuneSettings`;
    ``schedule``, a ``training.TrainingSchedule``, gives the appendix-D fields at once)."""
    settings = FinetuneSettings(data_dir=data_dir, method=method, **settings, **schedule_keywords(schedule))
    return run_finetune(model, tokenizer, settings, out_dir, device=device, progress=progress, resume=resume,
                        overwrite=overwrite)


def run_finetune(model: GPTModel, tokenizer, settings: FinetuneSettings, out_dir: str | Path, *, device="cpu",
                 progress: bool = True, resume: bool = False, overwrite: bool = True,
                 command_options: dict | None = None) -> dict:
    """Fine-tune ``model`` on the spam splits in ``settings.data_dir`` and save the run in ``out_dir``.

    Seeds as the book does (before the loaders, the new head and the optimizer),
    trains with AdamW, measures accuracy on the full train/validation/test
    splits and writes ``classifier.safetensors``, ``classifier.json``,
    ``metrics.json``, ``loss.png`` and ``accuracy.png`` to ``out_dir``.
    Returns the metrics dict (accuracies 0 to 1, losses, timing, and the settings).

    A LoRA run writes ``adapter/`` instead of ``classifier.safetensors``; give
    ``settings.base_source`` (``run_dir.base_source``, describing ``model``) so that
    ``load_classifier`` can rebuild the base on its own.

    Speed settings (see ``prefix_cache`` and ``spam``): ``cache_prefix`` runs the
    frozen blocks once per message instead of at every step (``last-block`` only;
    same numbers up to rounding); ``bucket_by_length`` (with ``dynamic_padding``)
    batches messages of similar length together.

    Checkpoints (see ``checkpoint``): ``checkpoint.safetensors`` in ``out_dir`` is
    saved at each epoch end and every ``settings.save_every`` steps, with the settings'
    fingerprint; ``resume=True`` continues from it, to the same end as an uninterrupted
    run, and refuses other settings. A fresh run in an ``out_dir`` that holds files needs
    ``overwrite=True`` (the default here; the command asks for ``--overwrite``).
    ``command_options`` are stored in the checkpoint for ``gptlora finetune --resume``.

    Under ``torchrun`` every process runs this with its share of each batch
    (``batch_size`` is the global batch; see ``distributed``); only rank 0 writes.
    The settings' ``schedule`` adds appendix D's warmup, decay, clipping and accumulation.
    """
    if settings.quantize_method is None and quantized_layers(model):  # a quantized model the settings do not know
        check_quantize_method(next(iter(quantized_layers(model).values())).method, settings.method)
    processes = start_processes(device)
    device = processes.device
    precision = settings.precision_on(device)  # tf32 on a CPU fails here, before anything is written
    show = progress and processes.is_main  # progress bars and log lines: one process shows them
    torch.manual_seed(settings.seed)
    loaders = create_dataloaders(settings.data_dir, tokenizer, settings.batch_size,
                                 dynamic_padding=settings.dynamic_padding, bucket_by_length=settings.bucket_by_length)
    max_length = loaders[0].dataset.max_length
    if max_length > model.cfg.context_length:
        raise ValueError(f"the longest training text has {max_length} tokens but the model's context length is "
                         f"{model.cfg.context_length}; use a model with a longer context")
    if settings.method in PROMPT_METHODS:  # the virtual tokens take room in the context too
        check_virtual_tokens(settings.method_options["num_virtual_tokens"], model.cfg.context_length, max_length)
    # After the checks above (they need the data), before anything changes: --overwrite removes the old run.
    # Every process checks (one that failed alone would leave the others waiting); one removes.
    checkpoint_path = fail_together(open_run_dir, out_dir, resume, overwrite, removes_old_run=processes.is_main)
    torch.manual_seed(settings.seed)
    model = apply_method(model, settings.method, settings.method_options, len(LABEL_NAMES)).to(device)
    torch.manual_seed(settings.seed)
    optimizer = trainable_adamw(model, settings.lr, settings.weight_decay)  # foreach: ~2.5x faster, small model
    fingerprint = dict(config=model.cfg.to_dict(), **settings.fingerprint(), frozen_weights=frozen_weights_sha256(model),
                       data=data_sha256(settings.data_dir), data_order="distributed" if processes.distributed else "book")
    checkpoints = Checkpointer(checkpoint_path, model, optimizer, fingerprint, settings.save_every,
                               writes_files=processes.is_main, extra=command_options)
    # Shard first: the cached loaders keep the samplers they are given (a DistributedSampler under torchrun).
    loaders = shard_loaders(loaders, processes, settings.seed)
    trained_model = model  # with cache_prefix: the model's last block, norm and head, fed cached states
    if settings.cache_prefix:
        trained_model, loaders = cache_frozen_prefix(model, loaders, progress=show)
    history = TrainingHistory(**checkpoints.resume()) if resume else None  # last: it sets the generators
    trained_model = wrap_for_training(speed_options(trained_model, settings, device), processes)
    history = train_classifier(trained_model, loaders[0], loaders[1], optimizer, device, settings.epochs,
                               settings.eval_freq, settings.eval_iter, progress=show, history=history,
                               checkpoints=checkpoints, schedule=settings.schedule, precision=precision)
    seconds = checkpoints.training_seconds()
    # The final pass over every split takes minutes on a CPU: show it too.
    accuracy = {split: calc_accuracy_loader(tqdm(loader, desc=f"evaluating {split}", unit="batch", disable=not show),
                                            trained_model, device)
                for split, loader in zip(("train", "validation", "test"), loaders)}
    # classifier.json: what load_classifier needs; metrics.json: that, the settings and the results.
    info = dict(method=settings.method, method_options=settings.method_options, max_length=max_length,
                dynamic_padding=settings.dynamic_padding, base_model=settings.base_model, accuracy=accuracy,
                seed=settings.seed, base_source=settings.base_source)
    if processes.is_main:  # under torchrun, one process writes the run directory
        save_classifier(model, out_dir, info)
    metrics = dict(settings.to_json(), **info, **schedule_fingerprint(settings.schedule), **precision_record(precision),
                   training_seconds=round(seconds, 1), trainable_parameters=count_parameters(model, trainable_only=True), history=asdict(history))
    if processes.is_main:
        write_json(metrics, Path(out_dir) / "metrics.json")
        plot_history(history, out_dir)
    return metrics


def data_sha256(data_dir: str | Path) -> dict[str, str]:
    """SHA-256 of each split's parquet file in ``data_dir``."""
    return {split: sha256_of(path) for split, path in split_paths(data_dir).items()}
