"""Text for next-token prediction: the sliding window of the book's chapter 2, and "The Verdict".

A text becomes one long list of token ids; a window of ``max_length`` ids slides
over it, ``stride`` ids at a time. Each window is one training row, and its target
is the same window shifted one token to the right::

    ids      In the heart of the city stood ...
    input    [In, the, heart, of]          (max_length = 4)
    target   [the, heart, of, the]         target[t] is the token after input[t]

so one row holds ``max_length`` next-token predictions, each made from the tokens
up to its position (the model's causal mask sees to that). ``stride ==
max_length`` cuts the text into disjoint windows; a smaller stride overlaps them.

Shapes: ``B`` batch size, ``T = max_length``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from .infra.download import download_file
from .generation import END_OF_TEXT, get_tokenizer

# "The Verdict" by Edith Wharton (1908, public domain), the text of the book's chapters 2 and 5.
VERDICT_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/"
               "the-verdict.txt")
VERDICT_BYTES = 20_479
VERDICT_SHA256 = "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"
VERDICT_NAME = "the-verdict"


class SlidingWindowDataset(Dataset):
    """The book's ``GPTDatasetV1``: every ``stride``-th window of ``max_length`` tokens of ``txt``.

    Item ``i`` is ``(input_ids [T], target_ids [T])``, the window starting at token
    ``i * stride`` and the same window one token later. ``<|endoftext|>`` in the
    text is encoded as its special token (id 50256), as in the book. A text of
    ``max_length`` tokens or fewer has no window (its last input token would have
    no target): ValueError.
    """

    def __init__(self, txt: str, tokenizer, max_length: int, stride: int):
        if max_length < 1 or stride < 1:
            raise ValueError(f"max_length and stride must be at least 1, found {max_length} and {stride}")
        token_ids = tokenizer.encode(txt, allowed_special={END_OF_TEXT})
        if len(token_ids) <= max_length:
            raise ValueError(f"the text has {len(token_ids):,} tokens, too few for one training window: a window "
                             f"of {max_length} tokens needs {max_length + 1} (each input token's next token is "
                             "its target); use a longer text or a shorter context length")
        starts = range(0, len(token_ids) - max_length, stride)  # the book's range: each window has its target
        ids = torch.tensor(token_ids, dtype=torch.long)
        self.input_ids = torch.stack([ids[start:start + max_length] for start in starts])
        self.target_ids = torch.stack([ids[start + 1:start + max_length + 1] for start in starts])
        self.num_tokens = len(token_ids)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.input_ids[index], self.target_ids[index]


def create_dataloader(text: str, batch_size: int = 4, max_length: int = 256, stride: int = 128,
                      shuffle: bool = True, drop_last: bool = True, num_workers: int = 0,
                      tokenizer=None) -> DataLoader:
    """The book's ``create_dataloader_v1``: batches ``(inputs [B, T], targets [B, T])`` of ``text``.

    ``tokenizer`` defaults to GPT-2's (``generation.get_tokenizer``). With
    ``shuffle`` the order is drawn from PyTorch's global generator each time the
    loader is iterated: seed it (``torch.manual_seed``) for the book's batches.
    """
    dataset = SlidingWindowDataset(text, tokenizer or get_tokenizer(), max_length, stride)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=num_workers)


def split_text(text: str, train_ratio: float = 0.90) -> tuple[str, str]:
    """``(training, validation)`` text: the first ``train_ratio`` of the characters, and the rest (the book)."""
    if not 0 < train_ratio < 1:
        raise ValueError(f"train_ratio must lie strictly between 0 and 1, found {train_ratio}")
    split_index = int(train_ratio * len(text))
    return text[:split_index], text[split_index:]


def read_text_file(path: str | Path) -> str:
    """The contents of a UTF-8 text file; a clear ValueError for an empty, binary or non-UTF-8 file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no text file at {path}; pass a UTF-8 text file or 'the-verdict'")
    data = path.read_bytes()
    if b"\x00" in data:
        raise ValueError(f"{path} looks like a binary file (it contains NUL bytes); pass a UTF-8 text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text (byte {error.start} is {data[error.start:error.start + 1]!r}); "
                         "convert it to UTF-8 first, e.g. iconv -t UTF-8") from None
    if not text.strip():
        raise ValueError(f"{path} is empty" + ("" if not text else " (only white space)")
                         + "; pass a file with some text to train on")
    return text


def the_verdict(data_dir: str | Path = "data", base_url: str | None = None) -> Path:
    """The path of "The Verdict" in ``data_dir/the-verdict/``, downloaded (and verified) on first use.

    ``base_url`` replaces the book repository's address (for a mirror, or a local server in tests).
    """
    url = VERDICT_URL if base_url is None else base_url.rstrip("/") + "/the-verdict.txt"
    return download_file([url], Path(data_dir) / VERDICT_NAME / "the-verdict.txt", expected_size=VERDICT_BYTES,
                         expected_sha256=VERDICT_SHA256, desc="the-verdict.txt")


def load_text(source: str | Path, data_dir: str | Path = "data", base_url: str | None = None) -> str:
    """The text to train on: ``"the-verdict"`` (downloaded on first use) or a UTF-8 file's path."""
    if str(source) == VERDICT_NAME:
        source = the_verdict(data_dir, base_url)
    return read_text_file(source)
