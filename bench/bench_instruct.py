"""Instruction fine-tuning (book, chapter 7): one training step, full fine-tuning vs LoRA, in one run.

The batches are the book's: the first training batches of ``instruction-data.json``
(batch 8, seed 123, each padded to its longest record, about 60-80 tokens), on a
GPT-2 of the chosen size with random weights (the speed does not depend on the
values; nothing is downloaded). A step is what ``training.train_epochs`` does:
``zero_grad``, the loss (``pretraining.calc_loss_batch``, -100 targets ignored),
``backward``, AdamW ``step``. Full fine-tuning and LoRA (rank 16, alpha 16 on every
linear layer, the book's appendix E) alternate, best of several rounds, so the ratio
is measured under the same load. Memory: the peak rise of resident memory over the
timed steps on a CPU, the peak of allocated CUDA memory on a GPU (weights, gradients,
AdamW moments and activations together), over the first step, which allocates them.

    .venv/bin/python bench/bench_instruct.py                         # gpt2-small on the CPU
    .venv/bin/python bench/bench_instruct.py --model gpt2-medium --device cuda --rounds 10
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
from gptlora.instruction_data import instruction_loaders, read_instruction_file, split_instruction_data  # noqa: E402
from gptlora.lora import apply_lora  # noqa: E402
from gptlora.model import GPTConfig, GPTModel, count_parameters  # noqa: E402
from gptlora.pretraining import calc_loss_batch  # noqa: E402
from gptlora.training import trainable_adamw  # noqa: E402


def first_batches(count: int, data_file: Path):
    """The book's first ``count`` training batches (batch 8, seed 123)."""
    data = read_instruction_file(data_file)
    train, val, test = split_instruction_data(data)
    torch.manual_seed(123)
    loader = instruction_loaders(train, val, test, get_tokenizer(), batch_size=8)[0]
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == count:
            return batches
    return batches


def build(method: str, model_name: str, device) -> tuple[GPTModel, torch.optim.Optimizer]:
    """The model (random weights, no dropout, as the book loads GPT-2) and AdamW over what trains."""
    torch.manual_seed(123)
    model = GPTModel(GPTConfig.from_preset(model_name))
    model.tie_weights()  # as GPT-2 and load_pretrained: the head shares the token embedding
    if method == "lora":
        apply_lora(model, rank=16, alpha=16, verbose=False)
    model.to(device).train()
    return model, trainable_adamw(model, 5e-5, 0.1)


def time_steps(model, optimizer, batches, device) -> tuple[float, int]:
    """``(seconds per step, peak memory in bytes)`` of one pass over ``batches``."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss:
        start = time.perf_counter()
        for inputs, targets in batches:
            optimizer.zero_grad()
            calc_loss_batch(inputs, targets, model, device).backward()
            optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / len(batches)
    return seconds, torch.cuda.max_memory_allocated() if cuda else rss.rise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2-small", help="GPT-2 size, random weights (default: gpt2-small)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round (default: 4)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the best counts (default: 3)")
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "instruction-data" / "instruction-data.json",
                        help="the book's instruction-data.json (default: the one in ../shared)")
    args = parser.parse_args()
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken-cache"))
    device = torch.device(args.device)
    batches = [(x.to(device), y.to(device)) for x, y in first_batches(args.steps, args.data)]
    results = {}
    for method in ("full", "lora"):  # one model at a time: memory is measured alone
        model, optimizer = build(method, args.model, device)
        _, memory = time_steps(model, optimizer, batches[:1], device)  # the first step allocates the most
        seconds = min(time_steps(model, optimizer, batches, device)[0] for _ in range(args.rounds))
        results[method] = dict(seconds=seconds, memory=memory,
                               trainable=count_parameters(model, trainable_only=True))
        del model, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    full = results["full"]
    rows = [[method, f"{r['trainable']:,}", f"{1000 * r['seconds']:.1f} ms", f"{full['seconds'] / r['seconds']:.2f}x",
             f"{r['memory'] / 2**20:,.0f} MiB"] for method, r in results.items()]
    shapes = ", ".join(str(tuple(x.shape)) for x, _ in batches)
    memory = "peak CUDA memory, first step" if device.type == "cuda" else "peak RSS rise, first step"
    print(f"Machine: {machine_line()}; device {device}")
    print_table(f"instruction fine-tuning step, {args.model} (random weights), the book's batches {shapes}, "
                f"best of {args.rounds} rounds",
                ["method", "trainable", "step", "speed vs full", memory], rows)


if __name__ == "__main__":
    main()
