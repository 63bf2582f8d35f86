"""The SMS Spam Collection: balance, split, and PyTorch loaders (the file itself: ``spam_file``).

The recipe is chapter 6 of "Build a Large Language Model (From Scratch)", step for
step, so the split is row-for-row the book's: read the 5,572 messages (4,825 ham,
747 spam), keep all 747 spam and a sample of 747 ham (``random_state=123``), map
ham -> 0 and spam -> 1, shuffle (``random_state=123``) and cut 70% / 10% / rest
into 1,045 / 149 / 300 rows. Each split is stored as a parquet file, which keeps
every text byte for byte (a CSV round trip may not).

Shapes: ``B`` batch size, ``T`` tokens per row (``max_length``, or the batch's
longest text with dynamic padding).
"""

from __future__ import annotations

import os
import warnings
from functools import partial
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .infra.atomic import replace_atomically
from .generation import END_OF_TEXT_ID
from .infra.locks import exclusive_lock, lock_path_for
from .infra.manifest import file_fingerprint, read_manifest, write_manifest
# The file's part of the chapter, importable from here too (``spam`` is the chapter's module):
from .formats.spam_file import (LABELS, SPAM_FILE_NAME, SPAM_FILE_SHA256, SPAM_FILE_SIZE, SPAM_URLS,  # noqa: F401
                                checked_uci_file, download_spam_file, extract_member, find_spam_file, is_uci_file,
                                read_sms_spam, spam_urls)

SPLITS = ("train", "validation", "test")


# --- balancing and splitting ------------------------------------------------------------

def balance_and_split(df: pd.DataFrame, seed: int = 123) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The book's balancing and 70/10/20 split of a ``Label``/``Text`` frame of ham/spam.

    Returns ``(train, validation, test)`` with labels mapped to 0 (ham) / 1 (spam).
    Too little data for that recipe is a ValueError that gives the counts found and needed.
    """
    spam = df[df["Label"] == "spam"]
    check_enough_for_the_split(int((df["Label"] == "ham").sum()), len(spam))
    ham = df[df["Label"] == "ham"].sample(len(spam), random_state=seed)
    balanced = pd.concat([ham, spam])
    balanced["Label"] = balanced["Label"].map(LABELS)
    shuffled = balanced.sample(frac=1, random_state=seed).reset_index(drop=True)
    train_end, validation_end = split_ends(len(shuffled))
    return shuffled[:train_end], shuffled[train_end:validation_end], shuffled[validation_end:]


def split_ends(rows: int) -> tuple[int, int]:
    """Where the book's training and validation splits end in ``rows`` shuffled rows (70%, then 10%)."""
    train_end = int(rows * 0.7)
    return train_end, train_end + int(rows * 0.1)


# The balanced set has 2 x spam rows; its validation split (10%, rounded down) is empty below 10 rows.
MIN_SPAM_MESSAGES = 5


def check_enough_for_the_split(ham: int, spam: int) -> None:
    """Raise a ValueError unless ``ham`` and ``spam`` messages are enough for the book's balanced split:
    at least :data:`MIN_SPAM_MESSAGES` spam (so that no split is empty) and at least as many ham."""
    if spam >= MIN_SPAM_MESSAGES and ham >= spam:
        return
    train_end, validation_end = split_ends(2 * spam)
    sizes = f"{train_end} / {validation_end - train_end} / {2 * spam - validation_end}"
    raise ValueError(f"found {ham} ham and {spam} spam messages: too few for the book's split, which keeps every "
                     f"spam message and as many ham, then cuts 70% / 10% / 20% (here {sizes} messages). It needs at "
                     f"least {MIN_SPAM_MESSAGES} spam and at least as many ham as spam; use a larger file "
                     "(the UCI collection has 4,825 ham and 747 spam)")


def split_paths(data_dir: str | Path) -> dict[str, Path]:
    """``{"train": .../train.parquet, "validation": ..., "test": ...}`` in ``data_dir``."""
    return {split: Path(data_dir) / f"{split}.parquet" for split in SPLITS}


MANIFEST_NAME = "spam_splits.json"  # beside the splits: what they were made from (see infra/manifest.py)
SPLIT_SEED = 123  # the book's random_state for the balancing sample and the shuffle


def prepare_spam_data(data_dir: str | Path = "data", source: str | Path | None = None) -> dict[str, Path]:
    """Make ``train.parquet``, ``validation.parquet`` and ``test.parquet`` in ``data_dir``.

    ``source`` is a local ``SMSSpamCollection`` or UCI zip; ``None`` reads
    ``$GPTLORA_SPAM_SOURCE`` or downloads. The splits are recorded in
    ``spam_splits.json`` (the source's path, size and SHA-256: the file named, a zip
    as the zip, or the downloaded ``SMSSpamCollection``; the split seed; each split's
    SHA-256) and reused only when that manifest checks out: with no source given,
    whatever source made them; with a source, only when it is that same file (by
    content), otherwise they are rebuilt from it, with a warning. A folder without
    a manifest, with a damaged one, or with a changed split is rebuilt. Each file is
    written to a temporary name and renamed, so an interrupted run leaves no half
    file; processes preparing the same folder at once take turns (``locks``).
    Returns ``{"train": path, "validation": path, "test": path}``.
    """
    data_dir = Path(data_dir)
    paths = split_paths(data_dir)
    manifest_path = data_dir / MANIFEST_NAME
    source = source or os.environ.get("GPTLORA_SPAM_SOURCE") or None
    if _recorded_splits(manifest_path, paths, source)[2]:  # no lock taken: a read-only folder works
        return paths
    with exclusive_lock(lock_path_for(manifest_path), f"preparing the spam splits in {data_dir}"):
        recorded, problem, serves = _recorded_splits(manifest_path, paths, source)  # another process's, maybe
        if serves:
            return paths
        raw = find_spam_file(data_dir, source)
        origin = Path(source) if source else raw  # the file named (a zip stays the zip) is the recorded source
        if recorded is not None:
            warnings.warn(f"the splits in {data_dir} were made from {recorded['source']}, not from {source}; "
                          "rebuilding them from it", stacklevel=2)
        elif any(path.exists() for path in paths.values()):
            warnings.warn(f"not reusing the splits in {data_dir}: {problem}; rebuilding them", stacklevel=2)
        frames = balance_and_split(read_sms_spam(raw), SPLIT_SEED)
        manifest_path.unlink(missing_ok=True)  # the old record goes first: a crash below leaves no false one
        for split, frame in zip(SPLITS, frames):
            with replace_atomically(paths[split]) as tmp:
                frame.to_parquet(tmp, index=False)
        write_manifest(manifest_path, origin.resolve(), file_fingerprint(origin), SPLIT_SEED, paths)
    return paths


def _recorded_splits(manifest_path: Path, paths: dict[str, Path], source) -> tuple[dict | None, str, bool]:
    """``(manifest, why not, serves)``: the folder's manifest (None, and the reason, when it does not check
    out) and whether its splits serve ``source``: any source when None; else only the recorded source file,
    compared by content (a zip as the zip itself, so checking extracts nothing and writes nothing)."""
    recorded, problem = read_manifest(manifest_path, paths, SPLIT_SEED)
    if recorded is None or source is None:
        return recorded, problem, recorded is not None
    source = Path(source)
    return recorded, "", source.is_file() and file_fingerprint(source)["sha256"] == recorded["source_sha256"]


# --- dataset and loaders ---------------------------------------------------------------

class SpamDataset(Dataset):
    """Token ids and labels of one split.

    ``max_length=None`` takes the longest text of this split (use it for the
    training split, then pass ``train.max_length`` to the others); longer texts
    are cut to ``max_length`` tokens. With ``pad=True`` (the book) every item is
    padded with ``pad_token_id`` to ``max_length``; with ``pad=False`` items keep
    their length, for :func:`pad_batch` to pad per batch.

    Item: ``(ids [max_length] or [n], label [])``, both ``torch.long``.
    """

    def __init__(self, parquet_or_dataframe, tokenizer, max_length: int | None = None,
                 pad_token_id: int = END_OF_TEXT_ID, pad: bool = True):
        data = parquet_or_dataframe
        if not isinstance(data, pd.DataFrame):
            data = pd.read_parquet(data)
        missing = {"Label", "Text"} - set(data.columns)
        if missing:
            raise ValueError(f"expected columns 'Label' and 'Text', missing {sorted(missing)} "
                             f"(found {list(data.columns)}); build splits with prepare_spam_data()")
        self.labels = [int(label) for label in data["Label"]]
        encoded = [tokenizer.encode(text) for text in data["Text"]]
        self.max_length = max_length or max(len(ids) for ids in encoded)
        self.encoded_texts = [ids[: self.max_length] for ids in encoded]
        self.pad_token_id, self.pad = pad_token_id, pad

    def __getitem__(self, index):
        ids = self.encoded_texts[index]
        if self.pad:
            ids = ids + [self.pad_token_id] * (self.max_length - len(ids))
        return torch.tensor(ids, dtype=torch.long), torch.tensor(self.labels[index], dtype=torch.long)

    def __len__(self):
        return len(self.labels)


def pad_batch(items, pad_token_id: int = END_OF_TEXT_ID):
    """Collate unpadded items into ``(ids [B, T], labels [B], lengths [B])``, T = the longest item.

    Padding goes on the right: in a causal model no real token attends to a pad,
    so the logits at position ``lengths - 1`` are those of the unpadded text.
    Items may also be float rows ``[n, D]`` (cached hidden states, see
    ``prefix_cache``): they are padded with zeros to ``[B, T, D]``.
    """
    first = items[0][0]
    fill = pad_token_id if not first.is_floating_point() else 0.0
    lengths = torch.tensor([len(ids) for ids, _ in items])
    ids = first.new_full((len(items), int(lengths.max()), *first.shape[1:]), fill)
    for row, (item_ids, _) in enumerate(items):
        ids[row, : len(item_ids)] = item_ids
    return ids, torch.stack([label for _, label in items]), lengths


class LengthBucketBatchSampler(Sampler):
    """Shuffled batches of messages of similar length, so that dynamic padding pads little.

    Each epoch: shuffle all indices, drop the last ``len % batch_size`` of them when
    ``drop_last`` (as a shuffled ``DataLoader`` does: a different few each epoch), cut
    the rest into pools of ``pool_batches`` batches, sort each pool by length, cut it
    into batches, and shuffle the order of all the batches. The seed of each epoch is
    drawn from PyTorch's global generator (as ``DataLoader(shuffle=True)`` does) unless
    a ``generator`` is given, so ``torch.manual_seed`` reproduces the batches.

    ``lengths``: tokens per item. Yields lists of ``batch_size`` indices (the last
    one shorter when ``drop_last`` is false).
    """

    def __init__(self, lengths, batch_size: int, drop_last: bool = True, pool_batches: int = 16,
                 generator: torch.Generator | None = None):
        if batch_size < 1 or pool_batches < 1:
            raise ValueError(f"batch_size and pool_batches must be at least 1, found {batch_size} and {pool_batches}")
        self.lengths = torch.as_tensor(lengths)
        self.batch_size, self.drop_last, self.pool_batches, self.generator = batch_size, drop_last, pool_batches, generator

    def __len__(self):
        full, rest = divmod(len(self.lengths), self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __iter__(self):
        generator = self.generator
        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
        order = torch.randperm(len(self.lengths), generator=generator)
        if self.drop_last:
            order = order[: len(self) * self.batch_size]
        batches = []
        for pool in order.split(self.pool_batches * self.batch_size):
            by_length = pool[torch.argsort(self.lengths[pool], stable=True)]
            batches.extend(by_length.split(self.batch_size))
        for position in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[position].tolist()


def create_dataloaders(data_dir: str | Path, tokenizer, batch_size: int = 8, max_length: int | None = None,
                       dynamic_padding: bool = False, num_workers: int = 0, pad_token_id: int = END_OF_TEXT_ID,
                       bucket_by_length: bool = False):
    """``(train_loader, val_loader, test_loader)`` over the parquet splits in ``data_dir``.

    As in the book: training batches are shuffled and the last incomplete one is
    dropped (130 / 19 / 38 batches at ``batch_size=8``); validation and test use
    the training split's ``max_length`` (120). Shuffling draws from PyTorch's
    global generator, so ``torch.manual_seed(123)`` before training reproduces
    the book's order. A batch is ``(ids [B, T], labels [B])``.

    ``dynamic_padding=True`` (beyond the book) pads each batch only to its own
    longest text and adds ``lengths [B]``, the count of real tokens per row, so
    the classifier reads the last real token instead of the last position.
    ``bucket_by_length=True`` (with dynamic padding) draws the training batches
    from :class:`LengthBucketBatchSampler`, so each batch holds similar lengths.
    """
    if bucket_by_length and not dynamic_padding:
        raise ValueError("bucket_by_length=True needs dynamic_padding=True: with every row padded to "
                         "max_length, grouping by length saves nothing")
    paths = split_paths(data_dir)
    for path in paths.values():
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; run prepare_spam_data({str(data_dir)!r}) first")
    make = partial(SpamDataset, tokenizer=tokenizer, pad_token_id=pad_token_id, pad=not dynamic_padding)
    train = make(paths["train"], max_length=max_length)
    val = make(paths["validation"], max_length=train.max_length)
    test = make(paths["test"], max_length=train.max_length)
    collate = partial(pad_batch, pad_token_id=pad_token_id) if dynamic_padding else None
    loader = partial(DataLoader, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    if bucket_by_length:
        lengths = [len(ids) for ids in train.encoded_texts]
        train_loader = DataLoader(train, batch_sampler=LengthBucketBatchSampler(lengths, batch_size, drop_last=True),
                                  num_workers=num_workers, collate_fn=collate)
    else:
        train_loader = loader(train, shuffle=True, drop_last=True)
    loaders = train_loader, loader(val, drop_last=False), loader(test, drop_last=False)
    for split, each in zip(SPLITS, loaders):  # an empty loader would train on nothing or report nan%
        if len(each) == 0:
            raise ValueError(f"the {split} split in {data_dir} has {len(each.dataset)} messages, fewer than one "
                             f"batch of {batch_size}; use a smaller --batch-size or more data")
    return loaders
