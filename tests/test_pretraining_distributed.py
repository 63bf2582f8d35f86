"""Pretraining under torchrun: two CPU processes (gloo, loopback) train as one with the same global batch."""

import json

import pytest
import torch
from test_distributed import group_of_one, run_under_torchrun  # noqa: F401 (group_of_one is a fixture)


def test_two_processes_pretrain_as_one(tmp_path, run_cli, group_of_one):  # noqa: F811
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)  # a tiny "pretrained" GPT-2 without dropout, so that both runs draw nothing at random
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=50257, resid_pdrop=0,
                               embd_pdrop=0, attn_pdrop=0)).save_pretrained(tmp_path / "base")
    text = tmp_path / "text.txt"
    text.write_text("Every effort moves you forward, one small step at a time. " * 60, encoding="utf-8")
    arguments = ["pretrain", "--text", str(text), "--model", str(tmp_path / "base"), "--method", "lora", "--rank", "4",
                 "--context-length", "32", "--batch-size", "4", "--epochs", "2", "--eval-freq", "2", "--eval-iter", "2",
                 "--lr", "1e-2", "--sample-tokens", "5", "--device", "cpu"]
    output = run_under_torchrun(2, [*arguments, "--out", str(tmp_path / "two")])
    assert output.count("trainable parameters") == 1  # rank 0 reports, rank 1 is silent

    assert run_cli([*arguments, "--out", str(tmp_path / "one")])[0] == 0  # one process, in a group of one
    one, two = (json.loads((tmp_path / run / "metrics.json").read_text())["history"] for run in ("one", "two"))
    for key in ("tokens_seen", "global_step", "epochs_done", "track_tokens_seen"):
        assert one[key] == two[key], key
    assert one["val_losses"] == pytest.approx(two["val_losses"], abs=1e-5)
    assert one["train_losses"][-1] < one["train_losses"][0]  # it learned
