"""Shared test set-up: offline defaults and fixtures for the files in ../shared."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"

# Everything runs offline: tiktoken reads its cached files, transformers never calls the Hub.
if (SHARED / "tiktoken-cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken-cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def tokenizer():
    from gptlora.generation import get_tokenizer

    return get_tokenizer()


@pytest.fixture(scope="session")
def spam_file() -> Path:
    """The real UCI SMS Spam Collection, as a user would have downloaded it."""
    path = SHARED / "data" / "sms_spam_collection" / "SMSSpamCollection"
    if not path.is_file():
        pytest.skip(f"the SMS Spam Collection is not at {path}; see ../shared/README.md")
    return path
