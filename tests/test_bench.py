"""``gptlora bench``, the hardware facts and the computed memory table, on the CPU with tiny models: the
structure of the output and finite positive numbers (never timings: those are bench/'s)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gptlora.benchmark import available_options, format_rows, run_bench
from gptlora.infra.hardware import flops_per_token, measured_matmul_flops, mfu, model_flops_per_token, peak_flops
from gptlora.infra.memory_estimate import ACTIVATIONS_OUTSIDE_BLOCKS, ACTIVATIONS_PER_BLOCK, finetune_memory
from gptlora.model import GPTConfig, GPTModel

from conftest import run_cli_on_one_thread
from test_prefix_cache import one_thread  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only waits on a loaded machine

TINY = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0)


def test_the_peak_table_finds_devices_by_name_and_knows_what_it_does_not_know():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989.4e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12  # the more specific row first
    assert peak_flops("NVIDIA H200", "tf32") == 494.7e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5e12
    assert peak_flops("Tesla T4", "bf16") == 65e12 and peak_flops("Tesla T4", "tf32") is None
    assert peak_flops("NVIDIA GeForce RTX 4090", "fp16") == 165.2e12
    assert peak_flops("Apple M1 Max", "fp32") == 10.4e12 and peak_flops("Apple M1 Max", "bf16") is None
    assert peak_flops("cpu", "fp32") is None and mfu(1000.0, 10**9, None) is None


def test_flops_per_token_is_six_n_plus_attention():
    # nanoGPT's estimate for gpt2-small at 1024 tokens: 6 x 124.3M (position embeddings left out) + 12 L D T.
    assert flops_per_token(124_337_664, 12, 768, 1024) == 6 * 124_337_664 + 12 * 12 * 768 * 1024
    model = GPTModel(TINY)
    parameters = sum(p.numel() for p in model.parameters()) - 16 * 32
    assert model_flops_per_token(model, 16) == 6 * parameters + 12 * 2 * 32 * 16
    assert mfu(2000.0, 5 * 10**8, 1e12) == pytest.approx(1.0)


def test_the_measured_matmul_rate_is_a_positive_finite_number():
    rate = measured_matmul_flops("cpu", size=64, repeats=2)
    assert math.isfinite(rate) and rate > 0


def test_run_bench_gives_one_row_per_option_against_fp32():
    rows = run_bench(TINY, "cpu", batch_size=2, steps=2, generate_tokens=3,
                     options=["bf16", "fp32+checkpointing"], progress=False, matmul_size=64)
    assert [row.option for row in rows] == ["fp32", "bf16", "fp32+checkpointing"]
    assert rows[0].speedup == 1.0
    for row in rows:
        assert math.isfinite(row.train_tokens_per_s) and row.train_tokens_per_s > 0
        assert math.isfinite(row.generate_tokens_per_s) and row.generate_tokens_per_s > 0
        assert row.speedup > 0 and row.mfu_of_measured > 0
        assert row.mfu_of_peak is None and row.peak_memory_mb is None  # a CPU: no table row, no allocator
    table = format_rows(rows).splitlines()
    assert table[0].split()[:3] == ["option", "train", "tok/s"] and len(table) == 4
    # fp16 needs loss scaling (CUDA); tf32 is CUDA's: neither is offered on a CPU.
    assert {"tf32", "fp16"}.isdisjoint(available_options("cpu")) and "fp32" in available_options("cpu")


def test_the_bench_command_prints_its_rows(capsys):
    code, printed = run_cli_on_one_thread(["bench", "--model", "gpt2-small", "--layers", "1", "--batch-size", "1",
                                     "--context-length", "8", "--steps", "1", "--generate-tokens", "2",
                                     "--options", "fp32", "--device", "cpu", "--json"])
    assert code == 0
    assert printed.splitlines()[0] == ("gpt2-small (1 blocks), random weights, batch 1 x 8 tokens, 1 steps, on cpu")
    rows = json.loads(printed.split("\n", 1)[1])
    assert [row["option"] for row in rows] == ["fp32"] and rows[0]["train_tokens_per_s"] > 0
    code, _ = run_cli_on_one_thread(["bench", "--options", "fp64", "--device", "cpu"])
    assert code == 1 and "--options: unknown fp64; expected some of fp32, tf32" in capsys.readouterr().err


def test_the_activation_count_is_what_autograd_keeps():
    """The memory table's 16 x D per token per block is the float32 numbers autograd saves for one block
    (the tensors it keeps, each counted once), measured with saved-tensor hooks on the CPU."""
    config = GPTConfig(vocab_size=97, context_length=8, emb_dim=32, n_heads=2, n_layers=3, drop_rate=0.0)
    model = GPTModel(config)
    tokens = torch.randint(0, 97, (2, 8))
    saved = {}

    def keep(tensor):
        if tensor.is_floating_point() and tensor.numel() >= 8 * 32:  # activations, not norms' statistics
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        hidden = model.embed(tokens).detach().requires_grad_(True)  # a block's input, as inside the model
        output = model.trf_blocks[0](hidden)  # kept: its graph holds the saved tensors (no address reused)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    activations = sum(size for pointer, size in saved.items() if pointer not in weights)
    assert activations == ACTIVATIONS_PER_BLOCK * 2 * 8 * 32 * 4 and output.requires_grad
    # After the blocks: the final LayerNorm's input and output (the head's input).
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        logits = model.out_head(model.final_norm(hidden))
    assert sum(size for pointer, size in saved.items() if pointer not in weights) == (
        ACTIVATIONS_OUTSIDE_BLOCKS * 2 * 8 * 32 * 4) and logits.requires_grad


def test_the_memory_table_adds_up_from_tensor_sizes():
    full = finetune_memory("gpt2-small", "full")
    lora = finetune_memory("gpt2-small", "lora")
    qlora = finetune_memory("gpt2-small", "qlora")
    # The classifier's gpt2-small: 124,439,808 parameters less the tied head plus a fresh 768 x 2 head.
    parameters = 124_439_808 + 768 * 2 + 2
    assert full["weights"] == parameters * 4 and full["optimizer"] == 2 * full["gradients"] == 8 * parameters
    assert lora["gradients"] == 2_666_528 * 4  # the LoRA trainable count of classifier.prepare_for_classification
    quantized = 12 * (4 * 768 * 768 + 2 * 4 * 768 * 768)  # the blocks' linear weights: NF4, 0.5 byte + absmax
    assert qlora["weights"] == lora["weights"] - quantized * 4 + quantized // 2 + quantized // 64 * 4
    assert qlora["activations"] == lora["activations"] and qlora["workspace"] == 4 * 768 * 768 * 4
    checkpointed = finetune_memory("gpt2-small", "full", checkpointing=True)
    assert checkpointed["activations"] == 8 * 120 * (12 * 768 + 16 * 768 + 2 * 768) * 4
    assert all(value == sum(v for k, v in table.items() if k != "total")
               for table in (full, lora, qlora) for value in [table["total"]])
    sizes = [finetune_memory(name, "full")["total"] for name in ("gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl")]
    assert sizes == sorted(sizes)
    with pytest.raises(ValueError, match="method: expected one of full, lora, qlora, found 'dora'"):
        finetune_memory("gpt2-small", "dora")
