"""Preference data: pairs of a chosen and a rejected answer to one prompt, batched for DPO.

The book's bonus material on Direct Preference Optimization (Rafailov et al., 2023;
``ch07/04_preference-tuning-with-dpo`` in rasbt/LLMs-from-scratch) continues chapter 7:
its 1,100 records are chapter 7's ``{instruction, input, output}`` records plus two
answers, ``chosen`` (the one to prefer) and ``rejected``. Record 50, for example::

    instruction: Identify the correct spelling of the following word.
    input:       Ocassion
    chosen:      The correct spelling is 'Occasion.'
    rejected:    The correct spelling is obviously 'Occasion.'

Each answer is written after chapter 7's Alpaca prompt (``instruction_data.format_input``)
and ``### Response:``, as one text. A batch holds both texts of every record, padded with
``<|endoftext|>`` (id 50256) to one common length ``T`` (the longest text of either kind,
plus one), with a boolean mask per text: True where a token belongs to the answer. The
mask drops the padding and, by default, the prompt, so that the DPO loss compares the two
answers only (``preference.sequence_logprobs``). As the book, the mask keeps the tokens of
``### Response:\\n`` (they are the same in both texts, and add the same to both sides).

Shapes: ``B`` records in a batch, ``T`` tokens of its longest text plus one.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from .generation import END_OF_TEXT_ID
from .infra.download import download_file
from .infra.speed import to_device
from .instruction_data import RESPONSE_HEADER, check_records, format_input, read_json_file, split_instruction_data

# The book's preference data (rasbt/LLMs-from-scratch, Apache-2.0): 1,100 records.
PREFERENCE_DATA_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/"
                       "04_preference-tuning-with-dpo/instruction-data-with-preference.json")
PREFERENCE_DATA_BYTES = 386_968
PREFERENCE_DATA_SHA256 = "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e"
PREFERENCE_DATA_NAME = "preference-data"
PREFERENCE_FILE = "instruction-data-with-preference.json"
FIELDS = ("instruction", "input", "chosen", "rejected")
# The book masks the prompt and the two "\n" tokens that tiktoken writes before "### Response:".
NEWLINES_BEFORE_RESPONSE = 2

split_preference_data = split_instruction_data  # the book's 85/10/5 split, in file order (935 / 55 / 110)


# --- the data file ----------------------------------------------------------------------

def preference_data_file(data_dir: str | Path = "data", base_url: str | None = None) -> Path:
    """The path of the book's preference file in ``data_dir/preference-data/``, downloaded (and verified by
    size and SHA-256) on first use. ``base_url`` replaces the book repository's folder address."""
    url = PREFERENCE_DATA_URL if base_url is None else f"{base_url.rstrip('/')}/{PREFERENCE_FILE}"
    return download_file([url], Path(data_dir) / PREFERENCE_DATA_NAME / PREFERENCE_FILE,
                         expected_size=PREFERENCE_DATA_BYTES, expected_sha256=PREFERENCE_DATA_SHA256,
                         desc=PREFERENCE_FILE)


PREFERENCE_RECORDS = 'a JSON list of {"instruction": ..., "input": ..., "chosen": ..., "rejected": ...} records'


def check_preference_records(records, origin: str) -> list[dict]:
    """``records`` if it is a non-empty list of ``{instruction, input, chosen, rejected}`` records of text
    (``input`` may be empty or missing; ``output``, when present, is kept: ``gptlora score`` compares with
    it); else a one-line ValueError naming the first bad record and what it lacks."""
    return check_records(records, origin, FIELDS, optional=("output",), nonempty=("instruction", "chosen", "rejected"),
                         expected=PREFERENCE_RECORDS,
                         needs="instruction, chosen and rejected (and input, which may be empty)")


def read_preference_file(path: str | Path) -> list[dict]:
    """The records of a JSON file of preference data (see :func:`check_preference_records`); one-line errors."""
    hint = (f"pass a JSON file of records with chosen and rejected answers or '{PREFERENCE_DATA_NAME}' (the "
            "book's, downloaded on first use)")
    return check_preference_records(read_json_file(path, "preference", hint), str(path))


def load_preference_data(source: str | Path = PREFERENCE_DATA_NAME, data_dir: str | Path = "data",
                         base_url: str | None = None) -> list[dict]:
    """Records from ``"preference-data"`` (the book's file, downloaded on first use) or a JSON file's path."""
    if str(source) == PREFERENCE_DATA_NAME:
        source = preference_data_file(data_dir, base_url)
    return read_preference_file(source)


# --- dataset and batches ----------------------------------------------------------------

class PreferenceDataset(Dataset):
    """The book's ``PreferenceDataset``: every record's prompt and its two full texts, tokenized once.

    Item ``i`` is ``{"prompt": ids, "chosen": ids, "rejected": ids}`` (lists of ints): the
    prompt (:func:`instruction_data.format_input`) and the prompt followed by ``### Response:``
    and each answer.
    """

    def __init__(self, data: list[dict], tokenizer):
        self.data = data
        self.encoded = []
        for entry in data:
            prompt = format_input(entry)
            self.encoded.append(dict(prompt=tokenizer.encode(prompt),
                                     chosen=tokenizer.encode(prompt + RESPONSE_HEADER + entry["chosen"]),
                                     rejected=tokenizer.encode(prompt + RESPONSE_HEADER + entry["rejected"])))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        return self.encoded[index]


def collate_preferences(batch: list[dict], pad_token_id: int = END_OF_TEXT_ID, allowed_max_length: int | None = None,
                        mask_prompt: bool = True, device=None) -> dict:
    """The book's DPO ``custom_collate_fn``: a list of :class:`PreferenceDataset` items as one batch.

    Returns ``{"chosen": [B, T], "rejected": [B, T], "chosen_mask": [B, T], "rejected_mask": [B, T]}``:
    token ids padded with ``pad_token_id`` to ``T`` = the longest text of either kind plus one (so
    the two tensors line up), and boolean masks, False on padding and (``mask_prompt``, the
    default) on the prompt and the two newline tokens after it. ``allowed_max_length`` cuts
    all four to that many tokens. ``device`` (optional) is where they go.

    A text left without a single True position (a maximum length the prompt fills) is a
    ValueError: its mean log-probability would be 0/0.
    """
    width = max(len(item[key]) + 1 for item in batch for key in ("chosen", "rejected"))
    tensors = {key: [] for key in ("chosen", "rejected", "chosen_mask", "rejected_mask")}
    for item in batch:
        for key in ("chosen", "rejected"):
            ids = item[key]
            mask = torch.zeros(width, dtype=torch.bool)
            mask[:len(ids)] = True  # the padding counts for nothing
            if mask_prompt:
                mask[:len(item["prompt"]) + NEWLINES_BEFORE_RESPONSE] = False
            tensors[key].append(torch.tensor(list(ids) + [pad_token_id] * (width - len(ids))))
            tensors[f"{key}_mask"].append(mask)
    out = {key: torch.stack(values)[:, :allowed_max_length] for key, values in tensors.items()}
    for key in ("chosen_mask", "rejected_mask"):
        # sequence_logprobs scores tokens 1.. (token 0 has no prediction): each text needs one there.
        if not bool(out[key][:, 1:].any(dim=1).all()):
            raise ValueError(f"a {key.split('_')[0]} answer of this batch keeps no token: allowed_max_length "
                             f"{allowed_max_length} keeps only its prompt; use a larger maximum length (--max-length)")
    return {key: to_device(value, device) for key, value in out.items()} if device is not None else out


def preference_loaders(train_data, val_data, test_data, tokenizer, batch_size: int = 8,
                       allowed_max_length: int | None = 1024, mask_prompt: bool = True, num_workers: int = 0):
    """The book's three loaders: training shuffled with incomplete batches dropped, the others in order
    (``torch.manual_seed(123)`` before iterating the training loader gives the book's batches)."""
    collate_fn = partial(collate_preferences, allowed_max_length=allowed_max_length, mask_prompt=mask_prompt)
    return tuple(DataLoader(PreferenceDataset(data, tokenizer), batch_size=batch_size, collate_fn=collate_fn,
                            shuffle=training, drop_last=training, num_workers=num_workers)
                 for data, training in zip((train_data, val_data, test_data), (True, False, False)))
