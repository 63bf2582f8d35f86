"""The ``gptlora`` command: one subcommand per stage of the pipeline.

Each subcommand is a thin wrapper: it parses arguments and calls the package's
functions, so everything the command does can also be done from Python.
"""

from __future__ import annotations

import argparse
import sys


def cmd_download(args) -> int:
    from .download import DownloadError
    from .pretrained import download_gpt2

    try:
        directory = download_gpt2(args.name, args.models_dir, base_url=args.base_url)
    except (DownloadError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(directory)
    return 0


def cmd_generate(args) -> int:
    import torch

    from .download import DownloadError
    from .generation import generate_text, get_tokenizer
    from .model import GPTConfig, GPTModel
    from .pretrained import load_pretrained

    torch.manual_seed(args.seed)
    try:
        if args.random_init:
            model = GPTModel(GPTConfig.from_preset(args.model, qkv_bias=True)).eval()
            print(f"note: {args.model} with random weights (--random-init): expect gibberish", file=sys.stderr)
        else:
            model = load_pretrained(args.model, args.models_dir)
    except (DownloadError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    text = generate_text(model, args.prompt, get_tokenizer(), args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k)
    print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptlora", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    down = sub.add_parser("download", help="download pretrained GPT-2 weights (verified, resumable)")
    down.add_argument("name", help="gpt2-small, gpt2-medium, gpt2-large, gpt2-xl (or 124M, 355M, 774M, 1558M)")
    down.add_argument("--models-dir", default="weights", help="files go to MODELS_DIR/NAME/ (default: weights)")
    down.add_argument("--base-url", default=None,
                      help="download from this server instead of the Hugging Face Hub and its mirror "
                           "(comma-separated for several; default: $GPTLORA_HF_BASE_URL)")
    down.set_defaults(func=cmd_download)

    gen = sub.add_parser("generate", help="continue a prompt with a GPT-2 model")
    gen.add_argument("--model", default="gpt2-small",
                     help="GPT-2 name (gpt2-small, 124M, ...: downloaded on first use) or a checkpoint directory")
    gen.add_argument("--models-dir", default="weights", help="where named models are stored (default: weights)")
    gen.add_argument("--random-init", action="store_true",
                     help="use the named size with random weights instead of pretrained ones (no download)")
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
