"""From the parsed command line to a run's settings: ``finetune_settings``, ``pretrain_settings`` and
``instruct_settings`` build the ``recipes.settings`` dataclass of a run (checked there, once);
``resumed_arguments`` gives a ``--resume`` command line the options recorded in the run's checkpoint
(``run_options``)."""

from __future__ import annotations

import argparse
from pathlib import Path


# Each method's own options (argparse names); another method's, given, are refused rather than ignored.
METHOD_OPTIONS = {"lora": ("rank", "alpha", "targets", "scaling", "lora_dropout", "dora"),
                  "prompt-tuning/prefix-tuning/p-tuning": ("num_virtual_tokens", "prompt_init_text", "random_prompt",
                                                           "prefix_hidden"),
                  "p-tuning": ("prompt_encoder", "encoder_hidden")}


def lora_method_options(args) -> dict | None:
    """The ``--rank/--alpha/--targets/--scaling/--lora-dropout/--dora`` options as ``apply_lora`` keywords
    (for the prompt methods: ``--num-virtual-tokens/--prompt-init-text/--random-prompt/--prefix-hidden``,
    and P-tuning's ``--prompt-encoder/--encoder-hidden``).
    Options of another method than ``--method`` are a ValueError."""
    given = options_given(args)
    foreign = [f"--{name.replace('_', '-')} ({family})" for family, names in METHOD_OPTIONS.items()
               if args.method not in family.split("/") for name in names if name in given]
    if foreign:
        raise ValueError(f"options of another method than --method {args.method}: {', '.join(foreign)}; "
                         "leave them out or choose their method")
    if args.method in ("prompt-tuning", "prefix-tuning", "p-tuning"):
        if args.random_prompt and args.prompt_init_text is not None:
            raise ValueError("--random-prompt and --prompt-init-text both say how the prompt starts: give one")
        options = dict(num_virtual_tokens=args.num_virtual_tokens, hidden=args.prefix_hidden)
        if args.method == "p-tuning":
            if args.prefix_hidden is not None:
                raise ValueError("--prefix-hidden is the width of prefix-tuning's MLP; the prompt encoder's width "
                                 "is --encoder-hidden")
            options.update(encoder=args.prompt_encoder, hidden=args.encoder_hidden)
        if args.random_prompt or args.prompt_init_text is not None:  # else: the package's default text
            options["init_text"] = None if args.random_prompt else args.prompt_init_text
        return options
    if args.method != "lora":
        return None
    return dict(rank=args.rank, alpha=args.alpha, target_modules=args.targets, scaling=args.scaling,
                dropout=args.lora_dropout, use_dora=args.dora)


# `finetune --resume` takes every option from the run's checkpoint; these few may be changed on the
# command line, and these are never the run's (they say where the run is and how to start it).
RESUME_MAY_CHANGE = {"epochs", "device", "save_every"}
NOT_RUN_OPTIONS = {"resume", "overwrite", "out", "command", "func", "argv", "defaults", "debug"}


def options_given(args: argparse.Namespace) -> set[str]:
    """The options written on the command line (``--name`` or ``--name=value``), or set to a value other
    than their default (which also catches an abbreviated name). ``app.main`` records the command's
    defaults in ``args.defaults``; without them (``args`` parsed elsewhere) the parser is built again."""
    defaults = getattr(args, "defaults", None)
    if defaults is None:
        from .app import build_parser

        defaults = vars(build_parser().parse_args([args.command]))
    written = {token.split("=", 1)[0] for token in getattr(args, "argv", ()) if token.startswith("--")}
    return {name for name, value in vars(args).items()
            if f"--{name.replace('_', '-')}" in written or value != defaults.get(name)}


def resumed_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with the options of the run in ``args.resume``, read from its checkpoint. ``--epochs``,
    ``--device`` and ``--save-every`` may be given anew; any other option given with a value other than
    the run's is a ValueError: resuming cannot change the run."""
    from ..infra.checkpoint import CHECKPOINT_NAME, read_checkpoint_values

    saved = read_checkpoint_values(Path(args.resume) / CHECKPOINT_NAME).get("extra")
    if not saved:
        raise ValueError(f"the checkpoint in {args.resume} records no command-line options (it was not written "
                         f"by `gptlora {args.command}`); resume it from Python with resume=True")
    if args.overwrite:
        raise ValueError("--resume continues the run in its directory and --overwrite replaces it: choose one")
    if args.out is not None and Path(args.out) != Path(args.resume):
        raise ValueError(f"--out {args.out} and --resume {args.resume} differ; a resumed run stays in its directory")
    given = options_given(args) - NOT_RUN_OPTIONS
    for name in sorted(given - RESUME_MAY_CHANGE):
        if name in saved and getattr(args, name) != saved[name]:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} differs from the run being resumed "
                             f"({saved[name]!r}); leave it out to resume, or start a new run with another --out")
    kept = {name: value for name, value in saved.items() if name not in given | NOT_RUN_OPTIONS}
    return argparse.Namespace(**{**vars(args), **kept, "out": args.resume})


def run_options(args: argparse.Namespace) -> dict:
    """The options that describe the run (what ``--resume`` restores): all but where and how to start it."""
    return {name: value for name, value in vars(args).items() if name not in NOT_RUN_OPTIONS}


def finetune_settings(args: argparse.Namespace):
    """The run's ``FinetuneSettings``, from the (resumed) command line; checked once, here."""
    from ..recipes.run_dir import base_source
    from ..recipes.settings import FinetuneSettings

    source = base_source(args.model, args.models_dir, args.random_init, args.seed, quantize_options(args))
    return FinetuneSettings(method=args.method, method_options=lora_method_options(args), data_dir=args.data_dir,
                            epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                            batch_size=args.batch_size, seed=args.seed, eval_freq=args.eval_freq,
                            eval_iter=args.eval_iter, dynamic_padding=args.dynamic_padding,
                            bucket_by_length=args.bucket_by_length, cache_prefix=args.cache_prefix,
                            save_every=args.save_every, base_model=str(args.model), base_source=source,
                            **schedule_options(args))


def quantize_options(args) -> dict | None:
    """``--quantize-base`` and ``--double-quant`` as ``qlora.quantize_base`` keywords (None: full precision).
    Whether the method may train on a quantized base is ``FinetuneSettings``' check."""
    if args.double_quant and args.quantize_base != "nf4":
        raise ValueError(f"--double-quant quantizes NF4's block scales, so it needs --quantize-base nf4, "
                         f"found {args.quantize_base or 'no --quantize-base'}")
    if args.quantize_base is None:
        return None
    return dict(method=args.quantize_base, double_quant=True) if args.double_quant else dict(method=args.quantize_base)


def pretrain_settings(args: argparse.Namespace):
    """The run's ``PretrainSettings``, from the (resumed) command line; checked once, here."""
    from ..recipes.run_dir import base_source
    from ..recipes.settings import PretrainSettings

    random_init = args.random_init or args.model is None  # no --model: the book's model from random weights
    source = base_source(args.model or "gpt2-small", args.models_dir, random_init, args.seed,
                         context_length=args.context_length)
    return PretrainSettings(method=args.method, method_options=lora_method_options(args),
                            context_length=args.context_length, epochs=args.epochs, lr=args.lr,
                            weight_decay=args.weight_decay, batch_size=args.batch_size, train_ratio=args.train_ratio,
                            seed=args.seed, eval_freq=args.eval_freq, eval_iter=args.eval_iter, prompt=args.prompt,
                            sample_tokens=args.sample_tokens, save_every=args.save_every, text_name=args.text,
                            base_source=source, **schedule_options(args))


def instruct_settings(args: argparse.Namespace):
    """The run's ``InstructSettings``, from the (resumed) command line; checked once, here."""
    from ..recipes.run_dir import base_source
    from ..recipes.settings import InstructSettings

    return InstructSettings(method=args.method, method_options=lora_method_options(args), data=args.data,
                            data_dir=args.data_dir, epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                            batch_size=args.batch_size, seed=args.seed, eval_freq=args.eval_freq,
                            eval_iter=args.eval_iter, max_length=args.max_length, mask_prompt=args.mask_prompt,
                            response_tokens=args.response_tokens, save_every=args.save_every,
                            judge_url=args.judge_url, judge_model=args.judge_model,
                            base_source=base_source(args.model, args.models_dir, args.random_init, args.seed),
                            **schedule_options(args))


def schedule_options(args: argparse.Namespace) -> dict:
    """The appendix-D and speed options (``run_arguments.add_schedule_arguments``) as settings keywords."""
    from ..recipes.settings import SCHEDULE_FIELDS, SPEED_FIELDS

    return {name: getattr(args, name) for name in (*SCHEDULE_FIELDS, *SPEED_FIELDS)}
