"""Model-level benchmark: our GPT-2 against transformers' on the same random weights.

    .venv/bin/python bench/bench_model.py [--steps 3] [--new-tokens 100]

Prints, measured in this run on random-weight gpt2-small:
  * one forward+backward step of classification fine-tuning (batch 8 x 120 tokens,
    every parameter trainable), ours vs transformers;
  * greedy generation of 100 new tokens (batch 1), ours with and without the KV cache
    vs transformers' ``generate`` (which uses its own cache).
Targets (issue 2): our step no slower than transformers'; our cached generation at
least 4x faster than uncached and at least as fast as transformers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_seconds, machine_line, print_table  # noqa: E402

from gptlora.generation import generate  # noqa: E402
from gptlora.model import GPTConfig, GPTModel  # noqa: E402
from gptlora.pretrained import config_to_hf, gptlora_to_hf  # noqa: E402


def build_pair():
    """Our random-weight gpt2-small (tied head) and a transformers copy of the same weights."""
    import transformers

    torch.manual_seed(123)
    cfg = GPTConfig.from_preset("gpt2-small", qkv_bias=True, drop_rate=0.0)
    ours = GPTModel(cfg)
    ours.tie_weights()
    hf_config = transformers.GPT2Config(**config_to_hf(cfg))
    theirs = transformers.GPT2LMHeadModel(hf_config)
    theirs.load_state_dict(gptlora_to_hf(ours), strict=False)
    return ours.eval(), theirs.eval()


def training_step(body, body_module, batch, labels):
    """A function running one forward + backward + AdamW step over every parameter of ``body_module``.

    ``body(batch)`` maps token ids ``[B, T]`` to final hidden states ``[B, T, D]``; a
    fresh 2-class head reads the last position, as the book's classifier does.
    """
    head = torch.nn.Linear(768, 2)
    optimizer = torch.optim.AdamW(list(body_module.parameters()) + list(head.parameters()), lr=5e-5)

    def step():
        optimizer.zero_grad(set_to_none=True)
        logits = head(body(batch)[:, -1, :])
        torch.nn.functional.cross_entropy(logits, labels).backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed training steps (best of)")
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3, help="timed generation rounds (best of)")
    args = parser.parse_args()
    print(f"Machine: {machine_line()}")

    ours, theirs = build_pair()
    batch = torch.randint(0, 50257, (8, 120), generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 2, (8,), generator=torch.Generator().manual_seed(1))

    # Both bodies end at the final LayerNorm; the same 2-class head reads the last position.
    ours.train()
    theirs.train()
    step = best_seconds({
        "ours": training_step(lambda ids: ours.final_norm(ours.trf_blocks(ours.embed(ids))), ours, batch, labels),
        "theirs": training_step(lambda ids: theirs.transformer(ids).last_hidden_state, theirs.transformer,
                                batch, labels),
    }, repeats=args.steps)
    t_ours, t_theirs = step["ours"], step["theirs"]
    ours.eval()
    theirs.eval()

    prompt = torch.randint(0, 50257, (1, 10), generator=torch.Generator().manual_seed(2))
    n = args.new_tokens

    def hf_generate():
        theirs.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        attention_mask=torch.ones_like(prompt), pad_token_id=50256)

    with torch.inference_mode():
        gen = best_seconds({
            "cache": lambda: generate(ours, prompt, n, use_cache=True),
            "plain": lambda: generate(ours, prompt, n, use_cache=False),
            "hf": hf_generate,
        }, repeats=args.repeats)
    g_cache, g_plain, g_hf = gen["cache"], gen["plain"], gen["hf"]

    print_table("Training step, gpt2-small, batch 8 x 120, full fine-tuning", ["implementation", "s / step", "ratio"], [
        ["transformers GPT2Model (reference)", f"{t_theirs:.2f}", "1.00x"],
        ["gptlora GPTModel", f"{t_ours:.2f}", f"{t_theirs / t_ours:.2f}x faster"],
    ])
    print_table(f"Greedy generation, gpt2-small, {n} new tokens, batch 1", ["implementation", "tokens / s", "ratio"], [
        ["transformers generate (reference)", f"{n / g_hf:.1f}", "1.00x"],
        ["gptlora, KV cache", f"{n / g_cache:.1f}", f"{g_hf / g_cache:.2f}x"],
        ["gptlora, no cache", f"{n / g_plain:.1f}", f"{g_hf / g_plain:.2f}x"],
    ])
    print(f"\nKV cache speed-up over no cache: {g_plain / g_cache:.2f}x (target >= 4x)")


if __name__ == "__main__":
    main()
