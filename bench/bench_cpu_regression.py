"""Nothing got slower on the CPU: the chapter-5 book run's first steps and a LoRA step, timed with another
checkout of gptlora (``--baseline``, e.g. the ``main`` branch's worktree) and with this one, side by side in
one run. Each timing runs in its own process with that checkout first on ``PYTHONPATH``; the two alternate,
``--repeats`` times each, and the medians are compared.

    .venv/bin/python bench/bench_cpu_regression.py --baseline ../main

- book: ``pretraining.train_language_model`` on The Verdict with the book's GPT_CONFIG_124M (context 256,
  batch 2, AdamW 4e-4, seed 123), the first ``--steps`` optimizer steps (evaluations every 5, as the book);
- lora: a gpt2-small-shaped model with rank-16 LoRA on every linear layer, ``--steps`` steps of
  ``training.train_epochs`` on batches of 8 x 120 random tokens (the chapter-6 batch).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs inside the timed process; only functions both checkouts have (the loop's defaults: fp32).
WORKLOAD = r'''
import json, sys, time
import torch
import torch.nn.functional as F
from gptlora.model import GPTConfig, GPTModel
torch.set_num_threads(int(sys.argv[3]))
kind, steps = sys.argv[1], int(sys.argv[2])
if kind == "book":
    from gptlora.generation import get_tokenizer
    from gptlora.pretraining import train_language_model
    from gptlora.text_data import create_dataloader, split_text
    text = open(sys.argv[4], encoding="utf-8").read()
    tokenizer = get_tokenizer()
    torch.manual_seed(123)
    train_text, val_text = split_text(text)
    train = create_dataloader(train_text, 2, 256, 256, shuffle=True, tokenizer=tokenizer)
    val = create_dataloader(val_text, 2, 256, 256, shuffle=False, drop_last=False, tokenizer=tokenizer)
    batches = [batch for _, batch in zip(range(steps), train)]
    torch.manual_seed(123)
    model = GPTModel(GPTConfig(context_length=256))
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    start = time.perf_counter()
    train_language_model(model, batches, val, optimizer, "cpu", 1, 5, 1, "Every effort moves you", tokenizer,
                         sample_tokens=1, verbose=False)
else:
    from dataclasses import dataclass
    from gptlora.lora import apply_lora
    from gptlora.training import train_epochs, trainable_adamw
    @dataclass
    class History:
        global_step: int = -1
        epochs_done: int = 0
        def count(self, n): pass
    torch.manual_seed(123)
    model = GPTModel(GPTConfig(context_length=120, qkv_bias=True, drop_rate=0.0))
    apply_lora(model, rank=16, alpha=16, verbose=False)
    optimizer = trainable_adamw(model, 8e-4, 0.1)
    batches = [torch.randint(0, 50257, (8, 121)) for _ in range(steps)]
    def batch_loss(batch):
        return F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()), batch.numel()
    start = time.perf_counter()
    train_epochs(model, batches, optimizer, 1, History(), batch_loss=batch_loss, eval_freq=10**9,
                 evaluate=lambda h: {}, end_epoch=lambda h, e: None, progress=False)
print(json.dumps({"seconds_per_step": (time.perf_counter() - start) / steps}))
'''


def time_once(checkout: Path, kind: str, steps: int, threads: int, text: Path) -> float:
    env = dict(os.environ, PYTHONPATH=str(checkout))
    done = subprocess.run([sys.executable, "-c", WORKLOAD, kind, str(steps), str(threads), str(text)],
                          capture_output=True, text=True, env=env, cwd=checkout)
    if done.returncode:
        raise SystemExit(f"{kind} with {checkout} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds_per_step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="the other checkout (e.g. ../main)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workloads", nargs="+", choices=("book", "lora"), default=("book", "lora"))
    parser.add_argument("--text", type=Path, default=ROOT.parent / "shared" / "data" / "the-verdict" / "the-verdict.txt")
    args = parser.parse_args()
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(ROOT.parent / "shared" / "tiktoken-cache"))
    print(f"| workload | baseline ({args.baseline}) s/step | this checkout s/step | ratio |")
    print("|---|---|---|---|")
    for kind in args.workloads:
        times = {"baseline": [], "this": []}
        for _ in range(args.repeats):  # alternate, so that a change in the machine's load hits both
            times["baseline"].append(time_once(args.baseline.resolve(), kind, args.steps, args.threads, args.text))
            times["this"].append(time_once(ROOT, kind, args.steps, args.threads, args.text))
        base, this = statistics.median(times["baseline"]), statistics.median(times["this"])
        print(f"| {kind} | {base:.3f} | {this:.3f} | {this / base:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
