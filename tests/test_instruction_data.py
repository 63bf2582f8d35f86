"""Instruction data (book, chapter 7): prompts, the data file, the split, the masked batches, the -100 loss.

The documented numbers come from the book's chapter-7 notebook (rasbt/LLMs-from-scratch,
``ch07/01_main-chapter-code/ch07.ipynb``) and its package test
``pkg/llms_from_scratch/tests/test_ch07.py``, reproduced at the end with its configuration and seed.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from gptlora.instruction_data import (INSTRUCTION_DATA_SHA256, InstructionDataset, collate, extract_response,
                                      format_example, format_input, instruction_data_file, instruction_loaders,
                                      load_instruction_data, read_instruction_file, split_instruction_data)
from gptlora.model import GPTConfig, GPTModel
from gptlora.pretraining import train_model_simple

from conftest import SHARED
from test_prefix_cache import one_thread  # noqa: F401 (a fixture)

DATA_FILE = SHARED / "data" / "instruction-data" / "instruction-data.json"
ENTRY_50 = {"instruction": "Identify the correct spelling of the following word.", "input": "Ocassion",
            "output": "The correct spelling is 'Occasion.'"}


@pytest.fixture(scope="module")
def data() -> list[dict]:
    if not DATA_FILE.is_file():
        pytest.skip(f"the chapter-7 instruction data is not at {DATA_FILE}; see ../shared/README.md")
    return read_instruction_file(DATA_FILE)


def test_the_books_data_set_its_entries_and_split(data):
    assert len(data) == 1_100
    assert data[50] == ENTRY_50
    assert data[999]["input"] == ""
    train, val, test = split_instruction_data(data)
    assert (len(train), len(val), len(test)) == (935, 55, 110)
    assert train == data[:935] and test == data[935:1045] and val == data[1045:]  # file order, test before val


def test_the_prompt_of_entry_50_and_of_an_entry_without_input(data):
    assert format_input(data[50]) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nIdentify the correct spelling of the following word.\n\n### Input:\nOcassion")
    assert format_example(data[50]).endswith("Ocassion\n\n### Response:\nThe correct spelling is 'Occasion.'")
    assert "### Input:" not in format_input(data[999])
    assert format_input(data[999]).endswith(f"### Instruction:\n{data[999]['instruction']}")
    prompt = format_input(data[50])
    assert extract_response(prompt + "\n\n### Response:\nThe correct spelling is 'Occasion.'\n", prompt) == \
        "The correct spelling is 'Occasion.'"


def test_the_books_collate_example():
    inputs, targets = collate([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]])
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, 50256, 50256, 50256], [7, 8, 9, 50256, 50256]]
    assert targets.tolist() == [[1, 2, 3, 4, 50256], [6, 50256, -100, -100, -100], [8, 9, 50256, -100, -100]]
    cut_inputs, cut_targets = collate([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]], allowed_max_length=3)
    assert cut_inputs.tolist() == inputs[:, :3].tolist() and cut_targets.tolist() == targets[:, :3].tolist()


def test_masking_the_prompt_leaves_the_response_and_its_end_as_targets():
    # Prompt of 3 tokens [0, 1, 2], response [3, 4]: targets predicting prompt tokens 1 and 2 are masked.
    inputs, targets = collate([([0, 1, 2, 3, 4], 3), ([5, 6], 1)], mask_prompt=True)
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, 50256, 50256, 50256]]
    assert targets.tolist() == [[-100, -100, 3, 4, 50256], [6, 50256, -100, -100, -100]]


def test_the_first_training_batches_have_the_books_shapes(data, tokenizer):
    """Section 7.4 prints the shapes of the training batches (batch 8, seed 123): 8 x 61, 8 x 76, 8 x 73, ..."""
    train, val, test = split_instruction_data(data)
    torch.manual_seed(123)
    train_loader, val_loader, test_loader = instruction_loaders(train, val, test, tokenizer, batch_size=8)
    shapes = [(tuple(inputs.shape), tuple(targets.shape)) for inputs, targets in train_loader]
    assert len(shapes) == 116 and [s[0] for s in shapes[:3]] == [(8, 61), (8, 76), (8, 73)]
    assert all(a == b for a, b in shapes)
    assert (len(val_loader), len(test_loader)) == (7, 14)


def test_cross_entropy_with_ignore_index_is_the_mean_over_unmasked_targets_only(data, tokenizer):
    inputs, targets = collate([InstructionDataset(data[:3], tokenizer)[i] for i in range(3)], mask_prompt=True)
    torch.manual_seed(0)
    logits = torch.randn(*inputs.shape, 50257)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    kept = targets.flatten() != -100
    per_token = F.cross_entropy(logits.flatten(0, 1)[kept], targets.flatten()[kept], reduction="none")
    torch.testing.assert_close(loss, per_token.mean())
    everything = F.cross_entropy(logits.flatten(0, 1), inputs.roll(-1, 1).flatten())  # padding averaged in
    assert not torch.isclose(loss, everything)
    assert kept.sum() < targets.numel() / 2  # the prompt and padding are most of the tokens here


def test_the_data_file_is_downloaded_once_and_verified(tmp_path, data):
    from test_download import LoopbackServer

    from gptlora.infra.download import DownloadError

    raw = DATA_FILE.read_bytes()
    with LoopbackServer({"/instruction-data.json": raw, "/bad/instruction-data.json": b" " * len(raw)}) as server:
        path = instruction_data_file(tmp_path, base_url=server.url)
        assert path == tmp_path / "instruction-data" / "instruction-data.json" and path.read_bytes() == raw
        assert load_instruction_data("instruction-data", tmp_path, base_url=server.url) == data
        assert len(server.requests) == 1  # present and valid: no second request
        with pytest.raises(DownloadError, match="SHA-256"):
            instruction_data_file(tmp_path / "other", base_url=server.url + "/bad")
    assert not (tmp_path / "other" / "instruction-data" / "instruction-data.json").exists()
    assert INSTRUCTION_DATA_SHA256 == "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"


@pytest.mark.parametrize("content, message", [
    (b"{not json", r"is not valid JSON \(Expecting property name enclosed in double quotes at line 1, column 2\)"),
    (b"\xff\xfe[]", "is not UTF-8 text"),
    (b"[]", "holds an empty list; expected a JSON list of"),
    (b'{"instruction": "x"}', "holds a JSON dict; expected a JSON list of"),
    (b'[{"instruction": "a", "output": "b"}, "text"]', "record 1 of .* is a str, not an object"),
    (b'[{"instruction": "a", "input": "", "response": "b"}]', "record 0 of .* lacks \\['output'\\]"),
    (b'[{"instruction": "a", "input": 3, "output": "b"}]', "record 0 of .* has non-text \\['input'\\]"),
    (b'[{"instruction": " ", "input": "", "output": "b"}]', "record 0 of .* has an empty instruction"),
])
def test_a_malformed_file_or_record_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / "data.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_instruction_file(path)


def test_any_list_of_records_works_and_input_may_be_missing(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps([{"instruction": "Say hi.", "output": "Hi."}, ENTRY_50]))
    assert load_instruction_data(path) == [{"instruction": "Say hi.", "input": "", "output": "Hi."}, ENTRY_50]
    with pytest.raises(FileNotFoundError, match="no instruction data at"):
        load_instruction_data(tmp_path / "missing.json")


def test_the_book_packages_chapter_7_test(data, tokenizer, one_thread, capsys):
    """``test_ch07.py`` of the book's package: the first 15 records of each split, collate cut to 100 tokens,
    batch 8, seed 123; a GPT of width 12, 1 layer, 2 heads, context 120, no dropout; AdamW lr 5e-5, weight decay
    0.1, seed 123 again, 10 epochs, evaluation every 5 steps over 5 batches. Its assertions: the first training
    and validation losses both round to 10.9, and the training loss falls."""
    train, val, test = (part[:15] for part in split_instruction_data(data))
    torch.manual_seed(123)
    collate_fn = lambda batch: collate(batch, allowed_max_length=100)  # noqa: E731
    train_loader = DataLoader(InstructionDataset(train, tokenizer), batch_size=8, collate_fn=collate_fn,
                              shuffle=True, drop_last=True)
    val_loader = DataLoader(InstructionDataset(val, tokenizer), batch_size=8, collate_fn=collate_fn)
    model = GPTModel(GPTConfig(vocab_size=50257, context_length=120, drop_rate=0.0, qkv_bias=False, emb_dim=12,
                               n_layers=1, n_heads=2)).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1)
    torch.manual_seed(123)
    train_losses, val_losses, _ = train_model_simple(model, train_loader, val_loader, optimizer, "cpu", 10, 5, 5,
                                                     format_input(val[0]), tokenizer)
    with capsys.disabled():
        print(f"\nchapter 7 package test: first losses {train_losses[0]:.4f} / {val_losses[0]:.4f}, "
              f"last training loss {train_losses[-1]:.4f}")
    assert round(train_losses[0], 1) == 10.9
    assert round(val_losses[0], 1) == 10.9
    assert train_losses[-1] < train_losses[0]
