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


@pytest.fixture(scope="session")
def spam_data_dir(tmp_path_factory, spam_file) -> Path:
    """The book's three parquet splits of the real data, prepared once per session."""
    from gptlora.spam import prepare_spam_data

    return prepare_spam_data(tmp_path_factory.mktemp("spam"), source=spam_file)["train"].parent


@pytest.fixture(scope="session")
def small_spam_data_dir(tmp_path_factory, spam_data_dir) -> Path:
    """The first 120 / 44 / 40 rows of the real splits: 15 training batches of 8, for seconds-long runs."""
    import pandas as pd

    from gptlora.infra.manifest import write_manifest
    from gptlora.spam import MANIFEST_NAME, SPLIT_SEED, split_paths

    small = tmp_path_factory.mktemp("small-spam")
    for split, rows in (("train", 120), ("validation", 44), ("test", 40)):
        pd.read_parquet(spam_data_dir / f"{split}.parquet")[:rows].to_parquet(small / f"{split}.parquet", index=False)
    # Recorded, so that `gptlora finetune --data-dir` trusts these hand-made splits (no single source file).
    write_manifest(small / MANIFEST_NAME, f"the first rows of the splits in {spam_data_dir}", None, SPLIT_SEED,
                   split_paths(small))
    return small


def run_cli_on_one_thread(argv: list[str]) -> tuple[int, str]:
    """``gptlora ARGV`` in this process; its exit status and what it printed to stdout.

    One thread: for the tiny models of the tests a second one gains little, and when
    other processes share the cores its spin-waiting made training four times slower (measured).
    """
    import contextlib
    import io

    import torch

    from gptlora.cli import app as cli

    threads, stdout = torch.get_num_threads(), io.StringIO()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(stdout):
            status = cli.main(argv)
    finally:
        torch.set_num_threads(threads)
    return status, stdout.getvalue()


@pytest.fixture(scope="session")
def run_cli():
    """:func:`run_cli_on_one_thread`, for tests that run ``gptlora`` commands."""
    return run_cli_on_one_thread


@pytest.fixture(scope="session")
def tiny_spam_run(tmp_path_factory, spam_data_dir):
    """``gptlora finetune --method full`` of a 2-layer, 64-wide GPT from random weights: 3 epochs, lr 1e-3.

    About 30 s on one thread, so it runs once per session and is shared:
    test_classifier checks the run itself, test_finetune_lora uses the trained
    model as the base of a LoRA run. Returns ``status``, ``stdout`` (what the
    command printed), ``run`` (its directory), ``model_dir`` and ``data_dir``.
    """
    import json
    from types import SimpleNamespace

    from gptlora.formats.hf_layout import config_to_hf
    from gptlora.model import GPTConfig

    config = GPTConfig(vocab_size=50257, context_length=128, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0,
                       qkv_bias=True)
    root = tmp_path_factory.mktemp("tiny-spam")
    model_dir, run = root / "tiny", root / "run"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(config_to_hf(config)))
    status, stdout = run_cli_on_one_thread([
        "finetune", "--model", str(model_dir), "--random-init", "--method", "full", "--epochs", "3", "--lr", "1e-3",
        "--data-dir", str(spam_data_dir), "--out", str(run), "--device", "cpu"])
    return SimpleNamespace(status=status, stdout=stdout, run=run, model_dir=model_dir, data_dir=spam_data_dir,
                           config=config)


# ---------------------------------------------------------------- the real GPT-2 weights (optional)

@pytest.fixture(scope="session")
def gpt2_small_dir() -> Path:
    """The released gpt2-small (``config.json`` + ``model.safetensors``) named by GPTLORA_GPT2_DIR; skip without it."""
    value = os.environ.get("GPTLORA_GPT2_DIR")
    if not value:
        pytest.skip("set GPTLORA_GPT2_DIR to a directory holding the real gpt2-small config.json + "
                    "model.safetensors (see docs/pretrained-weights.md)")
    return Path(value)


def load_teach():
    """exercises/teach.py as a module (it is a script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("teach", REPO_ROOT / "exercises" / "teach.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """``build(master)``: an exercise master built by ``teach.build`` (otter assign, once per session), as its
    output folder holding ``student/``, ``autograder/`` (the solutions) and ``autograder.zip``."""
    teach, out, folders = load_teach(), tmp_path_factory.mktemp("exercises-dist"), {}

    def build(master: Path) -> Path:
        if master.stem not in folders:
            folders[master.stem] = teach.build(master, out)
        return folders[master.stem]

    return build
