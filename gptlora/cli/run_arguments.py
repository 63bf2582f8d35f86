"""The options the training commands share, added to a subcommand's parser: the base model
(``--model``, ``--models-dir``, ``--random-init``), LoRA's (``--rank``, ..., ``--dora``), the virtual
tokens' (``--num-virtual-tokens``, ..., P-tuning's ``--prompt-encoder``) and the book's appendix D
(``--warmup-steps``, ``--decay``, ...) with the speed options (``--precision``, ``--compile``, ...).

``run_settings`` turns them back into a run's settings. The appendix-D options take their range and
default from ``recipes.settings.ScheduleSettings``, the fields that hold them: one place for both.
"""

from __future__ import annotations

import argparse

from .checks import positive_float, probability, whole_number


def add_model_arguments(parser: argparse.ArgumentParser, random_init_help: str) -> None:
    """``--model``, ``--models-dir`` and ``--random-init``, shared by the commands that load GPT-2."""
    parser.add_argument("--model", default="gpt2-small",
                        help="GPT-2 name (gpt2-small, 124M, ...: downloaded on first use) or a checkpoint directory")
    parser.add_argument("--models-dir", default="weights", help="where named models are stored (default: weights)")
    parser.add_argument("--random-init", action="store_true", help=random_init_help)


def add_lora_arguments(parser: argparse.ArgumentParser, head_help: str) -> None:
    """``--rank/--alpha/--targets/--scaling/--lora-dropout/--dora``, shared by finetune, pretrain and instruct."""
    lora = parser.add_argument_group("LoRA (--method lora; defaults: the book's appendix E)")
    lora.add_argument("--rank", type=whole_number(1), default=16, help="rank r of every adapter (default: 16)")
    lora.add_argument("--alpha", type=positive_float(), default=16, help="LoRA alpha (default: 16)")
    lora.add_argument("--targets", nargs="+", default=None, metavar="NAME",
                      help="layers to adapt, by full name or suffix, e.g. W_query W_value (default: every "
                           f"linear layer, {head_help})")
    lora.add_argument("--scaling", default="alpha/rank", choices=("alpha/rank", "alpha", "alpha/sqrt(rank)"),
                      help="the factor on x @ A @ B: alpha/rank (LoRA paper, peft; default), alpha (the book's "
                           "original appendix), alpha/sqrt(rank) (rsLoRA)")
    lora.add_argument("--lora-dropout", type=probability(), default=0.0,
                      help="dropout on the adapters' input (default: 0)")
    lora.add_argument("--dora", action="store_true",
                      help="DoRA (weight-decomposed LoRA): also train a magnitude per output unit")


def add_prompt_arguments(parser: argparse.ArgumentParser, title: str, default_text: str) -> None:
    """The virtual-token options (``--num-virtual-tokens``, ``--prompt-init-text``, ...), shared by finetune
    (prompt, prefix and P-tuning) and pretrain (P-tuning)."""
    prompt = parser.add_argument_group(title)
    prompt.add_argument("--num-virtual-tokens", type=whole_number(1), default=20, metavar="N",
                        help="virtual tokens before every input (default: 20)")
    prompt.add_argument("--prompt-init-text", default=None, metavar="TEXT",
                        help="text whose tokens (repeated or cut to N) start the prompt; for a prefix, their keys "
                             f"and values (default: {default_text})")
    prompt.add_argument("--random-prompt", action="store_true",
                        help="start from random vocabulary rows (prompt) or random numbers (prefix, P-tuning) instead")
    prompt.add_argument("--prefix-hidden", type=whole_number(1), default=None, metavar="WIDTH",
                        help="prefix-tuning: make the prefix with the paper's MLP of this hidden width (default: off)")
    prompt.add_argument("--encoder-hidden", type=whole_number(1), default=None, metavar="WIDTH",
                        help="p-tuning: the prompt encoder's hidden width (default: the model's width, as peft)")
    prompt.add_argument("--prompt-encoder", choices=("mlp", "lstm"), default=None,
                        help="p-tuning: the encoder that makes the prompt, as peft's (default: mlp)")


def add_schedule_arguments(parser: argparse.ArgumentParser) -> None:
    """The appendix-D group of options (``training.TrainingSchedule``); left out, the schedule changes nothing
    (the book's chapters 5 and 6 keep their numbers)."""
    from ..infra.ranges import DECAYS
    from ..recipes.settings import ScheduleSettings as SCHEDULE

    group = parser.add_argument_group("learning-rate schedule and gradients (the book's appendix D; default: off)")
    group.add_argument("--warmup-steps", type=SCHEDULE.option_type("warmup_steps"),
                       default=SCHEDULE.default("warmup_steps"), metavar="STEPS",
                       help="raise the learning rate linearly from --initial-lr to --lr over the first STEPS "
                            "optimizer steps (default: 0, no warmup)")
    group.add_argument("--initial-lr", type=SCHEDULE.option_type("initial_lr"), default=SCHEDULE.default("initial_lr"),
                       help="learning rate of the first warmup step (default: 0)")
    group.add_argument("--decay", default=SCHEDULE.default("decay"), choices=DECAYS,
                       help="after the warmup: keep --lr (none, default) or lower it along a cosine to --min-lr")
    group.add_argument("--min-lr", type=SCHEDULE.option_type("min_lr"), default=SCHEDULE.default("min_lr"),
                       help="where --decay cosine heads: the rate one step after the last (default: 0)")
    group.add_argument("--clip-grad-norm", type=SCHEDULE.option_type("clip_grad_norm"),
                       default=SCHEDULE.default("clip_grad_norm"), metavar="NORM",
                       help="after the warmup, scale the gradients down to this global norm when above it "
                            "(the book: 1.0; default: no clipping)")
    group.add_argument("--accumulation-steps", type=SCHEDULE.option_type("accumulation_steps"),
                       default=SCHEDULE.default("accumulation_steps"), metavar="N",
                       help="average the gradients of N batches per optimizer step (default: 1)")
    add_speed_arguments(parser)


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    """``--precision``, ``--compile`` and ``--gradient-checkpointing`` (``infra.precision``, ``infra.speed``;
    docs/performance.md), added with the appendix-D group to every training command."""
    from ..infra.ranges import PRECISIONS

    group = parser.add_argument_group("speed and memory (docs/performance.md; defaults: the book's float32 steps)")
    group.add_argument("--precision", default=PRECISIONS[0], choices=PRECISIONS,
                       help="number format of the matrix products: auto (default: bf16 on a CUDA GPU that has it, "
                            "else fp32, so fp32 on a CPU), fp32, tf32 (CUDA), bf16, or fp16 (with loss scaling); "
                            "weights and optimizer stay float32")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the model for training (a one-off compile first; skipped with a "
                            "message where torch.compile cannot run)")
    group.add_argument("--gradient-checkpointing", action="store_true",
                       help="recompute each block's activations in the backward pass: much less memory, "
                            "about a third more compute, the same gradients")
