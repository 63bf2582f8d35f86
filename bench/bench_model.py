"""Model-level benchmarks: training steps and generation against transformers (+ peft), and loading.

Each ``*_section`` function measures one part of the table that ``bench/run.py``
prints, and returns ``(tables, targets)``: tables as ``(title, header, rows)``,
targets as ``(what, measured, target, met)``.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from common import best_seconds, matmul_task

from gptlora.generation import generate
from gptlora.formats.hf_layout import config_to_hf, gptlora_to_hf
from gptlora.lora import apply_lora
from gptlora.model import GPTConfig, GPTModel
from gptlora.pretrained import save_hf

ROWS, TOKENS = 8, 120  # the book's batch: 8 messages of 120 tokens
LORA_RANK = 16
TRAINING_CONFIGS = ("full", "last-block", f"LoRA r{LORA_RANK}")


def gpt2_small() -> GPTModel:
    """Random-weight gpt2-small as the released weights are shaped (qkv bias, tied head), dropout 0."""
    torch.manual_seed(123)
    model = GPTModel(GPTConfig.from_preset("gpt2-small", qkv_bias=True, drop_rate=0.0))
    model.tie_weights()
    return model


def build_pair():
    """Our random-weight gpt2-small and a transformers ``GPT2LMHeadModel`` holding the same weights."""
    import transformers

    ours = gpt2_small()
    theirs = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config_to_hf(ours.cfg)))
    missing, unexpected = theirs.load_state_dict(gptlora_to_hf(ours), strict=False)
    # Left out may be only transformers' causal-mask buffers and its head, which it ties to wte as ours is;
    # anything else would compare against random weights.
    allowed = ("attn.bias", "attn.masked_bias", "lm_head.weight")
    assert not unexpected and all(name.endswith(allowed) for name in missing), (
        f"transformers' GPT-2 did not take all our weights: missing {missing}, unexpected {unexpected}")
    return ours.eval(), theirs.eval()


# --- training steps ----------------------------------------------------------------------

def set_trainable(module: torch.nn.Module, config: str, last_parts, add_lora):
    """Make ``module`` train as ``config``: every parameter, only ``last_parts``, or ``add_lora(module)``'s adapters.

    Returns the module to run (``add_lora`` may wrap it).
    """
    if config == "full":
        return module.requires_grad_(True)
    if config == "last-block":
        module.requires_grad_(False)
        for part in last_parts:
            part.requires_grad_(True)
        return module
    return add_lora(module)


def ours_for(model: GPTModel, config: str):
    """A copy of ``model`` set up to train as ``config``: ``(body, trainable parameters)``.

    ``body`` maps token ids ``[B, T]`` to final hidden states ``[B, T, D]``.
    """
    model = copy.deepcopy(model).train()
    # LoRA on every linear layer of every block, as peft's c_attn, c_proj, c_fc below.
    set_trainable(model, config, (model.trf_blocks[-1], model.final_norm),
                  lambda m: apply_lora(m, LORA_RANK, LORA_RANK, target_modules=r"trf_blocks\..*", verbose=False))
    return (lambda ids: model.final_norm(model.trf_blocks(model.embed(ids)))), trainable(model)


def theirs_for(hf_model, config: str):
    """The same for a copy of a transformers ``GPT2LMHeadModel`` (LoRA through peft)."""
    import peft

    body = copy.deepcopy(hf_model.transformer).train()
    lora = peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, lora_dropout=0.0, fan_in_fan_out=True,
                           target_modules=["c_attn", "c_proj", "c_fc"])
    body = set_trainable(body, config, (body.h[-1], body.ln_f), lambda m: peft.get_peft_model(m, lora))
    return (lambda ids: body(input_ids=ids).last_hidden_state), trainable(body)


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def training_step(body, parameters, batch, labels):
    """One forward + backward + AdamW step; a fresh 2-class head reads the last position (the book's classifier)."""
    head = torch.nn.Linear(768, 2)
    optimizer = torch.optim.AdamW(parameters + list(head.parameters()), lr=5e-5, foreach=True)

    def step():
        optimizer.zero_grad(set_to_none=True)
        logits = head(body(batch)[:, -1, :])
        torch.nn.functional.cross_entropy(logits, labels).backward()
        optimizer.step()

    return step


def step_flops(cfg: GPTConfig, config: str, rows: int, tokens: int, adapter_parameters: int = 0) -> float:
    """Matmul FLOPs of one training step of ``config`` (the head, norms and AdamW are negligible).

    Per token and block, the forward pass costs ``2 W`` for the ``W = 12 D^2`` weights
    (q, k, v, out: 4 D^2; MLP: 8 D^2) plus ``4 T D`` for attention (``QK^T`` and
    ``weights @ V`` over the full ``T x T``, as the kernels compute it). Backward:
    - full: gradients for inputs and weights, 2x the forward: ``6 W + 12 T D``;
    - last-block: the 11 frozen blocks need no backward at all; the last one 2x its forward;
    - LoRA: inputs' gradients flow through every block (``2 W + 8 T D`` more, no weight
      gradients for the frozen ``W``), plus ``6`` FLOPs per adapter parameter.
    """
    D, L, n = cfg.emb_dim, cfg.n_layers, rows * tokens
    weights, attention = 12 * D * D, 4 * tokens * D
    forward = n * L * (2 * weights + attention)
    if config == "full":
        return 3 * forward
    if config == "last-block":
        return forward + 2 * n * (2 * weights + attention)
    return n * (L * (4 * weights + 3 * attention) + 6 * adapter_parameters)


def steps_section(ours: GPTModel, theirs, repeats: int):
    """Training step time of each configuration, ours vs transformers (+ peft), and its share of the matmul rate."""
    batch = torch.randint(0, 50257, (ROWS, TOKENS), generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 2, (ROWS,), generator=torch.Generator().manual_seed(1))
    matmul, matmul_flops = matmul_task()
    rows, targets, rates = [], [], []
    for config in TRAINING_CONFIGS:
        our_body, our_parameters = ours_for(ours, config)
        their_body, their_parameters = theirs_for(theirs, config)
        seconds = best_seconds({"ours": training_step(our_body, our_parameters, batch, labels),
                                "theirs": training_step(their_body, their_parameters, batch, labels),
                                "matmul": matmul}, repeats=repeats)
        gflops = matmul_flops / seconds["matmul"] / 1e9  # measured alongside, under the same load
        rates.append(gflops)
        adapters = sum(p.numel() for p in our_parameters) if config.startswith("LoRA") else 0
        flops = step_flops(ours.cfg, config.split()[0], ROWS, TOKENS, adapters)
        speedup = seconds["theirs"] / seconds["ours"]
        reference = "transformers + peft" if config.startswith("LoRA") else "transformers"
        rows.append([config, f"{seconds['theirs']:.2f}", f"{seconds['ours']:.2f}", f"{speedup:.2f}x",
                     f"{flops / 1e9:.0f}", f"{flops / seconds['ours'] / 1e9 / gflops:.0%}",
                     f"{flops / seconds['theirs'] / 1e9 / gflops:.0%}"])
        targets.append((f"{config} step vs {reference}", f"{speedup:.2f}x", ">= 1.00x", speedup >= 1.0))
        del our_body, their_body, our_parameters, their_parameters
    title = (f"Training step, gpt2-small, batch {ROWS} x {TOKENS} (matmul, 2048 x 2048 float32, timed alongside "
             f"each row: {min(rates):.0f} to {max(rates):.0f} GFLOP/s)")
    header = ["configuration", "transformers s/step", "gptlora s/step", "speed-up", "GFLOP/step",
              "gptlora % of matmul", "transformers % of matmul"]
    return [(title, header, rows)], targets


# --- generation --------------------------------------------------------------------------

def generation_section(ours: GPTModel, theirs, new_tokens: int, repeats: int):
    """Greedy generation tokens/s (batch 1, 10-token prompt): ours with and without KV cache vs ``generate``."""
    prompt = torch.randint(0, 50257, (1, 10), generator=torch.Generator().manual_seed(2))
    n = new_tokens

    def hf_generate():
        theirs.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        attention_mask=torch.ones_like(prompt), pad_token_id=50256)

    ours.eval()
    with torch.inference_mode():
        seconds = best_seconds({"cache": lambda: generate(ours, prompt, n, use_cache=True),
                                "plain": lambda: generate(ours, prompt, n, use_cache=False),
                                "hf": hf_generate}, repeats=repeats)
    rows = [["transformers generate (reference)", f"{n / seconds['hf']:.1f}", "1.00x"],
            ["gptlora, KV cache", f"{n / seconds['cache']:.1f}", f"{seconds['hf'] / seconds['cache']:.2f}x"],
            ["gptlora, no cache", f"{n / seconds['plain']:.1f}", f"{seconds['hf'] / seconds['plain']:.2f}x"]]
    speedup, cache_gain = seconds["hf"] / seconds["cache"], seconds["plain"] / seconds["cache"]
    targets = [("generation with KV cache vs transformers", f"{speedup:.2f}x", ">= 1.00x", speedup >= 1.0),
               ("KV cache vs no cache", f"{cache_gain:.2f}x", ">= 4x", cache_gain >= 4.0)]
    return [(f"Greedy generation, gpt2-small, {n} new tokens, batch 1", ["implementation", "tokens / s", "speed"],
             rows)], targets


# --- loading -----------------------------------------------------------------------------

# Imports come before the baseline: the rise is the loading's, not that of importing a library. Every
# weight is then read once, inside the timing: a loader that only memory-maps the file (transformers
# may) has not read it yet, and the memory a usable model needs would go unmeasured. Peak memory is
# VmHWM, which starts afresh in the new process (ru_maxrss would inherit the parent's peak via fork).
LOAD_PROBE = """
import json, sys, time
import torch
if sys.argv[2] == "gptlora":
    from gptlora.pretrained import load_pretrained
    load = lambda directory: load_pretrained(directory, download=False)
else:
    import transformers
    load = transformers.GPT2LMHeadModel.from_pretrained

def peak_rss():
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024  # kB -> bytes

before = peak_rss()
start = time.perf_counter()
model = load(sys.argv[1])
checksum = sum(float(p.sum()) for p in model.parameters())  # reads every weight, copies none
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "rise": peak_rss() - before}))
"""


def load_in_fresh_process(directory: Path, loader: str) -> dict:
    """``{"seconds", "rise"}``: load time, and rise of peak RSS over the state after importing torch and the loader."""
    done = subprocess.run([sys.executable, "-c", LOAD_PROBE, str(directory), loader], capture_output=True,
                          text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(done.stdout.strip().splitlines()[-1])


def load_section(ours: GPTModel, repeats: int):
    """Load time and peak-memory rise of a gpt2-small checkpoint, each load in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = save_hf(ours, Path(tmp))
        size = (directory / "model.safetensors").stat().st_size
        runs = {name: [load_in_fresh_process(directory, name) for _ in range(repeats)]
                for name in ("transformers", "gptlora")}
    best = {name: {key: min(run[key] for run in values) for key in ("seconds", "rise")}
            for name, values in runs.items()}
    rows = [[name, f"{b['seconds']:.2f}", f"{b['rise'] / 2**20:.0f}", f"{b['rise'] / size:.2f}x"]
            for name, b in best.items()]
    ratio = best["gptlora"]["rise"] / size
    speed = best["transformers"]["seconds"] / best["gptlora"]["seconds"]
    targets = [("peak RSS rise when loading / checkpoint size", f"{ratio:.2f}x", "< 1.5x", ratio < 1.5),
               ("load time vs transformers from_pretrained", f"{speed:.2f}x", "(context)", None)]
    title = f"Loading gpt2-small from safetensors ({size / 2**20:.0f} MiB), fresh process each, best of {repeats}"
    return [(title, ["loader", "seconds", "peak RSS rise MiB", "rise / file size"], rows)], targets
