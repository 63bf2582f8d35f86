"""Several processes at once: one downloads while the others wait on a lock, a killed holder never blocks,
and torchrun's processes start from empty folders with one process per machine preparing first."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_download import PAYLOAD, LoopbackServer
from test_spam import uci_zip

from gptlora.infra.download import OFFLINE_ENV
from gptlora.infra.locks import exclusive_lock, lock_path_for
from gptlora.infra.manifest import file_fingerprint

DOWNLOAD_ONE_FILE = ("import sys; from gptlora.infra.download import download_file; "
                     "print(download_file([sys.argv[1]], sys.argv[2]))")


class HeldServer(LoopbackServer):
    """A loopback server that answers no request until ``release`` is set."""

    def __init__(self, files):
        super().__init__(files)
        self.release, self.arrived = threading.Event(), []

    def handle(self, handler):
        self.arrived.append(handler.path)
        self.release.wait(timeout=60)
        super().handle(handler)


def wait_until(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout_s} s for {what}")
        time.sleep(0.05)


def test_two_processes_downloading_one_file_fetch_it_once(tmp_path, monkeypatch):
    monkeypatch.delenv(OFFLINE_ENV, raising=False)
    dest = tmp_path / "weights" / "data.bin"
    with HeldServer({"/data.bin": PAYLOAD}) as server:
        def start(name):
            log = open(tmp_path / f"{name}.err", "w")
            return subprocess.Popen([sys.executable, "-c", DOWNLOAD_ONE_FILE, server.url + "/data.bin", str(dest)],
                                    stdout=subprocess.PIPE, stderr=log, text=True)

        first = start("first")
        try:
            wait_until(lambda: server.arrived, 60, "the first process's request")
            second = start("second")
            # Without the lock the second process would send its own request here instead of waiting.
            wait_until(lambda: "waiting for another process downloading" in (tmp_path / "second.err").read_text(),
                       60, "the second process to wait for the first")
        finally:
            server.release.set()
        outputs = [process.communicate(timeout=60)[0] for process in (first, second)]
    assert [process.returncode for process in (first, second)] == [0, 0], outputs
    assert [path for path, _ in server.requests] == ["/data.bin"]  # downloaded once
    assert outputs == [f"{dest}\n", f"{dest}\n"] and dest.read_bytes() == PAYLOAD
    assert sorted(path.name for path in dest.parent.iterdir()) == ["data.bin"]  # no .part, no .lock left


HOLD_THE_LOCK = ("import sys, time; from gptlora.infra.locks import exclusive_lock\n"
                 "with exclusive_lock(sys.argv[1], 'holding'):\n    print('held', flush=True); time.sleep(120)")


def start_holder(lock):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(lock)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def test_a_lock_held_by_a_killed_process_never_blocks(tmp_path):
    lock = lock_path_for(tmp_path / "model.safetensors")
    holder = start_holder(lock)
    acquired = threading.Event()

    def take_it():
        with exclusive_lock(lock, "testing"):
            acquired.set()

    waiter = threading.Thread(target=take_it, daemon=True)
    try:
        waiter.start()
        assert not acquired.wait(0.5)  # a live holder is waited for
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # no clean-up code runs in the holder
        holder.wait()
    assert acquired.wait(10)  # the kernel released the dead holder's lock
    waiter.join(10)
    assert not lock.exists()  # the next holder removed the file


def test_a_lock_file_left_by_a_killed_process_is_taken_at_once(tmp_path):
    lock = lock_path_for(tmp_path / "model.safetensors")
    holder = start_holder(lock)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert lock.exists()
    started = time.monotonic()
    with exclusive_lock(lock, "testing"):
        took = time.monotonic() - started
    assert took < 1 and not lock.exists()  # no waiting (it would print, and block until a timeout)


# ---------------------------------------------------------------- torchrun from empty folders

@pytest.fixture
def hub_and_uci(tmp_path_factory, spam_file):
    """A loopback server shaped like the Hub (config.json direct, weights via a CDN redirect) holding a tiny
    GPT-2 under the name gpt2-small, and UCI's zip."""
    import torch

    from gptlora.model import GPTConfig, GPTModel
    from gptlora.pretrained import save_hf

    torch.manual_seed(7)
    tiny = GPTModel(GPTConfig(vocab_size=50257, context_length=128, emb_dim=32, n_heads=2, n_layers=2,
                              drop_rate=0.0, qkv_bias=True))
    source = save_hf(tiny, tmp_path_factory.mktemp("tiny-hub") / "gpt2")
    repo = "/openai-community/gpt2/resolve/main"
    files = {f"{repo}/config.json": (source / "config.json").read_bytes(),
             "/cdn/model.safetensors": (source / "model.safetensors").read_bytes(), "/uci/spam.zip": uci_zip(spam_file)}
    with LoopbackServer(files) as server:
        server.redirects[f"{repo}/model.safetensors"] = "/cdn/model.safetensors"
        yield server


@pytest.mark.slow
def test_torchrun_from_empty_folders_prepares_once_and_trains_as_one_process(tmp_path, hub_and_uci, run_cli,
                                                                             monkeypatch):
    from test_distributed import free_port, run_under_torchrun

    for name in (OFFLINE_ENV, "GPTLORA_SPAM_SOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GPTLORA_HF_BASE_URL", hub_and_uci.url)
    monkeypatch.setenv("GPTLORA_SPAM_URL", hub_and_uci.url + "/uci/spam.zip")

    def arguments(folder):
        return ["finetune", "--model", "gpt2-small", "--models-dir", str(tmp_path / folder / "weights"),
                "--data-dir", str(tmp_path / folder / "data"), "--method", "last-block", "--epochs", "1",
                "--lr", "1e-3", "--eval-freq", "40", "--eval-iter", "2", "--device", "cpu",
                "--out", str(tmp_path / folder / "run")]

    output = run_under_torchrun(2, arguments("two"))
    assert output.count("test accuracy:") == 1
    assert "waiting for another process" not in output  # rank 1 waited at the barrier, not at a file lock
    fetched = [path for path, _ in hub_and_uci.requests]
    assert sorted(fetched) == sorted(["/openai-community/gpt2/resolve/main/config.json", "/uci/spam.zip",
                                      "/openai-community/gpt2/resolve/main/model.safetensors",
                                      "/cdn/model.safetensors"])  # each file once, by one process

    # The reference: one process from empty folders, in a group of one (in this process).
    for name, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    assert run_cli(arguments("one"))[0] == 0

    for relative in ("weights/gpt2-small/model.safetensors", "data/train.parquet", "data/test.parquet"):
        assert file_fingerprint(tmp_path / "one" / relative) == file_fingerprint(tmp_path / "two" / relative)
    one, two = (json.loads((tmp_path / folder / "run" / "metrics.json").read_text()) for folder in ("one", "two"))
    for key in ("examples_seen", "global_step", "train_accs", "val_accs"):
        assert one["history"][key] == two["history"][key], key
    assert one["accuracy"] == two["accuracy"]
    # Two half-batch gradients summed by all_reduce: float32 rounding only (see test_distributed.py).
    for key in ("train_losses", "val_losses"):
        assert one["history"][key] == pytest.approx(two["history"][key], rel=1e-6), key


def test_a_lock_file_another_user_left_behind_does_not_lock_others_out():
    # A killed holder's lock file keeps its owner and mode (0644 by the usual umask): another user can read
    # it but not write it. flock needs only an open file, so a read-only open must do.
    if not hasattr(os, "seteuid") or os.geteuid() != 0:
        pytest.skip("needs root, to act as two users")
    import shutil
    import tempfile

    shared = Path(tempfile.mkdtemp())  # in /tmp, which every user can enter (pytest's tmp_path is root's only)
    shared.chmod(0o777)  # a shared folder: everyone may create and remove files in it
    lock = lock_path_for(shared / "model.safetensors")
    lock.write_text("")
    lock.chmod(0o644)  # left by root's killed process
    os.seteuid(65534)  # now another user ("nobody")
    try:
        with exclusive_lock(lock, "testing"):
            taken = True
    finally:
        os.seteuid(0)
        removed = not lock.exists()
        shutil.rmtree(shared)
    assert taken and removed  # taken, and removed after (the folder is writable for everyone)


def test_without_fcntl_a_download_into_a_new_folder_still_works(tmp_path, monkeypatch):
    from gptlora.infra import download
    from gptlora.infra import locks

    monkeypatch.setattr(locks, "fcntl", None)  # as on Windows
    monkeypatch.setattr(download, "DEFAULT_BACKOFF_S", 0.0)
    monkeypatch.delenv(OFFLINE_ENV, raising=False)
    with LoopbackServer({"/data.bin": PAYLOAD}) as server:
        dest = download.download_file([server.url + "/data.bin"], tmp_path / "new" / "folder" / "data.bin")
    assert dest.read_bytes() == PAYLOAD


def test_a_failed_download_leaves_no_folder_it_made(tmp_path, monkeypatch):
    from gptlora.infra import download

    monkeypatch.setattr(download, "DEFAULT_BACKOFF_S", 0.0)
    monkeypatch.delenv(OFFLINE_ENV, raising=False)
    (tmp_path / "weights").mkdir()
    with LoopbackServer({}) as server, pytest.raises(download.DownloadError, match="HTTP 404"):
        download.download_file([server.url + "/data.bin"], tmp_path / "weights" / "gpt2-small" / "sub" / "data.bin")
    assert list(tmp_path.iterdir()) == [tmp_path / "weights"] and not any((tmp_path / "weights").iterdir())
