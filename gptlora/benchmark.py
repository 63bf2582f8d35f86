"""``gptlora bench``: how fast this machine trains and generates with a GPT-2 of a given size.

For each option the device can run (:func:`available_options`: precisions, gradient checkpointing,
``torch.compile``) it times training steps of the model with random weights on random tokens, and greedy
generation at batch 1, and reports against plain float32 in the same run:

- training tokens per second, and MFU (``infra.hardware``) against the device's published peak and
  against a matrix-product rate measured now in the same number format;
- generated tokens per second (batch 1, greedy, with the KV cache);
- peak memory of the training step (CUDA only: PyTorch's allocator counts it there).

The numbers are the step of ``training.train_epochs`` (the same ``Precision``, ``trainable_adamw`` and
model options), without its data loader and evaluations.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .generation import generate
from .infra.hardware import (device_name, measured_matmul_flops, model_flops_per_token, mfu, peak_flops,
                             synchronize)
from .infra.precision import AUTOCAST_DTYPES, Precision
from .infra.speed import compile_for_training, compile_unavailable, set_gradient_checkpointing
from .model import GPTConfig, GPTModel
from .training import trainable_adamw

OPTIONS = ("fp32", "tf32", "bf16", "fp16", "fp32+checkpointing", "bf16+compile")


@dataclass
class BenchRow:
    """One option's measurements (None: not measurable on this device)."""

    option: str
    train_tokens_per_s: float
    mfu_of_peak: float | None
    mfu_of_measured: float | None
    generate_tokens_per_s: float
    peak_memory_mb: float | None
    speedup: float = 1.0  # training tokens/s over plain fp32's, same run


def available_options(device) -> list[str]:
    """The options of :data:`OPTIONS` that ``device`` runs: tf32 and fp16 on CUDA only (fp16 needs its loss
    scaling, which CPUs do not need); bf16 where the device has it; compile where ``torch.compile`` works."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    keep = ["fp32", "fp32+checkpointing"]
    if cuda:
        keep += ["tf32", "fp16"]
    if not cuda or torch.cuda.is_bf16_supported():
        keep.append("bf16")
        if compile_unavailable(device) is None:
            keep.append("bf16+compile")
    return [option for option in OPTIONS if option in keep]


def bench_option(config: GPTConfig, option: str, device, batch_size: int, steps: int,
                 generate_tokens: int, matmul_size: int = 1024) -> BenchRow:
    """Time ``steps`` training steps (after one to warm up) and ``generate_tokens`` greedy tokens of a random
    ``config`` model under ``option`` (a precision, ``+checkpointing`` or ``+compile``); the matrix-product
    rate of ``matmul_size`` squared matrices in the option's number format."""
    device = torch.device(device)
    name, _, extra = option.partition("+")
    precision = Precision(name, device)
    torch.manual_seed(123)
    model = GPTModel(config).to(device)
    trained = model
    if extra == "checkpointing":
        set_gradient_checkpointing(model)
    elif extra == "compile":
        trained = compile_for_training(model, device)
    optimizer = trainable_adamw(model, 1e-4, 0.1)
    tokens = torch.randint(0, config.vocab_size, (batch_size, config.context_length + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step():
        optimizer.zero_grad()
        with precision.autocast():
            loss = F.cross_entropy(trained(inputs).flatten(0, 1), targets.flatten())
        precision.backward(loss)
        precision.step(optimizer)

    model.train()
    step()  # warm up (and compile)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(step, steps, device)
    train_rate = batch_size * config.context_length * steps / seconds
    memory = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    flops = model_flops_per_token(model, config.context_length)
    with precision.autocast():
        measured = measured_matmul_flops(device, AUTOCAST_DTYPES.get(precision.name, torch.float32), matmul_size)
    model.eval()
    prompt = tokens[:1, :1]
    with torch.no_grad(), precision.autocast():
        generate(model, prompt, 1)  # warm up
        gen_seconds = timed(lambda: generate(model, prompt, generate_tokens), 1, device)
    return BenchRow(option, train_rate, mfu(train_rate, flops, peak_flops(device_name(device), precision.name)),
                    mfu(train_rate, flops, measured), generate_tokens / gen_seconds, memory)


def timed(work, repeats: int, device) -> float:
    """Seconds for ``repeats`` calls of ``work``, the device's queue drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        work()
    synchronize(device)
    return time.perf_counter() - start


def run_bench(config: GPTConfig, device, batch_size: int = 8, steps: int = 10, generate_tokens: int = 64,
              options=None, progress: bool = True, matmul_size: int = 1024) -> list[BenchRow]:
    """:func:`bench_option` for each of ``options`` (default: all :func:`available_options`), fp32 first;
    each row's ``speedup`` is its training rate over fp32's."""
    options = list(options or available_options(device))
    if "fp32" in options:
        options.remove("fp32")
    rows = []
    for option in tqdm(["fp32", *options], desc="bench", unit="option", disable=not progress):
        rows.append(bench_option(config, option, device, batch_size, steps, generate_tokens, matmul_size))
        rows[-1].speedup = rows[-1].train_tokens_per_s / rows[0].train_tokens_per_s
    return rows


def format_rows(rows: list[BenchRow]) -> str:
    """The rows as a plain-text table (what ``gptlora bench`` prints)."""
    def percent(value):
        return "-" if value is None else f"{value:.1%}"

    lines = [f"{'option':<20} {'train tok/s':>12} {'vs fp32':>8} {'MFU peak':>9} {'MFU meas.':>10} "
             f"{'gen tok/s':>10} {'peak MiB':>9}"]
    for row in rows:
        memory = "-" if row.peak_memory_mb is None else f"{row.peak_memory_mb:,.0f}"
        lines.append(f"{row.option:<20} {row.train_tokens_per_s:>12,.0f} {row.speedup:>7.2f}x "
                     f"{percent(row.mfu_of_peak):>9} {percent(row.mfu_of_measured):>10} "
                     f"{row.generate_tokens_per_s:>10,.1f} {memory:>9}")
    return "\n".join(lines)


def rows_as_dicts(rows: list[BenchRow]) -> list[dict]:
    """The rows as JSON-ready dicts (``gptlora bench --json``)."""
    return [asdict(row) for row in rows]
