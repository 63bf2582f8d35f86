"""The SMS Spam Collection as a file: read and check it, or find it (a local copy, a zip) or download it.

Chapter 6 of "Build a Large Language Model (From Scratch)" starts from UCI's
``SMSSpamCollection``, ``label<TAB>text`` lines. This module gets that file onto the
disk and reads it into a DataFrame; :mod:`gptlora.spam` balances and splits it and
makes the PyTorch loaders.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import warnings
import zipfile
from pathlib import Path

import pandas as pd

from ..infra.atomic import replace_atomically
from ..infra.download import DownloadError, download_file, sha256_of

# UCI first, then the mirror the book falls back to. GPTLORA_SPAM_URL (comma-separated) replaces both.
SPAM_URLS = [
    "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
    "https://f001.backblazeb2.com/file/LLMs-from-scratch/sms%2Bspam%2Bcollection.zip",
]
SPAM_FILE_NAME = "SMSSpamCollection"
SPAM_FILE_SIZE = 477_907  # bytes
SPAM_FILE_SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"
LABELS = {"ham": 0, "spam": 1}


# --- reading and checking the raw file ------------------------------------------------

def read_sms_spam(path: str | Path) -> pd.DataFrame:
    """Read a ``label<TAB>text`` file into a DataFrame with columns ``Label``, ``Text``.

    Parsed exactly as the book's ``pd.read_csv(path, sep="\\t", header=None)``
    does, quotes included (two quoted messages in the UCI file swallow the line
    after them, which is why 5,574 lines give 5,572 rows), but with Python's csv
    reader so that every problem can name its line. Raises ``ValueError`` for a
    wrong column count, an unknown label, an empty text or bytes that are not UTF-8.
    """
    path = Path(path)
    raw = path.read_bytes()
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ValueError(f"{path}, line {line}: not UTF-8 text ({error.reason} at byte {error.start}); "
                         "expected the UCI SMS Spam Collection, which is UTF-8") from None
    # newline="": split lines only at \n, \r\n or \r, as pandas does (str.splitlines would also split at
    # form feeds and Unicode line separators inside a message).
    rows, reader = [], csv.reader(io.StringIO(content, newline=""), delimiter="\t")
    for fields in reader:
        line = reader.line_num
        if len(fields) != 2:
            raise ValueError(f"{path}, line {line}: expected 2 tab-separated columns (label, text), "
                             f"found {len(fields)}: {fields!r:.120}")
        label, text = fields
        if label not in LABELS:
            raise ValueError(f"{path}, line {line}: unknown label {label!r}; expected one of {sorted(LABELS)}")
        if not text.strip():
            raise ValueError(f"{path}, line {line}: empty text; every message needs at least one character")
        rows.append((label, text))
    if not rows:
        raise ValueError(f"{path}: no messages found; expected lines of the form 'ham<TAB>text'")
    return pd.DataFrame(rows, columns=["Label", "Text"])


# --- getting the file: local copy, zip, or download -----------------------------------

def is_uci_file(path: Path) -> bool:
    """True when ``path`` is byte for byte the UCI ``SMSSpamCollection`` (size, then SHA-256)."""
    return path.stat().st_size == SPAM_FILE_SIZE and sha256_of(path) == SPAM_FILE_SHA256


def extract_member(zip_path: Path, member: str, dest: Path) -> Path:
    """Extract the archive member whose file name is ``member`` to ``dest``, atomically.

    Refuses the whole archive if any member would land outside ``dest``'s
    directory (an absolute path or ``..``, the "zip slip" attack): such an
    archive is not the one we asked for.
    """
    target_dir = dest.parent.resolve()
    with zipfile.ZipFile(zip_path) as archive:
        for name in archive.namelist():
            if not (target_dir / name).resolve().is_relative_to(target_dir):
                raise ValueError(f"{zip_path}: refusing to extract, member {name!r} would be written outside "
                                 f"{target_dir}; the archive is damaged or malicious")
        matches = [info for info in archive.infolist() if Path(info.filename).name == member and not info.is_dir()]
        if not matches:
            raise ValueError(f"{zip_path}: no member named {member!r}; found {archive.namelist()}")
        with replace_atomically(dest) as tmp, archive.open(matches[0]) as source, open(tmp, "wb") as out:
            shutil.copyfileobj(source, out)
    return dest


def spam_urls() -> list[str]:
    """Where the zip is downloaded from, in order: ``$GPTLORA_SPAM_URL`` (comma-separated URLs of the
    zip) if set, else UCI and the book's mirror."""
    override = os.environ.get("GPTLORA_SPAM_URL", "")
    return [url.strip() for url in override.split(",") if url.strip()] or list(SPAM_URLS)


def download_spam_file(data_dir: Path) -> Path:
    """Download the UCI zip into ``data_dir``, extract ``SMSSpamCollection`` and verify it."""
    try:
        zip_path = download_file(spam_urls(), data_dir / "sms_spam_collection.zip", desc="SMS Spam Collection")
    except DownloadError as error:  # same class (OfflineError stays OfflineError), one more way out
        report, _, details = str(error).partition("\n")  # the way out belongs in the report, its first line
        raise type(error)(f"{report}; or point --spam-source or GPTLORA_SPAM_SOURCE at a local "
                          f"{SPAM_FILE_NAME} file or UCI zip\n{details}") from error
    return checked_uci_file(extract_member(zip_path, SPAM_FILE_NAME, data_dir / SPAM_FILE_NAME), zip_path)


def checked_uci_file(path: Path, zip_path: Path) -> Path:
    """``path`` if it is the UCI file; otherwise delete it and the downloaded zip it came from, and raise.

    The zip's own checksum is not published, so this is where a damaged or changed
    download is caught; deleting both lets the next run download afresh.
    """
    if is_uci_file(path):
        return path
    size = path.stat().st_size
    path.unlink()
    zip_path.unlink()
    raise ValueError(f"the {SPAM_FILE_NAME} in the downloaded {zip_path} is not UCI's file (expected "
                     f"{SPAM_FILE_SIZE:,} bytes with SHA-256 {SPAM_FILE_SHA256}, found {size:,} bytes); both were "
                     "deleted. Run again to download afresh, or pass a good copy with --spam-source")


def find_spam_file(data_dir: Path, source: str | Path | None = None) -> Path:
    """The ``SMSSpamCollection`` to read: ``source`` (a file or a zip), else ``$GPTLORA_SPAM_SOURCE``,
    else a verified copy in ``data_dir``, else a fresh download.

    A local file that differs from UCI's is used with a warning: it is read, but
    the split will not be the book's.
    """
    source = source or os.environ.get("GPTLORA_SPAM_SOURCE")
    if not source:
        local = data_dir / SPAM_FILE_NAME
        return local if local.is_file() and is_uci_file(local) else download_spam_file(data_dir)
    source = Path(source)
    if source.is_dir():
        raise IsADirectoryError(f"SMS spam source {source} is a directory, not a file; pass the path of the "
                                f"{SPAM_FILE_NAME} file in it, or of the UCI zip")
    if not source.is_file():
        raise FileNotFoundError(f"SMS spam source {source} does not exist; pass the path of an "
                                f"{SPAM_FILE_NAME} file or of the UCI zip (or unset GPTLORA_SPAM_SOURCE to download)")
    if zipfile.is_zipfile(source):
        source = extract_member(source, SPAM_FILE_NAME, data_dir / SPAM_FILE_NAME)
    if not is_uci_file(source):
        warnings.warn(f"{source} is not byte for byte UCI's {SPAM_FILE_NAME} (sha256 {SPAM_FILE_SHA256[:12]}...); "
                      "using it, but the split will differ from the book's", stacklevel=3)
    return source
