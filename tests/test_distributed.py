"""Distributed training: two CPU processes (gloo, loopback) train as one process with the same global batch."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

from gptlora.infra.distributed import Processes, set_sampler_epoch, shard_loaders

TINY_HF_CONFIG = {"vocab_size": 50257, "n_positions": 128, "n_embd": 64, "n_head": 4, "n_layer": 2}


def sharded(loaders, rank, world_size):
    return shard_loaders(loaders, Processes(rank, world_size, 0, torch.device("cpu"), distributed=True), seed=5)


def test_each_global_batch_is_split_between_the_processes():
    rows = TensorDataset(torch.arange(21))
    loaders = (DataLoader(rows, batch_size=4, shuffle=True, drop_last=True), DataLoader(rows, batch_size=4))
    single, first, second = sharded(loaders, 0, 1), sharded(loaders, 0, 2), sharded(loaders, 1, 2)
    orders = []
    for epoch in (0, 1):
        for loaders_of_one in (single, first, second):
            set_sampler_epoch(loaders_of_one[0], epoch)
        assert len(single[0]) == len(first[0]) == len(second[0]) == 5
        for whole, half, other_half in zip(single[0], first[0], second[0]):
            assert sorted(whole[0].tolist()) == sorted(half[0].tolist() + other_half[0].tolist())
        orders.append([batch[0].tolist() for batch in single[0]])
    assert orders[0] != orders[1]  # set_epoch reshuffles
    # Evaluation: every row once over both processes, batch j of both = batch j of one.
    for whole, half, other_half in zip(single[1], first[1], second[1]):
        assert sorted(whole[0].tolist()) == sorted(half[0].tolist() + other_half[0].tolist())
    assert sorted(torch.cat([b[0] for b in [*first[1], *second[1]]]).tolist()) == list(range(21))
    with pytest.raises(ValueError, match="multiple of 3"):
        sharded(loaders, 0, 3)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def loopback_env() -> dict:
    """One thread per process, and gloo talking over the loopback interface only."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"
    return env


def run_under_torchrun(nproc: int, arguments: list[str], timeout: float = 240) -> str:
    """``torchrun --nproc-per-node=NPROC -m gptlora.cli ARGUMENTS`` on 127.0.0.1; its output.

    The launcher and its workers run in their own process group, killed whole on
    a timeout or a failure, so no process outlives the test.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={nproc}",
               "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "gptlora.cli", *arguments]
    launcher = subprocess.Popen(command, env=loopback_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, text=True)
    try:
        output, _ = launcher.communicate(timeout=timeout)
    finally:
        if launcher.poll() is None or launcher.returncode != 0:
            try:
                os.killpg(launcher.pid, signal.SIGKILL)  # the launcher's group: it and its workers
            except ProcessLookupError:
                pass
            launcher.wait()
    assert launcher.returncode == 0, output
    return output


def run_without_agent(nproc: int, arguments: list[str], timeout: float,
                      program: tuple[str, ...] = ("-m", "gptlora.cli")) -> list[tuple[int, str]]:
    """``python -m gptlora.cli ARGUMENTS`` (or ``python PROGRAM ARGUMENTS``) as ``NPROC`` processes given
    RANK/WORLD_SIZE directly, as a cluster's launcher (Slurm's ``srun``) may start them; each one's
    ``(exit status, output)``.

    Unlike ``torchrun``, nothing here stops the others when one process exits: each
    must end on its own. Every process is killed after ``timeout`` seconds.
    """
    env = dict(loopback_env(), WORLD_SIZE=str(nproc), MASTER_PORT=str(free_port()))
    processes = [subprocess.Popen([sys.executable, *program, *arguments],
                                  env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for rank in range(nproc)]
    results, deadline = [], time.monotonic() + timeout
    try:
        for process in processes:
            output, _ = process.communicate(timeout=max(deadline - time.monotonic(), 0.1))
            results.append((process.returncode, output))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return results


@pytest.fixture
def tiny_dir(tmp_path):
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text(json.dumps(TINY_HF_CONFIG))
    return tmp_path / "tiny"


@pytest.fixture
def group_of_one(monkeypatch):
    """The environment of one process as torchrun would start it, for ``run_cli`` in this process."""
    for name, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(name, value)


def test_two_processes_train_as_one_with_the_same_global_batch(tmp_path, tiny_dir, small_spam_data_dir, run_cli,
                                                               group_of_one):
    arguments = ["finetune", "--model", str(tiny_dir), "--random-init", "--method", "full", "--epochs", "2",
                 "--lr", "1e-3", "--eval-freq", "5", "--batch-size", "8", "--data-dir", str(small_spam_data_dir),
                 "--device", "cpu"]
    output = run_under_torchrun(2, [*arguments, "--out", str(tmp_path / "two")])
    assert output.count("test accuracy") == 1  # rank 0 reports, rank 1 is silent

    # The reference: one process, as torchrun would start it, in a group of one (in this process).
    assert run_cli([*arguments, "--out", str(tmp_path / "one")])[0] == 0
    assert not torch.distributed.is_initialized()  # the command leaves the group it joined

    one, two = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("one", "two"))
    for key in ("examples_seen", "global_step", "epochs_done", "train_accs", "val_accs"):
        assert one["history"][key] == two["history"][key], key
    assert one["accuracy"] == two["accuracy"]
    # Two half-batch gradients averaged by all_reduce are the whole batch's gradient summed in another
    # order: float32 rounding, ~1e-7 relative per step. Over 30 AdamW steps we measured at most 1.2e-6
    # on any weight and 1e-7 relative on the losses; the bounds leave a factor of about 10.
    for key in ("train_losses", "val_losses"):
        assert one["history"][key] == pytest.approx(two["history"][key], rel=1e-6), key
    weights_one, weights_two = (load_file(tmp_path / run / "classifier.safetensors") for run in ("one", "two"))
    for name in weights_one:
        # Except the key biases: adding b to every key adds q.b to a whole row of attention scores,
        # which softmax ignores, so their true gradient is 0 and only rounding noise drives them.
        # Adam divides that noise by its own size: steps of about lr in either direction, so the
        # runs may part by up to lr (1e-3) per step (measured: 5.5e-4 after 30 steps).
        atol = 1e-3 * 30 if name.endswith("W_key.bias") else 1e-5
        torch.testing.assert_close(weights_two[name], weights_one[name], rtol=0, atol=atol, msg=name)
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))


def test_two_processes_train_on_cached_prefix_states_as_one_process_on_tokens(tmp_path, tiny_dir, small_spam_data_dir,
                                                                               run_cli, group_of_one):
    arguments = ["finetune", "--model", str(tiny_dir), "--random-init", "--method", "last-block", "--epochs", "2",
                 "--lr", "1e-3", "--eval-freq", "5", "--batch-size", "8", "--data-dir", str(small_spam_data_dir),
                 "--device", "cpu"]
    run_under_torchrun(2, [*arguments, "--cache-prefix", "--out", str(tmp_path / "cached")])
    assert run_cli([*arguments, "--out", str(tmp_path / "tokens")])[0] == 0  # a group of one, no cache

    cached, tokens = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("cached", "tokens"))
    assert cached["cache_prefix"] is True
    # Epoch 2 must be shuffled anew (the DistributedSampler told of the epoch), else its batches,
    # and with them the losses and accuracies, would be epoch 1's order again.
    for key in ("examples_seen", "global_step", "train_accs", "val_accs"):
        assert cached["history"][key] == tokens["history"][key], key
    assert cached["accuracy"] == tokens["accuracy"]
    for key in ("train_losses", "val_losses"):  # float32 rounding: other sums (see the test above)
        assert cached["history"][key] == pytest.approx(tokens["history"][key], rel=1e-6), key


def test_a_check_failing_before_training_stops_every_process_with_its_message(tmp_path, tiny_dir,
                                                                              small_spam_data_dir):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("an earlier run's")
    arguments = ["finetune", "--model", str(tiny_dir), "--random-init", "--method", "full",
                 "--data-dir", str(small_spam_data_dir), "--device", "cpu", "--out", str(occupied)]
    # Checked by rank 0 alone, rank 1 went on to DDP's set-up and waited there for rank 0: a hang, or,
    # when gloo noticed rank 0 was gone, a traceback that did not say what was wrong.
    for rank, (status, output) in enumerate(run_without_agent(2, arguments, timeout=90)):
        assert status == 1, f"rank {rank}:\n{output}"
        assert "already holds files (notes.txt)" in output and "Traceback" not in output, f"rank {rank}:\n{output}"
    assert os.listdir(occupied) == ["notes.txt"]


# Both processes join a group whose timeout (3 s) is shorter than the local main process's preparation
# (8 s), as nccl's 10 minutes are shorter than downloading gpt2-xl. They first meet at a file barrier, so
# that joining itself (after importing torch, at different speeds) is not what the short timeout cuts.
PREPARE_LONGER_THAN_THE_TIMEOUT = """
import datetime, pathlib, sys, time
import torch.distributed as dist
from gptlora.infra.distributed import local_main_first, local_rank
meeting = pathlib.Path(sys.argv[1])
(meeting / str(local_rank())).touch()
while len(list(meeting.iterdir())) < 2:
    time.sleep(0.05)
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=3))
def prepare():
    if local_rank() == 0:
        time.sleep(8)  # downloading
    return f"rank {local_rank()} prepared"
print(local_main_first(prepare), flush=True)
dist.destroy_process_group()
"""


def test_the_others_wait_for_the_preparation_longer_than_the_groups_timeout(tmp_path):
    results = run_without_agent(2, [str(tmp_path)], timeout=90, program=("-c", PREPARE_LONGER_THAN_THE_TIMEOUT))
    for rank, (status, output) in enumerate(results):
        assert status == 0 and f"rank {rank} prepared" in output, f"rank {rank}:\n{output}"
