"""The ``gptlora`` command: one subcommand per stage of the pipeline.

Each subcommand is a thin wrapper: it parses arguments and calls the package's
functions, so everything the command does can also be done from Python.
"""

from __future__ import annotations

import argparse
import sys


def cmd_generate(args) -> int:
    import torch

    from .generation import generate_text, get_tokenizer
    from .model import GPTConfig, GPTModel

    torch.manual_seed(args.seed)
    # Until the pretrained loader lands, --model names a preset and the weights are random.
    model = GPTModel(GPTConfig.from_preset(args.model)).eval()
    print(f"note: {args.model} with random weights (no pretrained loader yet): expect gibberish", file=sys.stderr)
    text = generate_text(model, args.prompt, get_tokenizer(), args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k)
    print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptlora", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = sub.add_parser("generate", help="continue a prompt with a GPT-2 model")
    gen.add_argument("--model", default="gpt2-small", help="preset name (gpt2-small, 124M, ...)")
    gen.add_argument("--prompt", default="Every effort moves you")
    gen.add_argument("--max-new-tokens", type=int, default=15)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--seed", type=int, default=123)
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
