"""Quantized bases (QLoRA's NF4, int8): memory, logits error, LoRA training step and int8 generation.

``quantization_section`` returns ``(tables, targets)`` like the other sections of ``bench/run.py``:
  - base weights in memory, gpt2-small (real tensors) and gpt2-xl (meta device: shapes only),
    fp32 vs int8 vs NF4 with and without double quantization;
  - logits error of the NF4 and int8 bases against fp32 over the spam test split;
  - one LoRA r16 training step, fp32 base vs NF4 base (ours both), with peak memory rise;
  - greedy generation, int8 weights (fused kernel) vs our fp32 KV cache vs transformers' generate.
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from bench_model import LORA_RANK, ROWS, TOKENS, training_step, trainable
from common import SHARED, PeakRSS, best_seconds

from gptlora.generation import generate, get_tokenizer
from gptlora.lora import apply_lora
from gptlora.model import GPTConfig, GPTModel
from gptlora.qlora import quantize_base, weight_bytes
from gptlora.quantization import fused_int8_kernel_available
from gptlora.spam import create_dataloaders, prepare_spam_data

BASES = {"fp32": None, "int8": dict(method="int8"), "NF4": dict(method="nf4"),
         "NF4 + double quant": dict(method="nf4", double_quant=True)}
INT8_TARGET = 1.5  # int8 generation vs transformers' generate (the issue's target)


def quantized(model: GPTModel, options: dict | None, **extra) -> GPTModel:
    """A quantized copy of ``model`` (the model itself for fp32)."""
    return model if options is None else quantize_base(copy.deepcopy(model), **options, **extra)


def memory_table(small: GPTModel):
    rows = []
    with torch.device("meta"):
        xl = GPTModel(GPTConfig.from_preset("gpt2-xl", qkv_bias=True))
        xl.tie_weights()
    sizes = {name: {"small": weight_bytes(quantized(small, options)),
                    "xl": weight_bytes(quantized(xl, options))} for name, options in BASES.items()}
    for name, size in sizes.items():
        rows.append([name, f"{size['small'] / 2**20:.1f}", f"{size['small'] / sizes['fp32']['small']:.1%}",
                     f"{size['xl'] / 2**20:.1f}", f"{size['xl'] / sizes['fp32']['xl']:.1%}"])
    title = ("Base weights in memory: the blocks' linear layers quantized; embeddings and the tied head "
             "float32 (gpt2-small: measured tensors; gpt2-xl: the same code on the meta device)")
    return (title, ["base", "gpt2-small MiB", "of fp32", "gpt2-xl MiB", "of fp32"], rows)


def logits_error_table(small: GPTModel, messages: int | None):
    """Max and mean |logit - fp32 logit| over every position of the spam test split (120-token rows)."""
    with tempfile.TemporaryDirectory() as tmp:
        source = SHARED / "data" / "sms_spam_collection" / "SMSSpamCollection"
        data_dir = prepare_spam_data(Path(tmp), source=source)["test"].parent
        if messages:  # --quick: the first messages only
            test = pd.read_parquet(data_dir / "test.parquet")[:messages]
            test.to_parquet(data_dir / "test.parquet", index=False)
        loader = create_dataloaders(data_dir, get_tokenizer(), batch_size=8)[2]
        batches = [inputs for inputs, _ in loader]
    models = {name: quantized(small, options) for name, options in list(BASES.items())[1:]}
    worst, total, count, scale = dict.fromkeys(models, 0.0), dict.fromkeys(models, 0.0), 0, 0.0
    with torch.inference_mode():
        for inputs in batches:  # one batch's logits at a time: all 300 messages' would take 7 GB
            expected = small(inputs)
            scale, count = max(scale, float(expected.abs().max())), count + expected.numel()
            for name, model in models.items():
                error = (model(inputs) - expected).abs()
                worst[name], total[name] = max(worst[name], float(error.max())), total[name] + float(error.sum())
    rows = [[name, f"{worst[name]:.4f}", f"{total[name] / count:.5f}", f"{worst[name] / scale:.2%}"]
            for name in models]
    title = (f"Logits error against the fp32 base, random-weight gpt2-small, spam test split "
             f"({sum(len(b) for b in batches)} messages x {batches[0].shape[1]} tokens, every position; "
             f"largest fp32 |logit| {scale:.2f})")
    return (title, ["base", "max |error|", "mean |error|", "max / largest |logit|"], rows)


def training_table(small: GPTModel, repeats: int):
    """One LoRA r16 step (batch 8 x 120, adapters on every block layer), fp32 base vs NF4 base."""
    batch = torch.randint(0, 50257, (ROWS, TOKENS), generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 2, (ROWS,), generator=torch.Generator().manual_seed(1))
    steps, models = {}, {}
    for name in ("fp32", "NF4"):
        model = quantized(copy.deepcopy(small), BASES[name]).train()
        apply_lora(model, LORA_RANK, LORA_RANK, target_modules=r"trf_blocks\..*", verbose=False)
        body = (lambda m: lambda ids: m.final_norm(m.trf_blocks(m.embed(ids))))(model)
        steps[name], models[name] = training_step(body, trainable(model), batch, labels), model
    seconds = best_seconds(steps, repeats=repeats)
    peaks = {}
    for name, step in steps.items():
        with PeakRSS() as peak:
            step()
        peaks[name] = peak.rise
    rows = [[name, f"{weight_bytes(models[name]) / 2**20:.0f}", f"{seconds[name]:.2f}",
             f"{seconds['fp32'] / seconds[name]:.2f}x", f"{peaks[name] / 2**20:.0f}"] for name in steps]
    title = f"LoRA r{LORA_RANK} training step, gpt2-small, batch {ROWS} x {TOKENS}: fp32 base vs NF4 base (ours)"
    return (title, ["base", "weights MiB", "s/step", "speed vs fp32", "peak RSS rise in a step MiB"], rows), seconds


def generation_table(small: GPTModel, theirs, new_tokens: int, repeats: int):
    """Greedy tokens/s: int8 weights (head included, fused kernel) vs our fp32 KV cache vs ``generate``."""
    prompt = torch.randint(0, 50257, (1, 10), generator=torch.Generator().manual_seed(2))
    n = new_tokens
    int8 = quantized(small, BASES["int8"], include_head=True, fused_int8=True).eval()

    def hf_generate():
        theirs.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        attention_mask=torch.ones_like(prompt), pad_token_id=50256)

    with torch.inference_mode():
        seconds = best_seconds({"hf": hf_generate, "fp32": lambda: generate(small, prompt, n),
                                "int8": lambda: generate(int8, prompt, n)}, repeats=repeats)
        same = int((generate(small, prompt, n) == generate(int8, prompt, n)).all(dim=0).long().cumprod(0).sum())
    kernel = "fused torch._weight_int8pack_mm" if fused_int8_kernel_available() else "dequantize (no fused kernel)"
    rows = [["transformers generate (reference)", f"{n / seconds['hf']:.1f}", "1.00x"],
            ["gptlora, fp32, KV cache", f"{n / seconds['fp32']:.1f}", f"{seconds['hf'] / seconds['fp32']:.2f}x"],
            [f"gptlora, int8 weights ({kernel}), KV cache", f"{n / seconds['int8']:.1f}",
             f"{seconds['hf'] / seconds['int8']:.2f}x"]]
    title = (f"Greedy generation, gpt2-small, {n} new tokens, batch 1: int8 weights vs fp32 "
             f"(int8 and fp32 agree on the first {same - 10} of {n} tokens)")
    return (title, ["implementation", "tokens / s", "vs transformers"], rows), seconds


def int8_bound_table(small: GPTModel, repeats: int):
    """Where an int8 token's time goes: the head and the blocks' linear layers, fp32 vs int8, one token."""
    x = torch.randn(1, 1, small.cfg.emb_dim)
    int8 = quantized(small, BASES["int8"], include_head=True, fused_int8=True)
    block, block8 = small.trf_blocks[0], int8.trf_blocks[0]
    wide = torch.randn(1, 1, 4 * small.cfg.emb_dim)
    parts = {
        "head (768 x 50257)": (lambda: small.out_head(x), lambda: int8.out_head(x)),
        "one block's 6 linear layers": (
            lambda: [block.att.W_query(x), block.att.W_key(x), block.att.W_value(x), block.att.out_proj(x),
                     block.ff.layers[0](x), block.ff.layers[2](wide)],
            lambda: [block8.att.W_query(x), block8.att.W_key(x), block8.att.W_value(x), block8.att.out_proj(x),
                     block8.ff.layers[0](x), block8.ff.layers[2](wide)]),
        "one whole block (no cache)": (lambda: block(x), lambda: block8(x)),
    }
    rows = []
    with torch.inference_mode():
        for what, (fp32, q8) in parts.items():
            seconds = best_seconds({"fp32": lambda: [fp32() for _ in range(20)],
                                    "int8": lambda: [q8() for _ in range(20)]}, repeats=repeats)
            rows.append([what, f"{seconds['fp32'] / 20 * 1e3:.3f}", f"{seconds['int8'] / 20 * 1e3:.3f}",
                         f"{seconds['fp32'] / seconds['int8']:.2f}x"])
    return ("Time per generated token by part, fp32 vs int8 (batch 1, one token)",
            ["part", "fp32 ms", "int8 ms", "int8 speed-up"], rows)


def quantization_section(ours: GPTModel, theirs, new_tokens: int, repeats: int, quick: bool):
    """All tables of this module, and the int8 generation target."""
    small = ours.eval()
    started = time.perf_counter()
    tables = [memory_table(small), logits_error_table(small, messages=16 if quick else None)]
    training, _ = training_table(small, repeats)
    generation, seconds = generation_table(small, theirs, new_tokens, repeats)
    tables += [training, generation, int8_bound_table(small, repeats + 2)]
    speedup = seconds["hf"] / seconds["int8"]
    targets = [("int8 generation vs transformers generate", f"{speedup:.2f}x", f">= {INT8_TARGET}x",
                speedup >= INT8_TARGET),
               ("int8 generation vs our fp32 KV cache", f"{seconds['fp32'] / seconds['int8']:.2f}x", "(context)", None)]
    print(f"(quantization section: {time.perf_counter() - started:.0f} s)")
    return tables, targets

