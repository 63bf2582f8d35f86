"""DPO (chapter 12): one training step, full DPO (policy + frozen reference copy) vs LoRA DPO (one model, adapters).

The batches are the first training batches of the book's preference data (seed 123,
``--batch-size`` pairs, both answers padded to one width), on a GPT-2 of the chosen size
with random weights (speed does not depend on the values; nothing is downloaded). A step
is what ``preference.train_preference`` does through ``training.train_epochs``: the
policy's log-probabilities of both answers (one forward pass), the reference's (the frozen
copy, or the same model with its adapters off), the DPO loss, ``backward``, AdamW ``step``.
Memory: the peak rise of resident memory (CPU) or the peak of allocated CUDA memory while
the models are built and the first step runs: it holds the weights (twice for full DPO),
gradients, AdamW moments and activations. Time: best of several rounds, full and LoRA
alternating, so that the ratio is measured under the same load.

    .venv/bin/python bench/bench_preference.py                      # gpt2-small on the CPU
    .venv/bin/python bench/bench_preference.py --model gpt2-medium --device cuda --batch-size 8
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, PeakRSS, machine_line, print_table  # noqa: E402

from gptlora.generation import get_tokenizer  # noqa: E402
from gptlora.lora import apply_lora  # noqa: E402
from gptlora.model import GPTConfig, GPTModel, count_parameters  # noqa: E402
from gptlora.preference import dpo_batch, frozen_copy, on_device  # noqa: E402
from gptlora.preference_data import preference_loaders, read_preference_file, split_preference_data  # noqa: E402
from gptlora.training import trainable_adamw  # noqa: E402


def first_batches(count: int, batch_size: int, data_file: Path) -> list[dict]:
    """The first ``count`` training batches of the book's preference data (seed 123)."""
    train, val, test = split_preference_data(read_preference_file(data_file))
    torch.manual_seed(123)
    loader = preference_loaders(train, val, test, get_tokenizer(), batch_size=batch_size)[0]
    return [batch for _, batch in zip(range(count), loader)]


def build(method: str, model_name: str, device):
    """``(policy, reference or None, optimizer)``: GPT-2 as the book loads it for chapter 7, random weights."""
    torch.manual_seed(123)
    model = GPTModel(GPTConfig.from_preset(model_name, qkv_bias=True, drop_rate=0.0))
    model.tie_weights()
    reference = None
    if method == "lora":
        apply_lora(model, rank=16, alpha=16, verbose=False)
    else:
        reference = frozen_copy(model).to(device)
    model.to(device).train()
    return model, reference, trainable_adamw(model, 5e-6, 0.01)


def step(policy, reference, optimizer, batch) -> None:
    optimizer.zero_grad()
    dpo_batch(policy, batch, beta=0.1, reference=reference).loss.backward()
    optimizer.step()


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2-small", help="GPT-2 size, random weights (default: gpt2-small)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--batch-size", type=int, default=2, help="preference pairs per batch (default: 2)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round (default: 2)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds; the best counts (default: 2)")
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "preference-data" /
                        "instruction-data-with-preference.json", help="the book's preference data (default: ../shared)")
    args = parser.parse_args()
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken-cache"))
    device = torch.device(args.device)
    batches = [on_device(batch, device) for batch in first_batches(args.steps, args.batch_size, args.data)]
    built, memory = {}, {}
    for method in ("full", "lora"):  # one at a time: each one's memory is measured alone
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        with PeakRSS() as rss:
            built[method] = build(method, args.model, device)
            step(*built[method], batches[0])  # the first step allocates gradients and AdamW moments
            synchronize(device)
        memory[method] = torch.cuda.max_memory_allocated() if device.type == "cuda" else rss.rise
        if method == "full":  # measured; freed before the LoRA model is measured, rebuilt for the timing
            del built[method]
    built["full"] = build("full", args.model, device)
    seconds = {method: float("inf") for method in built}
    for _ in range(args.rounds):  # alternating, best of the rounds
        for method in ("full", "lora"):
            synchronize(device)
            start = time.perf_counter()
            for batch in batches:
                step(*built[method], batch)
            synchronize(device)
            seconds[method] = min(seconds[method], (time.perf_counter() - start) / len(batches))
    rows = [[method, "frozen copy" if built[method][1] is not None else "adapters off",
             f"{count_parameters(built[method][0], trainable_only=True):,}", f"{seconds[method]:.2f} s",
             f"{seconds['full'] / seconds[method]:.2f}x", f"{memory[method] / 2**20:,.0f} MiB",
             f"{memory[method] / memory['full']:.2f}"] for method in ("full", "lora")]
    shapes = ", ".join(str(tuple(batch["chosen"].shape)) for batch in batches)
    kind = "peak CUDA memory" if device.type == "cuda" else "peak RSS rise"
    print(f"Machine: {machine_line()}; device {device}")
    print_table(f"DPO step, {args.model} (random weights), the book's batches {shapes} (chosen and rejected each), "
                f"best of {args.rounds} rounds",
                ["method", "reference", "trainable", "step", "speed vs full", f"{kind}, build + first step",
                 "memory vs full"], rows)


if __name__ == "__main__":
    main()
