"""Instruction data: the Alpaca prompt, the data set of the book's chapter 7, batches masked with -100.

Chapter 7 of "Build a Large Language Model (From Scratch)" teaches a pretrained GPT
to follow instructions. Every example is a record ``{instruction, input, output}``
written out as one text in the Alpaca style (Taori et al., 2023)::

    Below is an instruction that describes a task. Write a response that
    appropriately completes the request.

    ### Instruction:
    Identify the correct spelling of the following word.

    ### Input:                 <- left out when "input" is empty
    Ocassion

    ### Response:
    The correct spelling is 'Occasion.'

and the model learns it as in pretraining: each token predicts the next. Examples
differ in length, so a batch is padded with ``<|endoftext|>`` (id 50256). The
targets are the inputs shifted by one; the first padding token stays a target (the
model learns to *stop* after its answer), every later one becomes -100, the
``ignore_index`` of ``torch.nn.functional.cross_entropy``, so padding adds nothing
to the loss nor to its mean. ``mask_prompt=True`` also hides the prompt's tokens:
the loss is then taken over the response only (the book's exercise 7.2).

Shapes: ``B`` batch size, ``T`` tokens of the longest example in the batch (plus one).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from .generation import END_OF_TEXT_ID
from .infra.download import download_file
from .infra.speed import to_device

# The book's data set: 1,100 Alpaca-style records (rasbt/LLMs-from-scratch, Apache-2.0).
INSTRUCTION_DATA_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/"
                        "instruction-data.json")
INSTRUCTION_DATA_BYTES = 203_524
INSTRUCTION_DATA_SHA256 = "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"
INSTRUCTION_DATA_NAME = "instruction-data"

PROMPT_INTRO = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                "the request.")
RESPONSE_HEADER = "\n\n### Response:\n"
IGNORE_INDEX = -100  # cross_entropy's default ignore_index: these targets count for nothing
FIELDS = ("instruction", "input", "output")


# --- prompts ---------------------------------------------------------------------------

def format_input(entry: dict) -> str:
    """The book's ``format_input``: the Alpaca prompt of ``entry`` up to (not including) ``### Response:``.

    The ``### Input:`` section is left out when ``entry["input"]`` is empty.
    """
    prompt = f"{PROMPT_INTRO}\n\n### Instruction:\n{entry['instruction']}"
    return prompt + (f"\n\n### Input:\n{entry['input']}" if entry.get("input") else "")


def format_example(entry: dict) -> str:
    """The whole training text of ``entry``: its prompt, ``### Response:`` and the reference output."""
    return format_input(entry) + RESPONSE_HEADER + entry["output"]


def extract_response(generated_text: str, prompt: str) -> str:
    """The model's answer in ``generated_text`` (prompt + continuation): the continuation without
    ``### Response:`` and surrounding white space (as the book computes its ``response_text``)."""
    return generated_text[len(prompt):].replace("### Response:", "").strip()


# --- the data file ----------------------------------------------------------------------

JSON_NAMES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
              type(None): "null"}


def json_name(value) -> str:
    """What JSON calls the kind of a value ``json.loads`` gave: "object", "string", "array", ..."""
    return JSON_NAMES.get(type(value), type(value).__name__)

def instruction_data_file(data_dir: str | Path = "data", base_url: str | None = None) -> Path:
    """The path of ``instruction-data.json`` in ``data_dir/instruction-data/``, downloaded (and verified by
    size and SHA-256) on first use. ``base_url`` replaces the book repository's address."""
    url = INSTRUCTION_DATA_URL if base_url is None else base_url.rstrip("/") + "/instruction-data.json"
    return download_file([url], Path(data_dir) / INSTRUCTION_DATA_NAME / "instruction-data.json",
                         expected_size=INSTRUCTION_DATA_BYTES, expected_sha256=INSTRUCTION_DATA_SHA256,
                         desc="instruction-data.json")


INSTRUCTION_RECORDS = 'a JSON list of {"instruction": ..., "input": ..., "output": ...} records'
INSTRUCTION_NEEDS = "instruction and output (and input, which may be empty)"


def check_records(records, origin: str, fields: tuple[str, ...] = FIELDS, *, optional: tuple[str, ...] = (),
                  nonempty: tuple[str, ...] = ("instruction",), expected: str = INSTRUCTION_RECORDS,
                  needs: str = INSTRUCTION_NEEDS) -> list[dict]:
    """``records`` if it is a non-empty list of records with the text ``fields`` (``input`` may be empty
    or missing, then ""); else a one-line ValueError naming the first bad record. The ``optional`` text
    fields are kept when present; the ``nonempty`` ones must hold more than white space. ``expected``
    and ``needs`` word the errors (the defaults: chapter 7's ``{instruction, input, output}`` records)."""
    if not isinstance(records, list) or not records:
        found = "an empty list" if records == [] else f"a JSON {json_name(records)}"
        raise ValueError(f"{origin} holds {found}; expected {expected}")
    checked = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"record {index} of {origin} is a JSON {json_name(record)}, not an object; "
                             f"expected {expected}")
        record = {"input": "", **record}
        kept = [name for name in (*fields, *optional) if name in record]
        missing = [name for name in fields if name not in record]
        not_text = [name for name in kept if not isinstance(record[name], str)]
        if missing or not_text:
            problem = f"lacks {missing}" if missing else f"has non-text {not_text}"
            raise ValueError(f"record {index} of {origin} {problem}; each record needs the text fields {needs}")
        empty = [name for name in nonempty if not record[name].strip()]
        if empty:
            raise ValueError(f"record {index} of {origin} has an empty {empty[0]}; give every record one")
        checked.append({name: record[name] for name in kept})
    return checked


def read_json_file(path: str | Path, kind: str, hint: str):
    """The JSON value in the file at ``path``: one-line errors for a missing file (``hint`` says what to
    pass instead), bytes that are not UTF-8 and text that is not JSON (``kind``: "instruction", ...)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {kind} data at {path}; {hint}")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text; save the JSON file as UTF-8") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); "
                         f"expected a JSON list of {kind} records") from None


def read_instruction_file(path: str | Path) -> list[dict]:
    """The records of a JSON file of instruction data (see :func:`check_records`); one-line errors."""
    hint = f"pass a JSON file of records or '{INSTRUCTION_DATA_NAME}' (the book's, downloaded on first use)"
    return check_records(read_json_file(path, "instruction", hint), str(path))


def load_instruction_data(source: str | Path = INSTRUCTION_DATA_NAME, data_dir: str | Path = "data",
                          base_url: str | None = None) -> list[dict]:
    """Records from ``"instruction-data"`` (the book's file, downloaded on first use) or a JSON file's path."""
    if str(source) == INSTRUCTION_DATA_NAME:
        source = instruction_data_file(data_dir, base_url)
    return read_instruction_file(source)


def split_instruction_data(data: list, train_ratio: float = 0.85, test_ratio: float = 0.10):
    """``(train, validation, test)`` in file order, as the book splits them: the first ``int(85%)`` records
    train, the next ``int(10%)`` test, the rest validate (1,100 records: 935 / 55 / 110)."""
    if not (0 < train_ratio < 1 and 0 <= test_ratio < 1 and train_ratio + test_ratio < 1):
        raise ValueError(f"train_ratio and test_ratio must be fractions that leave some data to validate on, "
                         f"found {train_ratio} and {test_ratio}")
    train_end = int(len(data) * train_ratio)
    test_end = train_end + int(len(data) * test_ratio)
    return data[:train_end], data[test_end:], data[train_end:test_end]


def check_split_sizes(total: int, train: list, val: list, batch_size: int) -> None:
    """A one-line ValueError unless the training split fills one batch and validation has a record."""
    if len(train) < batch_size or not val:
        raise ValueError(f"{total} records give {len(train)} to train on and {len(val)} to validate on; "
                         f"one training batch needs {batch_size} (85% of the records) and validation at "
                         "least one: use more records or a smaller --batch-size")


# --- dataset and batches ----------------------------------------------------------------

class InstructionDataset(Dataset):
    """The book's ``InstructionDataset``: each record's whole text (:func:`format_example`), tokenized once.

    Item ``i`` is ``(token_ids, prompt_length)``: the ids of the full text (a list of
    ints) and how many of them are the prompt (:func:`format_input`), which
    :func:`collate` masks with ``mask_prompt``.
    """

    def __init__(self, data: list[dict], tokenizer):
        self.data = data
        self.encoded_texts = [tokenizer.encode(format_example(entry)) for entry in data]
        self.prompt_lengths = [len(tokenizer.encode(format_input(entry))) for entry in data]

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[list[int], int]:
        return self.encoded_texts[index], self.prompt_lengths[index]


def collate(batch, pad_token_id: int = END_OF_TEXT_ID, ignore_index: int = IGNORE_INDEX,
            allowed_max_length: int | None = None, mask_prompt: bool = False, device=None):
    """The book's ``custom_collate_fn``: ``(inputs [B, T], targets [B, T])`` of a list of examples.

    An example is a list of token ids, or ``(token_ids, prompt_length)`` as
    :class:`InstructionDataset` gives. Each gets one ``pad_token_id`` (its end of
    text) and is padded with more to ``T = longest + 1``; ``inputs`` drop the last
    token, ``targets`` the first. In ``targets`` every padding token after an
    example's end-of-text becomes ``ignore_index``; with ``mask_prompt`` so do the
    targets that are prompt tokens. ``allowed_max_length`` cuts both to that many
    tokens. ``device`` (optional) is where the tensors go.

    A batch left without a single target (``mask_prompt`` and a maximum length that
    only the prompts fill) is a ValueError: its loss would be NaN, and so the weights.
    """
    examples = [(item, 0) if isinstance(item[0], int) else item for item in batch]
    width = max(len(ids) + 1 for ids, _ in examples)
    inputs, targets = [], []
    for ids, prompt_length in examples:
        padded = torch.tensor(list(ids) + [pad_token_id] * (width - len(ids)))
        target = padded[1:].clone()
        target[len(ids):] = ignore_index  # target len(ids) - 1 is the end-of-text: it stays
        if mask_prompt:
            target[:prompt_length - 1] = ignore_index  # targets 0 .. prompt_length-2 are prompt tokens
        inputs.append(padded[:-1])
        targets.append(target)
    inputs, targets = torch.stack(inputs), torch.stack(targets)
    if allowed_max_length is not None:
        inputs, targets = inputs[:, :allowed_max_length], targets[:, :allowed_max_length]
    if mask_prompt and bool((targets == ignore_index).all()):  # the loss would be 0/0: NaN, and NaN weights
        raise ValueError(f"every target of this batch is masked: with mask_prompt, allowed_max_length "
                         f"{allowed_max_length} keeps only prompt tokens; use a larger maximum length "
                         "(--max-length) or leave out --mask-prompt")
    if device is not None:
        inputs, targets = to_device(inputs, device), to_device(targets, device)
    return inputs, targets


def instruction_loaders(train_data, val_data, test_data, tokenizer, batch_size: int = 8,
                        allowed_max_length: int | None = 1024, mask_prompt: bool = False, num_workers: int = 0):
    """The book's three loaders: training shuffled with incomplete batches dropped, the others in order.

    With ``shuffle`` the order is drawn from PyTorch's global generator when a loader
    is iterated: ``torch.manual_seed(123)`` first gives the book's batches.
    """
    collate_fn = partial(collate, allowed_max_length=allowed_max_length, mask_prompt=mask_prompt)
    datasets = [InstructionDataset(data, tokenizer) for data in (train_data, val_data, test_data)]
    if mask_prompt and allowed_max_length is not None:
        check_responses_kept(datasets, allowed_max_length)
    return tuple(DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn, shuffle=training,
                            drop_last=training, num_workers=num_workers)
                 for dataset, training in zip(datasets, (True, False, False)))


def check_responses_kept(datasets, allowed_max_length: int) -> None:
    """With the prompt masked, a record whose prompt fills ``allowed_max_length`` tokens keeps no target
    (its response is cut away): a ValueError saying how many records of ``datasets`` (train, validation,
    test) lose theirs and what to do, rather than records that teach nothing and batches whose loss is NaN."""
    # Targets 0 .. prompt_length-2 are masked prompt tokens: one survives the cut if prompt_length - 1 < max.
    cut = [(name, index, prompt_length) for name, dataset in zip(("training", "validation", "test"), datasets)
           for index, prompt_length in enumerate(dataset.prompt_lengths) if prompt_length - 1 >= allowed_max_length]
    if cut:
        name, index, _ = cut[0]
        longest = max(prompt_length for *_, prompt_length in cut)
        total = sum(len(dataset) for dataset in datasets)
        raise ValueError(f"with --mask-prompt and --max-length {allowed_max_length}, {len(cut)} of {total} records "
                         f"(the first: record {index} of the {name} split) keep no response token, their prompts "
                         f"fill the {allowed_max_length} tokens; use --max-length {longest} or more, leave out "
                         "--mask-prompt, or shorten those records")
