"""``gptlora bench``: training and generation speed, MFU and memory of a GPT-2 size on this machine
(``benchmark.run_bench``; docs/performance.md)."""

from __future__ import annotations

import json

from .checks import device_name, whole_number


def cmd_bench(args) -> int:
    from ..benchmark import OPTIONS, format_rows, rows_as_dicts, run_bench
    from ..infra.hardware import device_name as hardware_name
    from ..model import GPTConfig
    from .app import pick_device

    unknown = [option for option in args.options or () if option not in OPTIONS]
    if unknown:
        raise ValueError(f"--options: unknown {', '.join(unknown)}; expected some of {', '.join(OPTIONS)}")
    config = GPTConfig.from_preset(args.model, context_length=args.context_length, drop_rate=0.0,
                                   **({"n_layers": args.layers} if args.layers else {}))
    device = pick_device(args.device)
    print(f"{args.model}{f' ({args.layers} blocks)' if args.layers else ''}, random weights, batch "
          f"{args.batch_size} x {args.context_length} tokens, {args.steps} steps, on {hardware_name(device)}")
    rows = run_bench(config, device, args.batch_size, args.steps, args.generate_tokens, args.options)
    print(json.dumps(rows_as_dicts(rows), indent=1) if args.json else format_rows(rows))
    return 0


def add_bench_parser(sub) -> None:
    """The ``bench`` subcommand."""
    bench = sub.add_parser("bench", help="training and generation tokens/s, MFU and peak memory on this machine")
    bench.add_argument("--model", default="gpt2-small",
                       help="GPT-2 size, with random weights (gpt2-small, ..., gpt2-xl or 124M, ...; default: "
                            "gpt2-small)")
    bench.add_argument("--batch-size", type=whole_number(1), default=8, help="rows per training step (default: 8)")
    bench.add_argument("--context-length", type=whole_number(1), default=1024,
                       help="tokens per row (default: 1024, GPT-2's context)")
    bench.add_argument("--steps", type=whole_number(1), default=10,
                       help="timed training steps per option, after one to warm up (default: 10)")
    bench.add_argument("--generate-tokens", type=whole_number(1), default=64,
                       help="greedy tokens generated at batch 1 per option (default: 64)")
    bench.add_argument("--layers", type=whole_number(1), default=None,
                       help="only this many transformer blocks (a quick try; default: the model's)")
    bench.add_argument("--options", nargs="+", default=None, metavar="OPTION",
                       help="what to compare with fp32: fp32, tf32, bf16, fp16, fp32+checkpointing, bf16+compile "
                            "(default: every one this device runs)")
    bench.add_argument("--device", default="auto", type=device_name, help="auto (cuda if available), cpu, cuda, ...")
    bench.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    bench.set_defaults(func=cmd_bench)
