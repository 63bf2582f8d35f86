"""GPU timings: gptlora against transformers on one CUDA device, in one run.

    python bench/bench_cuda.py            # needs a CUDA device; about a minute on an H100/H200
    python bench/bench_cuda.py --quick    # small sizes: a check that it runs

Random-weight gpt2-small throughout (nothing is downloaded):
  step      one language-model training step (forward, backward, AdamW) on a batch of B x 1024 tokens,
            float32 and bfloat16 autocast, ours vs transformers' GPT2LMHeadModel (same weights), and the
            share of the bfloat16 matrix-product rate measured in the same run that each reaches
  generate  greedy generation with the KV cache, batch 1, tokens per second, ours vs transformers'
            ``generate``, float32 and bfloat16 weights
Each ratio compares candidates timed in turn in the same process (best of several rounds); the CUDA
clock is read after ``torch.cuda.synchronize``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import step_flops  # noqa: E402
from common import best_seconds, print_table  # noqa: E402

from gptlora.formats.hf_layout import config_from_hf, hf_to_gptlora  # noqa: E402
from gptlora.generation import generate  # noqa: E402
from gptlora.model import GPTModel  # noqa: E402


def synchronized(fn):
    """``fn`` followed by a wait for the GPU, so that wall time covers the GPU's work."""
    def run():
        fn()
        torch.cuda.synchronize()
    return run


def model_pair():
    """(ours, transformers') gpt2-small with the same random weights, on the GPU, float32."""
    import transformers

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(bos_token_id=0, eos_token_id=0))
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}
    cfg = config_from_hf(hf.config.to_dict())
    ours = GPTModel(cfg)
    ours.tie_weights()
    ours.load_state_dict(hf_to_gptlora(state, cfg), strict=False)
    return ours.cuda(), hf.cuda()


def training_step(model, logits_of, ids, dtype):
    """One step of next-token training: ``ids`` [B, T] -> loss on ids[:, 1:]; AdamW over every weight."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            logits = logits_of(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
    return synchronized(step)


def bf16_matmul_rate(n: int = 8192) -> float:
    """FLOP/s of an n x n x n bfloat16 matrix product on this GPU (best of a few)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    seconds = best_seconds({"mm": synchronized(lambda: a @ b)}, repeats=5, warmup=2)["mm"]
    return 2 * n**3 / seconds


def step_section(ours, hf, batch: int, repeats: int):
    ids = torch.randint(0, 50257, (batch, 1025), device="cuda")
    rate = bf16_matmul_rate()
    # step_flops counts the blocks; a language model's head adds 2 V D FLOPs per token forward, 6 V D with backward
    flops = step_flops(ours.cfg, "full", batch, 1024) + 6 * batch * 1024 * ours.cfg.vocab_size * ours.cfg.emb_dim
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        times = best_seconds({"ours": training_step(ours, ours, ids, dtype),
                              "transformers": training_step(hf, lambda x: hf(x).logits, ids, dtype)},
                             repeats=repeats, warmup=2)
        name = str(dtype).removeprefix("torch.")
        rows.append([name, f"{times['ours'] * 1e3:.1f}", f"{times['transformers'] * 1e3:.1f}",
                     f"{times['transformers'] / times['ours']:.2f}x",
                     f"{flops / times['ours'] / rate:.0%}", f"{flops / times['transformers'] / rate:.0%}"])
    print_table(f"Training step, gpt2-small, batch {batch} x 1024 tokens (bf16 matmul rate measured: "
                f"{rate / 1e12:.0f} TFLOP/s)",
                ["dtype", "ours ms", "transformers ms", "speed-up", "ours % of bf16 rate",
                 "transformers % of bf16 rate"], rows)


def generation_section(ours, hf, new_tokens: int, repeats: int):
    prompt = torch.randint(0, 50257, (1, 16), device="cuda")
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        ours.to(dtype)
        hf.to(dtype)
        with torch.no_grad():
            fns = {"ours": synchronized(lambda: generate(ours, prompt, max_new_tokens=new_tokens)),
                   "transformers": synchronized(lambda: hf.generate(
                       prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       attention_mask=torch.ones_like(prompt), pad_token_id=0))}
            times = best_seconds(fns, repeats=repeats, warmup=1)
        name = str(dtype).removeprefix("torch.")
        rows.append([name, f"{new_tokens / times['ours']:.0f}", f"{new_tokens / times['transformers']:.0f}",
                     f"{times['transformers'] / times['ours']:.2f}x"])
    ours.float()
    hf.float()
    print_table(f"Greedy generation with the KV cache, batch 1, {new_tokens} new tokens",
                ["dtype", "ours tokens/s", "transformers tokens/s", "speed-up"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: checks that it runs, not numbers")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: no CUDA device here; run this on a machine with a GPU")
    start = time.perf_counter()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    ours, hf = model_pair()
    step_section(ours, hf, batch=2 if args.quick else 8, repeats=2 if args.quick else 5)
    generation_section(ours, hf, new_tokens=20 if args.quick else 200, repeats=2 if args.quick else 3)
    print(f"\n({time.perf_counter() - start:.0f} s in all)")


if __name__ == "__main__":
    main()
