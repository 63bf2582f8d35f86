"""Preference tuning with DPO end to end (``gptlora prefer``), after the instruction fine-tune.

The book's bonus notebook ``dpo-from-scratch.ipynb`` as one call: split the preference
records 85/10/5, batch the chosen/rejected pairs (``preference_data``), tune the model of
an ``instruct`` run (or any GPT-2) with the DPO loss (``preference``) through the one
training loop, with checkpoints, ``--resume``, ``torchrun`` and appendix D, then answer the
test split before (the reference) and after (the tuned policy), side by side.

Two methods:

- ``full`` (the book): every weight trains; the reference is a frozen copy of the start
  model, so two models sit in memory.
- ``lora``: only adapters train; the reference is the same network with its adapters
  switched off (no copy). The run saves the adapters merged into the weights, as a full run
  does, because its base (an ``instruct`` run's directory) is not a GPT-2 a run can rebuild.

The run directory is a pretraining run's (``language_model.json`` with an ``instruction``
entry), so ``gptlora generate --model RUN --instruction ...`` answers with it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch

from ..generation import get_tokenizer
from ..infra.atomic import write_json
from ..infra.checkpoint import Checkpointer
from ..infra.distributed import fail_together, shard_loaders, start_processes, wrap_for_training
from ..infra.precision import precision_record
from ..infra.speed import speed_options
from ..instruction_data import check_split_sizes
from ..instruction_scoring import offline_scores
from ..lora import apply_lora, lora_layers, merge_lora
from ..model import count_parameters
from ..preference import PreferenceHistory, frozen_copy, reference_of, train_preference
from ..preference_data import preference_loaders, split_preference_data
from ..training import plot_values, schedule_fingerprint, trainable_adamw
from .instruct_run import respond_to_records
from .pretrain_run import is_pretraining_run, load_base, load_language_model, save_language_model
from .run_dir import frozen_weights_sha256, open_run_dir
from .settings import PreferenceSettings

RESPONSES_FILE = "test-responses.json"  # before and after, side by side; `gptlora score` reads it
MARGINS_PLOT = "reward-margins.png"


def load_start_model(source: dict):
    """The model DPO starts from: an ``instruct`` (or pretraining) run's model, its LoRA adapter merged into
    the weights so that it is one plain GPT; or the base of ``source`` (a GPT-2 name, directory, random)."""
    if Path(source["model"]).is_dir() and is_pretraining_run(source["model"]):
        model = load_language_model(source["model"])[0]
        if lora_layers(model):
            model = merge_lora(model, unload=True).requires_grad_(True)  # apply_lora had frozen the base
        return model
    return load_base(source)


def run_prefer(data: list[dict], settings: PreferenceSettings, out_dir: str | Path, *, device="cpu", tokenizer=None,
               progress: bool = True, verbose: bool = True, resume: bool = False, overwrite: bool = True,
               command_options: dict | None = None) -> dict:
    """Tune the model of ``settings.base_source`` towards the chosen answers of ``data``; save the run in ``out_dir``.

    Writes the model, ``language_model.json``, ``metrics.json`` (with the history), ``reward-margins.png``
    and, with ``response_tokens``, ``test-responses.json``: each test record with ``response_before``
    (the reference's answer) and ``model_response`` (the tuned model's), scored against ``output``
    (the record's, or its chosen answer). ``resume``, ``overwrite``, ``command_options`` and
    ``torchrun`` work as in ``pretrain_run.run_pretrain``. Returns the metrics dict.
    """
    tokenizer = tokenizer or get_tokenizer()
    processes = start_processes(device)
    device = processes.device
    precision = settings.precision_on(device)  # tf32 on a CPU fails here, before anything is written
    source = settings.base_source
    train, val, test = split_preference_data(data)
    check_split_sizes(len(data), train, val, settings.batch_size)
    torch.manual_seed(settings.seed)
    model = load_start_model(source)
    limit = model.cfg.context_length
    max_length = settings.max_length or limit
    if max_length > limit:
        raise ValueError(f"--max-length {max_length} is more than the context length of {source['model']} "
                         f"({limit}); choose a value from 2 to {limit}")
    loaders = preference_loaders(train, val, test, tokenizer, settings.batch_size, max_length, settings.mask_prompt)
    checkpoint_path = fail_together(open_run_dir, out_dir, resume, overwrite, removes_old_run=processes.is_main)
    reference = None
    if settings.method == "lora":
        apply_lora(model, **settings.method_options, verbose=False)
    else:
        reference = frozen_copy(model).to(device)
    model.to(device)
    optimizer = trainable_adamw(model, settings.lr, settings.weight_decay)
    data_sha256 = hashlib.sha256(json.dumps(data, sort_keys=True).encode("utf-8")).hexdigest()
    fingerprint = dict(config=model.cfg.to_dict(), **{**settings.fingerprint(), "max_length": max_length},
                       frozen_weights=frozen_weights_sha256(model), data=data_sha256,
                       data_order="distributed" if processes.distributed else "book")
    checkpoints = Checkpointer(checkpoint_path, model, optimizer, fingerprint, settings.save_every,
                               writes_files=processes.is_main, extra=command_options)
    train_loader, val_loader = shard_loaders(loaders[:2], processes, settings.seed)
    torch.manual_seed(settings.seed)  # the book seeds right before training (the first shuffle)
    history = PreferenceHistory(**checkpoints.resume()) if resume else None  # last: it sets the generators
    history = train_preference(wrap_for_training(speed_options(model, settings, device), processes), train_loader, val_loader, optimizer,
                               settings.epochs, beta=settings.beta, reference=reference,
                               average=settings.logprobs == "mean", eval_freq=settings.eval_freq,
                               eval_iter=settings.eval_iter, device=device, progress=progress and processes.is_main,
                               verbose=verbose and processes.is_main, history=history, checkpoints=checkpoints,
                               schedule=settings.schedule, precision=precision)
    info = dict(method="full", base_source=source, seed=settings.seed, context_length=limit,
                instruction=dict(mask_prompt=settings.mask_prompt, max_length=max_length, data=settings.data),
                preference=dict(method=settings.method, beta=settings.beta, logprobs=settings.logprobs,
                                split=dict(train=len(train), validation=len(val), test=len(test))))
    final = {}
    if history.train_losses:
        final = dict(train_loss=history.train_losses[-1], val_loss=history.val_losses[-1],
                     train_margin=history.margins("train")[-1], val_margin=history.margins("val")[-1])
    metrics = dict(settings.to_json(), **final, **schedule_fingerprint(settings.schedule), **precision_record(precision),
                   training_seconds=round(checkpoints.training_seconds(), 1),
                   trainable_parameters=count_parameters(model, trainable_only=True), history=asdict(history))
    if not processes.is_main:  # under torchrun, one process answers and writes the run directory
        return metrics
    if settings.response_tokens and test:
        metrics.update(answer_before_and_after(model, reference, test, tokenizer, settings.response_tokens,
                                               Path(out_dir), progress))
    if history.train_losses:
        plot_values(torch.linspace(0, settings.epochs, len(history.train_losses)).tolist(), history.track_tokens_seen,
                    history.margins("train"), history.margins("val"), "reward margins", Path(out_dir) / MARGINS_PLOT,
                    seen_label="Tokens seen")
    write_json(metrics, Path(out_dir) / "metrics.json")
    if settings.method == "lora":
        model = merge_lora(model, unload=True)
    save_language_model(model.eval(), out_dir, info)  # last: language_model.json marks a finished run
    return metrics


def answer_before_and_after(policy, reference, records: list[dict], tokenizer, max_new_tokens: int, out_dir: Path,
                            progress: bool = False) -> dict:
    """Answer ``records`` with the reference (``response_before``) and the policy (``model_response``); write
    them to ``test-responses.json`` (``output``: the record's, else its chosen answer) and return the
    metrics entries: the file's name and the offline scores before and after."""
    with reference_of(policy, reference) as before_model:
        before = respond_to_records(before_model, records, tokenizer, max_new_tokens, progress=progress)
    after = respond_to_records(policy.eval(), records, tokenizer, max_new_tokens, progress=progress)
    rows = [{**record, "output": record.get("output", record["chosen"]), "response_before": old["model_response"],
             "model_response": new["model_response"]} for record, old, new in zip(records, before, after)]
    write_json(rows, out_dir / RESPONSES_FILE)
    scored_before = [{**row, "model_response": row["response_before"]} for row in rows]
    return dict(test_responses=RESPONSES_FILE, test_scores=offline_scores(rows),
                test_scores_before=offline_scores(scored_before))
