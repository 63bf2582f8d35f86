"""Full fine-tuning, last-block, LoRA, prompt, prefix and P-tuning, and DoRA on the spam task, side by side.

Runs ``gptlora.recipes.method_comparison.compare_methods`` on an offline tiny GPT (2 layers,
64 wide, random weights drawn under seed 123, as the tiny runs of docs/spam-classification.md, but with a
context of 256 rather than 128, so that 20 virtual tokens fit before the 120-token
messages) and prints one Markdown
table, plus the trainable parameters of each method on gpt2-small (counted on the
meta device). Step times are also given as a ratio to full fine-tuning's, measured
in the same run.

    .venv/bin/python bench/bench_peft_methods.py              # 3 epochs, the whole split (a few minutes)
    .venv/bin/python bench/bench_peft_methods.py --quick      # 1 epoch on the first 80 messages of each split

On random weights the accuracies say little about the methods (see docs/prompt-tuning.md).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

from bench_finetune import spam_splits
from common import SHARED, machine_line, print_table

from gptlora.classifier import METHODS
from gptlora.recipes.finetune import base_source, load_base
from gptlora.generation import get_tokenizer
from gptlora.formats.hf_layout import config_to_hf
from gptlora.recipes.method_comparison import COMPARED, compare_methods, trainable_on_meta
from gptlora.model import GPTConfig

TINY = GPTConfig(vocab_size=50257, context_length=256, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0,
                 qkv_bias=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 epoch on the first 80 messages of each split")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken-cache"))
    warnings.filterwarnings("ignore", message="the init text has")  # 12 tokens cut to... is expected here
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        data_dir = spam_splits(work, 80 if args.quick else None)
        model_dir = work / "tiny"
        model_dir.mkdir()
        (model_dir / "config.json").write_text(json.dumps(config_to_hf(TINY)))
        source = base_source(str(model_dir), random_init=True, seed=123)
        rows = compare_methods(lambda: load_base(source), data_dir, get_tokenizer(), work / "runs",
                               epochs=1 if args.quick else args.epochs)
    full_step = next(row["step_seconds"] for row in rows if row["method"] == "full")
    table = [[row["method"], f"{row['trainable']:,}", f"{trainable_on_meta(row['method']):,}",
              f"{row['saved_bytes']:,}", f"{1000 * row['step_seconds']:.1f} ms",
              f"{full_step / row['step_seconds']:.2f}x", f"{row['peak_memory_bytes'] / 2**20:.1f} MiB",
              f"{row['lr']:g}", " / ".join(f"{100 * row[split]:.2f}" for split in ("train", "validation", "test"))]
             for row in rows]
    print_table(f"spam task, tiny GPT from random weights, {1 if args.quick else args.epochs} epoch(s); "
                + machine_line(),
                ["method", "trainable (tiny)", "trainable (gpt2-small)", "bytes saved", "step [8, 120]",
                 "speed vs full", "peak memory rise", "lr", "accuracy % train / val / test"], table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    assert tuple(METHODS) == ("last-block", "full", "lora", "prompt-tuning", "prefix-tuning", "p-tuning")
    assert tuple(COMPARED) == (*METHODS, "dora")
    main()
