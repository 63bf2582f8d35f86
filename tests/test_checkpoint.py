"""Checkpoints: a run killed mid-epoch resumes to the uninterrupted run's weights and metrics;
damaged, foreign or half-written checkpoints and occupied run directories are refused."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gptlora.infra import checkpoint
from gptlora.cli import app as cli
from gptlora.infra.checkpoint import CHECKPOINT_NAME, Checkpointer, CheckpointError, read_checkpoint, read_checkpoint_values
from gptlora.classifier import calc_accuracy_loader, calc_loss_loader, train_classifier
from gptlora.recipes.finetune import RUN_FILES, finetune_spam, load_classifier, open_run_dir
from gptlora.model import GPTConfig, GPTModel

TINY_HF_CONFIG = {"vocab_size": 50257, "n_positions": 128, "n_embd": 64, "n_head": 4, "n_layer": 2}
TRAINING_BATCHES = 15  # per epoch in small_spam_data_dir (conftest)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    (directory / "config.json").write_text(json.dumps(TINY_HF_CONFIG))
    return directory


def finetune_args(tiny_dir, small_spam_data_dir, out):
    """Full fine-tuning of the tiny GPT for 2 epochs (30 steps), a checkpoint every 4 steps."""
    return ["finetune", "--model", str(tiny_dir), "--random-init", "--method", "full", "--epochs", "2",
            "--lr", "1e-3", "--eval-freq", "10", "--data-dir", str(small_spam_data_dir), "--device", "cpu",
            "--save-every", "4", "--out", str(out)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_dir, small_spam_data_dir, run_cli):
    """The reference: the same run, never interrupted (in this process, one thread)."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert run_cli(finetune_args(tiny_dir, small_spam_data_dir, out))[0] == 0
    return out


def run_outcome(run_dir):
    """What a finished run leaves: its weights and its metrics, without the wall-clock time."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics.pop("training_seconds")
    return load_file(run_dir / "classifier.safetensors"), metrics


def kill_at_first_mid_epoch_checkpoint(command, run_dir, timeout=120.0) -> dict:
    """Start ``command``; SIGKILL it as soon as ``run_dir`` holds a mid-epoch checkpoint; return its values."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None:
            if (run_dir / CHECKPOINT_NAME).is_file():
                if read_checkpoint_values(run_dir / CHECKPOINT_NAME)["position"]["batches_done"]:
                    process.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.01)
        process.wait(timeout=30)
        stderr = process.stderr.read().decode()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL, f"not killed mid-run (exit {process.returncode}):\n{stderr}"
    return read_checkpoint_values(run_dir / CHECKPOINT_NAME)


def test_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path, tiny_dir, small_spam_data_dir,
                                                                 uninterrupted, run_cli):
    run_dir = tmp_path / "killed"
    command = [sys.executable, "-m", "gptlora.cli", *finetune_args(tiny_dir, small_spam_data_dir, run_dir)]
    values = kill_at_first_mid_epoch_checkpoint(command, run_dir)
    position = values["position"]
    assert position["epoch"] == 0 and 0 < position["batches_done"] < TRAINING_BATCHES
    assert not (run_dir / "metrics.json").exists()

    # Every option but --resume comes from the checkpoint.
    status, printed = run_cli(["finetune", "--resume", str(run_dir), "--device", "cpu"])
    assert status == 0 and "test accuracy" in printed

    weights, metrics = run_outcome(run_dir)
    reference_weights, reference_metrics = run_outcome(uninterrupted)
    # Same operations on the same numbers in the same order, one thread each: equal to the last bit.
    assert weights.keys() == reference_weights.keys()
    for name in weights:
        assert torch.equal(weights[name], reference_weights[name]), name
    assert metrics == reference_metrics
    assert metrics["history"]["global_step"] == 29 and len(metrics["history"]["train_losses"]) == 3
    assert not [name for name in os.listdir(run_dir) if "tmp" in name]


def test_resume_refuses_another_model_or_method(uninterrupted, tiny_dir, small_spam_data_dir, tokenizer, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / CHECKPOINT_NAME).write_bytes((uninterrupted / CHECKPOINT_NAME).read_bytes())

    def resume(model, method):
        torch.manual_seed(123)
        finetune_spam(model, tokenizer, small_spam_data_dir, run_dir, method, epochs=2, lr=1e-3, eval_freq=10,
                      progress=False, resume=True)

    wider = GPTConfig(vocab_size=50257, context_length=128, emb_dim=64, n_heads=4, n_layers=3, drop_rate=0.0,
                      qkv_bias=True)
    with pytest.raises(CheckpointError, match=r"different run(.|\n)*config"):
        resume(GPTModel(wider), "full")
    same_shape = GPTConfig(**{**wider.to_dict(), "n_layers": 2})
    with pytest.raises(CheckpointError, match=r"different run(.|\n)*method: 'full' in the checkpoint, 'last-block'"):
        resume(GPTModel(same_shape), "last-block")


def test_damaged_checkpoints_are_refused_with_the_reason(uninterrupted, tmp_path):
    original = (uninterrupted / CHECKPOINT_NAME).read_bytes()
    read_checkpoint(uninterrupted / CHECKPOINT_NAME)  # the intact file reads

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(original[: len(original) // 2])
    with pytest.raises(CheckpointError, match="is damaged"):
        read_checkpoint(truncated)

    flipped = bytearray(original)
    flipped[-100] ^= 0xFF  # one byte of tensor data: the header still parses
    altered = tmp_path / "altered.safetensors"
    altered.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="SHA-256"):
        read_checkpoint(altered)

    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError):
        read_checkpoint_values(foreign)


def test_a_save_interrupted_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / CHECKPOINT_NAME
    checkpoint.save_checkpoint(path, {"weight": torch.ones(3)}, {"step": 1})

    def crash_halfway(tensors, filename, metadata=None):
        with open(filename, "wb") as half:
            half.write(b"\x12\x00")
        raise KeyboardInterrupt  # as a Ctrl-C in the middle of writing

    monkeypatch.setattr("safetensors.torch.save_file", crash_halfway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(path, {"weight": torch.zeros(3)}, {"step": 2})
    tensors, values = read_checkpoint(path)
    assert values == {"step": 1} and torch.equal(tensors["weight"], torch.ones(3))
    assert os.listdir(tmp_path) == [CHECKPOINT_NAME]


def test_an_occupied_out_dir_needs_overwrite_or_resume(uninterrupted, tiny_dir, small_spam_data_dir, tmp_path, capsys):
    before = {name: (uninterrupted / name).read_bytes() for name in os.listdir(uninterrupted)}
    assert cli.main(finetune_args(tiny_dir, small_spam_data_dir, uninterrupted)) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert {name: (uninterrupted / name).read_bytes() for name in os.listdir(uninterrupted)} == before

    # A resumed run keeps its options: another learning rate is refused before any work.
    assert cli.main(["finetune", "--resume", str(uninterrupted), "--lr", "0.5"]) == 1
    assert "--lr 0.5 differs from the run being resumed" in capsys.readouterr().err

    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        open_run_dir(tmp_path / "empty", resume=True, overwrite=False)
    occupied = tmp_path / "occupied"
    (occupied / "adapter").mkdir(parents=True)
    (occupied / "adapter" / "adapter_config.json").write_text("{}")
    for name in [*RUN_FILES, "notes.txt"]:
        if not (occupied / name).exists():
            (occupied / name).write_bytes(b"old run")
    open_run_dir(occupied, resume=False, overwrite=True, removes_old_run=False)  # a check only: nothing goes
    assert sorted(os.listdir(occupied)) == sorted([*RUN_FILES, "notes.txt"])
    open_run_dir(occupied, resume=False, overwrite=True)
    assert os.listdir(occupied) == ["notes.txt"]  # the old run's files, and only those


def test_overwrite_leaves_nothing_of_the_old_run_to_load(uninterrupted, small_spam_data_dir, tmp_path, capsys,
                                                         monkeypatch):
    """A bad --model is refused before --overwrite touches the old run; a run that fails after the
    directory was opened must not leave the old classifier to be loaded as its own."""
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    load_classifier(run_dir)  # the old run loads
    old_files = {name: (run_dir / name).read_bytes() for name in os.listdir(run_dir)}
    short = tmp_path / "short"
    short.mkdir()
    (short / "config.json").write_text(json.dumps({**TINY_HF_CONFIG, "n_positions": 16}))
    arguments = ["finetune", "--model", str(short), "--random-init", "--method", "full", "--data-dir",
                 str(small_spam_data_dir), "--device", "cpu", "--out", str(run_dir), "--overwrite"]
    assert cli.main(arguments) == 1
    assert "context length is 16" in capsys.readouterr().err  # checked before the directory is opened
    assert {name: (run_dir / name).read_bytes() for name in os.listdir(run_dir)} == old_files

    def training_fails(*args, **kwargs):
        raise ValueError("training stopped")

    monkeypatch.setattr("gptlora.recipes.finetune.train_classifier", training_fails)
    (short / "config.json").write_text(json.dumps(TINY_HF_CONFIG))
    assert cli.main(arguments) == 1
    assert "training stopped" in capsys.readouterr().err  # stopped after the directory was opened
    assert os.listdir(run_dir) == []
    with pytest.raises(FileNotFoundError, match="classifier.json not found"):
        load_classifier(run_dir)


def test_a_checkpoint_is_read_with_one_opening_of_the_file(uninterrupted, monkeypatch):
    import safetensors

    opened, original = [], safetensors.safe_open

    def counting_safe_open(*args, **kwargs):
        opened.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", counting_safe_open)
    tensors, values = read_checkpoint(uninterrupted / CHECKPOINT_NAME)
    assert len(opened) == 1 and values["position"]["epoch"] == 2 and tensors


class BatchRecorder(nn.Module):
    """A stand-in classifier, ``[B, T] -> [B, T, 2]``, that records the first id of each training row."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(1, 2)
        self.trained_on = []

    def forward(self, ids):
        if self.training:
            self.trained_on.append(ids[:, 0].tolist())
        return self.head(ids.unsqueeze(-1).float())


def test_the_loop_draws_the_books_shuffles_with_or_without_checkpoints(tmp_path):
    """The book's loop makes one iterator per epoch (``for batch in train_loader``) and one per
    evaluation; ours must draw the same shuffles from the global generator, checkpoints or not."""
    ids = torch.arange(24).view(12, 2)
    labels = torch.arange(12) % 2
    train = DataLoader(TensorDataset(ids, labels), batch_size=3, shuffle=True, drop_last=True)
    val = DataLoader(TensorDataset(ids, labels), batch_size=3)

    def ours(checkpoints_for):
        model = BatchRecorder()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(7)
        train_classifier(model, train, val, optimizer, "cpu", num_epochs=3, eval_freq=2, eval_iter=1,
                         checkpoints=checkpoints_for(model, optimizer))
        return model.trained_on

    def book():
        model, trained_on, step = BatchRecorder(), [], -1
        torch.manual_seed(7)
        for _ in range(3):
            for batch_ids, _ in train:
                trained_on.append(batch_ids[:, 0].tolist())
                step += 1
                if step % 2 == 0:
                    calc_loss_loader(train, model, "cpu", num_batches=1)
                    calc_loss_loader(val, model, "cpu", num_batches=1)
            calc_accuracy_loader(train, model, "cpu", num_batches=1)
            calc_accuracy_loader(val, model, "cpu", num_batches=1)
        return trained_on

    expected = book()
    assert ours(lambda model, optimizer: None) == expected
    path = tmp_path / CHECKPOINT_NAME
    assert ours(lambda model, optimizer: Checkpointer(path, model, optimizer, {}, save_every=1)) == expected


def test_an_epoch_end_that_is_also_a_save_every_step_is_saved_once(tmp_path, monkeypatch):
    ids = torch.arange(24).view(12, 2)
    train = DataLoader(TensorDataset(ids, torch.arange(12) % 2), batch_size=3, shuffle=True)  # 4 batches
    saved = []
    monkeypatch.setattr(checkpoint, "save_checkpoint",
                        lambda path, tensors, values: saved.append((values["position"]["epoch"],
                                                                    values["position"]["batches_done"])))
    model = BatchRecorder()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_classifier(model, train, train, optimizer, "cpu", num_epochs=2, eval_freq=10, eval_iter=1, progress=False,
                     checkpoints=Checkpointer(tmp_path / CHECKPOINT_NAME, model, optimizer, {}, save_every=2))
    # Steps 2 and 4 of each epoch are save_every steps; step 4 ends the epoch, saved there once as its end.
    assert saved == [(0, 2), (1, 0), (1, 2), (2, 0)]
