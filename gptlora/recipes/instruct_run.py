"""Instruction fine-tuning end to end (``gptlora instruct``) and answering with its run (``generate --instruction``).

Chapter 7 of "Build a Large Language Model (From Scratch)" as one call: split the
records 85/10/5, batch them with the -100 mask (``instruction_data``), fine-tune a
GPT-2 (every weight, or ``lora`` adapters only) with AdamW at lr 5e-5 for 2 epochs,
then write the responses to the test split as the book's
``instruction-data-with-response.json`` does.

The training is chapter 5's recipe (``pretrain_run.run_pretrain``) given the
instruction loaders instead of text windows: the same loop, checkpoints,
``--resume``, ``torchrun`` and run directory, so ``gptlora generate --model RUN``
and ``export-peft`` read an instruction run as they read a pretraining run. Its
``language_model.json`` carries an ``instruction`` entry, by which ``generate``
knows to wrap ``--instruction``/``--input`` in the Alpaca prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..generation import END_OF_TEXT_ID, generate, get_tokenizer, text_to_token_ids, token_ids_to_text
from ..infra.atomic import write_json
from ..infra.distributed import is_main_process
from ..instruction_scoring import offline_scores, with_judge_scores
from ..instruction_data import (check_split_sizes, extract_response, format_input, instruction_loaders,
                                split_instruction_data)
from .pretrain_run import base_context_length, load_language_model, run_pretrain
from .settings import InstructSettings, schedule_keywords

RESPONSES_FILE = "test-responses.json"  # the book's instruction-data-with-response.json


def instruct_finetune(data: list[dict], out_dir: str | Path, source: dict, *, device="cpu", tokenizer=None,
                      data_name: str | None = None, progress: bool = True, verbose: bool = True, resume: bool = False,
                      overwrite: bool = True, schedule=None, **settings) -> dict:
    """Chapter 7 end to end, settings as keywords: :func:`run_instruct` with
    ``InstructSettings(base_source=source, data=data_name, **settings)`` (``method``, ``epochs``, ``lr``,
    ``max_length``, ``mask_prompt``, ...; ``schedule``, a ``training.TrainingSchedule``, gives the
    appendix-D fields at once)."""
    settings = InstructSettings(base_source=source, data=data_name, **settings, **schedule_keywords(schedule))
    return run_instruct(data, settings, out_dir, device=device, tokenizer=tokenizer, progress=progress,
                        verbose=verbose, resume=resume, overwrite=overwrite)


def run_instruct(data: list[dict], settings: InstructSettings, out_dir: str | Path, *, device="cpu", tokenizer=None,
                 progress: bool = True, verbose: bool = True, resume: bool = False, overwrite: bool = True,
                 command_options: dict | None = None) -> dict:
    """Fine-tune the base of ``settings.base_source`` (``run_dir.base_source``) to follow the ``data`` records.

    The book's defaults: batch 8, AdamW lr 5e-5 and weight decay 0.1, 2 epochs,
    losses every 5 steps over 5 batches, a greedy sample of the first validation
    prompt after each epoch. ``max_length`` cuts every example (default: the
    model's context length; the book's 1024). ``mask_prompt`` takes the loss over
    the response tokens only. The training is ``pretrain_run.run_pretrain`` with
    ``settings.pretrain_settings(...)`` and the instruction loaders. After training,
    ``response_tokens`` greedy tokens answer each test record (stopping at
    ``<|endoftext|>``); the records with their ``model_response`` go to
    ``test-responses.json`` in ``out_dir`` (``response_tokens=0``: none), and their scores
    into the metrics: exact match and token F1 against the reference outputs, and with
    ``judge_url`` the judge's 0-100 score (``instruction_scoring``). ``resume``, ``overwrite``,
    ``command_options`` and ``torchrun`` work as in ``pretrain_run.run_pretrain``.
    Returns the metrics dict (``metrics.json``).
    """
    tokenizer = tokenizer or get_tokenizer()
    source = settings.base_source
    train, val, test = split_instruction_data(data)
    check_split_sizes(len(data), train, val, settings.batch_size)
    limit = base_context_length(source)
    max_length = settings.max_length or limit
    if not 1 < max_length <= limit:
        raise ValueError(f"--max-length {max_length} is not possible for {source['model']}, whose context length "
                         f"is {limit}; choose a value from 2 to {limit}")
    loaders = instruction_loaders(train, val, test, tokenizer, settings.batch_size, max_length,
                                  settings.mask_prompt)[:2]
    instruction = dict(mask_prompt=settings.mask_prompt, max_length=max_length, data=settings.data,
                       split=dict(train=len(train), validation=len(val), test=len(test)))
    data_text = json.dumps(data, sort_keys=True)  # identifies the records in the checkpoint's fingerprint
    metrics = run_pretrain(data_text, settings.pretrain_settings(limit, format_input(val[0])), out_dir,
                           device=device, tokenizer=tokenizer, progress=progress, verbose=verbose, resume=resume,
                           overwrite=overwrite, command_options=command_options, loaders=loaders,
                           info_extra=dict(instruction=instruction), seed_before_training=True)
    if is_main_process() and settings.response_tokens and test:
        model = load_language_model(out_dir, device=device)[0]
        answered = respond_to_records(model, test, tokenizer, settings.response_tokens, progress=progress)
        write_json(answered, Path(out_dir) / RESPONSES_FILE)
        metrics["test_responses"] = RESPONSES_FILE
        metrics["test_scores"] = offline_scores(answered)
        write_json(metrics, Path(out_dir) / "metrics.json")  # the offline scores stay whatever the judge does
        if settings.judge_url:
            metrics["test_scores"] = with_judge_scores(metrics["test_scores"], answered, settings.judge_url,
                                                       settings.judge_model)
            write_json(metrics, Path(out_dir) / "metrics.json")
    return metrics


def respond(model, entry: dict, tokenizer, max_new_tokens: int = 256, temperature: float = 0.0,
            top_k: int | None = None) -> str:
    """The model's answer to ``entry`` (``instruction`` and optional ``input``): the text it writes after
    the Alpaca prompt, stopping at ``<|endoftext|>`` or after ``max_new_tokens`` tokens. Greedy by default
    (as the book); ``temperature``/``top_k`` sample from PyTorch's global generator."""
    prompt = format_input(entry)
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        ids = generate(model, text_to_token_ids(prompt, tokenizer).to(device), max_new_tokens,
                       temperature=temperature, top_k=top_k, eos_id=END_OF_TEXT_ID)
    return extract_response(token_ids_to_text(ids, tokenizer), prompt)


def respond_to_records(model, records: list[dict], tokenizer, max_new_tokens: int = 256,
                       progress: bool = False) -> list[dict]:
    """Each record with its ``model_response`` added (the book's ``instruction-data-with-response.json``)."""
    return [{**entry, "model_response": respond(model, entry, tokenizer, max_new_tokens)}
            for entry in tqdm(records, desc="answering the test split", unit="record", disable=not progress)]


def is_instruction_run(info: dict) -> bool:
    """Whether a run's ``language_model.json`` is an instruction fine-tuning run's."""
    return "instruction" in info
