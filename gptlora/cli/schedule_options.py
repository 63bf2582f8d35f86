"""The appendix-D options every training command takes: ``--warmup-steps``, ``--decay``, ``--clip-grad-norm``, ...

They become one ``training.TrainingSchedule``; left out, the schedule is the default
one, which changes nothing (the book's chapters 5 and 6 keep their numbers).
"""

from __future__ import annotations

import argparse

from .checks import positive_float, real_number, whole_number


def add_schedule_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the appendix-D group of options to a training command's parser."""
    group = parser.add_argument_group("learning-rate schedule and gradients (the book's appendix D; default: off)")
    group.add_argument("--warmup-steps", type=whole_number(0), default=0, metavar="STEPS",
                       help="raise the learning rate linearly from --initial-lr to --lr over the first STEPS "
                            "optimizer steps (default: 0, no warmup)")
    group.add_argument("--initial-lr", type=real_number(0), default=0.0,
                       help="learning rate of the first warmup step (default: 0)")
    group.add_argument("--decay", default="none", choices=("none", "cosine"),
                       help="after the warmup: keep --lr (none, default) or lower it along a cosine to --min-lr")
    group.add_argument("--min-lr", type=real_number(0), default=0.0,
                       help="where --decay cosine heads: the rate one step after the last (default: 0)")
    group.add_argument("--clip-grad-norm", type=positive_float(), default=None, metavar="NORM",
                       help="after the warmup, scale the gradients down to this global norm when above it "
                            "(the book: 1.0; default: no clipping)")
    group.add_argument("--accumulation-steps", type=whole_number(1), default=1, metavar="N",
                       help="average the gradients of N batches per optimizer step (default: 1)")


def schedule_from_args(args: argparse.Namespace):
    """The ``training.TrainingSchedule`` of the parsed options (checked: a bad value is a ValueError)."""
    from ..training import TrainingSchedule

    return TrainingSchedule(warmup_steps=args.warmup_steps, initial_lr=args.initial_lr, decay=args.decay,
                            min_lr=args.min_lr, clip_grad_norm=args.clip_grad_norm,
                            accumulation_steps=args.accumulation_steps)
