"""Preference data (the book's DPO bonus material): the file, the split, the chosen/rejected batches and masks.

The reference numbers come from the book's notebook ``ch07/04_preference-tuning-with-dpo/dpo-from-scratch.ipynb``
(rasbt/LLMs-from-scratch): the printed token ids and mask of its first example batch, and its
``custom_collate_fn``, written out below as the reference the collate is compared with.
"""

import json

import pytest
import torch

from gptlora.preference_data import (PREFERENCE_DATA_SHA256, PreferenceDataset, collate_preferences,
                                     load_preference_data, preference_data_file, preference_loaders,
                                     read_preference_file, split_preference_data)

from conftest import SHARED

DATA_FILE = SHARED / "data" / "preference-data" / "instruction-data-with-preference.json"

# The book's ``example_data = data[:2]``, as its notebook prints them.
BOOK_EXAMPLES = [
    {"instruction": "Evaluate the following phrase by transforming it into the spelling given.",
     "input": "freind --> friend",
     "output": 'The spelling of the given phrase "freind" is incorrect, the correct spelling is "friend".',
     "rejected": 'The spelling of the given phrase "freind" is flat out wrong, get it together, the correct '
                 'spelling is "friend".',
     "chosen": 'The spelling of the given phrase "freind" is incorrect, the correct spelling is "friend".'},
    {"instruction": "Edit the following sentence for grammar.", "input": "He go to the park every day.",
     "output": "He goes to the park every day.", "rejected": "He goes to the stupid park every single day.",
     "chosen": "He goes to the park every day."},
]
# The notebook's printed batch["chosen"][0] (81 ids) and its mask: True at positions 50..73.
BOOK_CHOSEN_0 = [
    21106, 318, 281, 12064, 326, 8477, 257, 4876, 13, 19430, 257, 2882, 326, 20431, 32543, 262, 2581, 13, 198, 198,
    21017, 46486, 25, 198, 36, 2100, 4985, 262, 1708, 9546, 416, 25449, 340, 656, 262, 24993, 1813, 13, 198, 198,
    21017, 23412, 25, 198, 19503, 521, 14610, 1545, 198, 198, 21017, 18261, 25, 198, 464, 24993, 286, 262, 1813, 9546,
    366, 19503, 521, 1, 318, 11491, 11, 262, 3376, 24993, 318, 366, 6726, 1911] + [50256] * 7


def book_custom_collate_fn(batch, pad_token_id=50256, allowed_max_length=None, mask_prompt_tokens=True,
                           device="cpu"):
    """The book's ``custom_collate_fn`` (dpo-from-scratch.ipynb), kept as written there, comments aside."""
    batch_data = {"prompt": [], "chosen": [], "rejected": [], "rejected_mask": [], "chosen_mask": []}
    max_length_common = 0
    if batch:
        for key in ["chosen", "rejected"]:
            current_max = max(len(item[key]) + 1 for item in batch)
            max_length_common = max(max_length_common, current_max)
    for item in batch:
        prompt = torch.tensor(item["prompt"])
        batch_data["prompt"].append(prompt)
        for key in ["chosen", "rejected"]:
            sequence = item[key]
            padded = sequence + [pad_token_id] * (max_length_common - len(sequence))
            mask = torch.ones(len(padded)).bool()
            mask[len(sequence):] = False
            if mask_prompt_tokens:
                mask[:prompt.shape[0] + 2] = False
            batch_data[key].append(torch.tensor(padded))
            batch_data[f"{key}_mask"].append(mask)
    for key in ["chosen", "rejected", "chosen_mask", "rejected_mask"]:
        tensor_stack = torch.stack(batch_data[key])
        if allowed_max_length is not None:
            tensor_stack = tensor_stack[:, :allowed_max_length]
        batch_data[key] = tensor_stack.to(device)
    return batch_data


@pytest.fixture(scope="module")
def data() -> list[dict]:
    if not DATA_FILE.is_file():
        pytest.skip(f"the preference data is not at {DATA_FILE}; see ../shared/README.md")
    return read_preference_file(DATA_FILE)


def test_the_books_data_set_record_50_and_split(data):
    assert len(data) == 1_100
    assert data[50]["rejected"] == "The correct spelling is obviously 'Occasion.'"
    assert data[50]["chosen"] == data[50]["output"] == "The correct spelling is 'Occasion.'"
    assert data[:2] == BOOK_EXAMPLES
    train, val, test = split_preference_data(data)
    assert (len(train), len(val), len(test)) == (935, 55, 110)
    assert train == data[:935] and test == data[935:1045] and val == data[1045:]  # the book's file order


@pytest.mark.parametrize("mask_prompt, max_length", [(True, None), (False, None), (True, 60), (True, 1024)])
def test_the_collate_equals_the_books_custom_collate_fn(tokenizer, mask_prompt, max_length):
    items = [PreferenceDataset(BOOK_EXAMPLES, tokenizer)[i] for i in range(2)]
    ours = collate_preferences(items, allowed_max_length=max_length, mask_prompt=mask_prompt)
    book = book_custom_collate_fn(items, allowed_max_length=max_length, mask_prompt_tokens=mask_prompt)
    assert set(ours) == {"chosen", "rejected", "chosen_mask", "rejected_mask"}
    for key, value in ours.items():
        assert value.dtype == book[key].dtype and torch.equal(value, book[key]), key


def test_the_books_printed_first_batch(tokenizer):
    batch = collate_preferences([PreferenceDataset(BOOK_EXAMPLES, tokenizer)[i] for i in range(2)])
    assert batch["chosen"].shape == batch["rejected"].shape == (2, 81)
    assert batch["chosen"][0].tolist() == BOOK_CHOSEN_0
    assert batch["chosen_mask"][0].nonzero().flatten().tolist() == list(range(50, 74))
    answer = tokenizer.decode(batch["rejected"][0][batch["rejected_mask"][0]].tolist())
    assert answer == "### Response:\n" + BOOK_EXAMPLES[0]["rejected"]  # no prompt, no padding


def test_a_maximum_length_that_keeps_only_the_prompt_is_refused_not_a_nan(tokenizer):
    items = [PreferenceDataset(BOOK_EXAMPLES, tokenizer)[i] for i in range(2)]
    with pytest.raises(ValueError, match="answer of this batch keeps no token.*--max-length"):
        collate_preferences(items, allowed_max_length=45)
    collate_preferences(items, allowed_max_length=45, mask_prompt=False)  # the prompt counts: no error


def test_loaders_shuffle_the_training_split_only_and_drop_its_last_batch(data, tokenizer):
    train, val, test = preference_loaders(data[:20], data[20:25], data[25:30], tokenizer, batch_size=8)
    assert (len(train), len(val), len(test)) == (2, 1, 1)
    batch = next(iter(val))
    assert batch["chosen"].shape[0] == 5 and batch["chosen"].shape == batch["rejected"].shape


def test_the_data_file_is_downloaded_once_and_verified(tmp_path, data):
    from test_download import LoopbackServer

    from gptlora.infra.download import DownloadError

    raw = DATA_FILE.read_bytes()
    name = DATA_FILE.name
    with LoopbackServer({f"/{name}": raw, f"/bad/{name}": b" " * len(raw)}) as server:
        path = preference_data_file(tmp_path, base_url=server.url)
        assert path == tmp_path / "preference-data" / name and path.read_bytes() == raw
        assert load_preference_data("preference-data", tmp_path, base_url=server.url) == data
        assert len(server.requests) == 1
        with pytest.raises(DownloadError, match="SHA-256"):
            preference_data_file(tmp_path / "other", base_url=server.url + "/bad")
    assert not (tmp_path / "other" / "preference-data" / name).exists()
    assert PREFERENCE_DATA_SHA256 == "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e"


@pytest.mark.parametrize("content, message", [
    (b"{not json", r"is not valid JSON \(.*line 1, column 2\); expected a JSON list of preference records"),
    (b"[]", "holds an empty list; expected a JSON list of .*chosen"),
    (b'[{"instruction": "a", "output": "b"}]', r"record 0 of .* lacks \['chosen', 'rejected'\]"),
    (b'[{"instruction": "a", "chosen": "b", "rejected": 1}]', r"record 0 of .* has non-text \['rejected'\]"),
    (b'[{"instruction": "a", "chosen": "b", "rejected": "c", "output": null}]', r"has non-text \['output'\]"),
    (b'[{"instruction": "a", "chosen": " ", "rejected": "c"}]', "record 0 of .* has an empty chosen"),
    (b'[{"instruction": "a", "chosen": "b", "rejected": "c"}, 3]', "record 1 of .* is a JSON number"),
])
def test_a_malformed_file_or_record_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / "data.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as error:
        read_preference_file(path)
    assert "\n" not in str(error.value)


def test_any_list_of_records_works(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps([{"instruction": "Say hi.", "chosen": "Hi.", "rejected": "No."}]))
    assert load_preference_data(path) == [{"instruction": "Say hi.", "input": "", "chosen": "Hi.", "rejected": "No."}]
    with pytest.raises(FileNotFoundError, match="no preference data at .*'preference-data'"):
        load_preference_data(tmp_path / "missing.json")
