"""The speed benchmark: gptlora against transformers (+ peft), and the work-saving options, in one run.

    .venv/bin/python bench/run.py                      # everything, about 10 minutes on 2 cores
    .venv/bin/python bench/run.py --quick              # every section, small sizes: a check that it runs
    .venv/bin/python bench/run.py --sections steps,load

Sections (random-weight gpt2-small throughout; nothing is downloaded):
  steps     training step (batch 8 x 120), full / last-block / LoRA r16, ours vs transformers (+ peft),
            and the share of the measured matmul rate each reaches (FLOP formulas: bench_model.step_flops)
  epoch     one epoch of the book's spam training split, last-block: plain vs frozen-prefix cache vs
            dynamic padding with length bucketing vs both (time, padded tokens, peak memory)
  generate  greedy generation tokens/s, KV cache vs none vs transformers' generate
  load      load time and peak-RSS rise vs checkpoint size, each load in a fresh process
  quantize  quantized bases (bench_quantization): memory fp32 / int8 / NF4 (gpt2-small, gpt2-xl), logits
            error over the spam test split, LoRA step on an NF4 base, int8 generation vs transformers
  pretrain  the book's pretraining step (GPT_CONFIG_124M, batch 2 x 256, + AdamW) vs transformers, and the
            wall time of the whole 10-epoch run on The Verdict (--pretrain-epochs; 0 skips it)
Every comparison is a ratio against a reference measured in the same run (candidates
alternate, best of several rounds), so a busy machine moves both sides; absolute
seconds are context only. The closing table says whether each target is met.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, machine_line, print_table, verdict  # noqa: E402

SECTIONS = ("steps", "epoch", "generate", "load", "quantize", "pretrain")

# Offline, as the tests run: tiktoken reads the cached gpt2 files, transformers never calls the Hub.
if (SHARED / "tiktoken-cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken-cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes (1 timed step, 40 messages per split, 20 new tokens): checks, not numbers")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--new-tokens", type=int, default=100,
                        help="tokens the generation section produces (default: 100, the issues' setting)")
    parser.add_argument("--pretrain-epochs", type=int, default=10,
                        help="epochs of the book's pretraining run that the pretrain section times (default: 10)")
    args = parser.parse_args()
    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    if args.threads:
        torch.set_num_threads(args.threads)

    from bench_finetune import epoch_section
    from bench_model import build_pair, generation_section, load_section, steps_section
    from bench_pretrain import pretrain_section

    print(f"Machine: {machine_line()}")
    print("Command: " + " ".join(["python", "bench/run.py", *sys.argv[1:]]))
    start = time.perf_counter()
    tables, targets = [], []
    ours = theirs = None
    if {"steps", "generate", "load", "quantize"} & set(sections):
        ours, theirs = build_pair()
    for name in sections:
        if name == "steps":
            result = steps_section(ours, theirs, repeats=1 if args.quick else 3)
        elif name == "epoch":
            with tempfile.TemporaryDirectory() as work_dir:
                result = epoch_section(Path(work_dir), messages=40 if args.quick else None)
        elif name == "generate":
            result = generation_section(ours, theirs, new_tokens=20 if args.quick else args.new_tokens,
                                        repeats=1 if args.quick else 2)
        elif name == "quantize":
            from bench_quantization import quantization_section

            result = quantization_section(ours, theirs, new_tokens=20 if args.quick else args.new_tokens,
                                          repeats=1 if args.quick else 2, quick=args.quick)
        elif name == "pretrain":
            result = pretrain_section(repeats=1 if args.quick else 3, epochs=1 if args.quick else args.pretrain_epochs)
        else:
            result = load_section(ours, repeats=1 if args.quick else 2)
        tables += result[0]
        targets += result[1]
        for table in result[0]:
            print_table(*table)
        sys.stdout.flush()
    rows = [[what, measured, target, "-" if met is None else verdict(met)] for what, measured, target, met in targets]
    print_table("Targets (issue 7)" + (" -- quick run: sizes too small to judge" if args.quick else ""),
                ["what", "measured", "target", "verdict"], rows)
    print(f"\nTotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
