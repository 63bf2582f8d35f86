"""``gptlora prefer``: preference tuning with DPO after the instruction fine-tune (chapter 12).

The options become one ``recipes.settings.PreferenceSettings`` (checked when it is made), which
``recipes.prefer_run.run_prefer`` then runs.
"""

from __future__ import annotations

import argparse

from .checks import device_name
from .run_arguments import add_lora_arguments, add_model_arguments, add_schedule_arguments
from .run_settings import lora_method_options, resumed_arguments, run_options, schedule_options

# The numeric options: (field of PreferenceSettings, help); each takes its type and default from there.
NUMBERS = (("beta", "how far the policy may move from its reference, in DPO's loss (default: 0.1; typical 0.1-0.5)"),
           ("epochs", "passes over the training split (default: 1)"),
           ("lr", "AdamW learning rate (default: 5e-6)"),
           ("weight_decay", "AdamW weight decay (default: 0.01)"),
           ("batch_size", "preference pairs per optimizer step (default: 8)"),
           ("seed", "seeds shuffles and new weights (default: 123)"),
           ("eval_freq", "print losses and reward margins every N steps (default: 5)"),
           ("eval_iter", "batches per printed value (default: 5)"),
           ("response_tokens", "tokens of each answer to the test split, before and after, written to "
                               "test-responses.json (default: 256; 0: no answers)"))


def prefer_settings(args: argparse.Namespace):
    """The run's ``PreferenceSettings``, from the (resumed) command line; checked once, here."""
    from ..recipes.run_dir import base_source
    from ..recipes.settings import PreferenceSettings

    numbers = {name: getattr(args, name) for name, _ in NUMBERS}
    return PreferenceSettings(method=args.method, method_options=lora_method_options(args), data=args.data,
                              data_dir=args.data_dir, logprobs=args.logprobs, max_length=args.max_length,
                              mask_prompt=not args.score_prompt, save_every=args.save_every,
                              base_source=base_source(args.model, args.models_dir, args.random_init, args.seed),
                              **numbers, **schedule_options(args))


def cmd_prefer(args) -> int:
    from ..infra.distributed import is_main_process, local_main_first, start_processes, stop_processes
    from ..preference_data import load_preference_data
    from ..recipes.prefer_run import run_prefer
    from ..recipes.run_dir import download_base
    from .app import pick_device
    from .instruct import print_scores

    args = resumed_arguments(args) if args.resume else args  # the run's own options
    settings = prefer_settings(args)  # bad options fail before any download
    out = args.out or "runs/prefer"
    device = pick_device(args.device)
    try:
        start_processes(device)
        data = local_main_first(load_preference_data, settings.data, settings.data_dir)
        local_main_first(download_base, settings.base_source)
        metrics = run_prefer(data, settings, out, device=device, resume=bool(args.resume), overwrite=args.overwrite,
                             command_options=run_options(args))
        if not is_main_process():
            return 0
    finally:
        stop_processes()
    margins = (f"; final reward margins {metrics['train_margin']:.3f} (training), {metrics['val_margin']:.3f} "
               "(validation)") if "val_margin" in metrics else ""
    print(f"trainable parameters: {metrics['trainable_parameters']:,} (method {settings.method}, beta "
          f"{settings.beta}){margins}; training took {metrics['training_seconds']:.1f} s")
    responses = ""
    if "test_responses" in metrics:
        print("before: ", end="")
        print_scores(metrics["test_scores_before"])
        print("after:  ", end="")
        print_scores(metrics["test_scores"])
        responses = f", the test split's answers before and after in {metrics['test_responses']}"
    print(f"model and metrics.json are in {out}{responses}; try: gptlora generate --model {out} --instruction '...'")
    return 0


def add_prefer_parser(sub) -> None:
    """The ``prefer`` subcommand; numeric options take their range and default from ``PreferenceSettings``."""
    from ..recipes.settings import LOGPROB_MODES, PREFERENCE_METHODS, PreferenceSettings as PS

    pref = sub.add_parser("prefer", help="preference tuning with DPO after `instruct` (book, DPO bonus; chapter 12)")
    add_model_arguments(pref, random_init_help="random weights of that shape (no download; to try the pipeline)")
    pref.set_defaults(model="gpt2-medium")
    pref.add_argument("--data", default="preference-data",
                      help="'preference-data' (the book's 1,100 records, downloaded to DATA_DIR on first use) or a "
                           "JSON file: a list of {instruction, input, chosen, rejected} records")
    pref.add_argument("--data-dir", default=PS.default("data_dir"), help="where preference-data is stored")
    pref.add_argument("--method", default=PS.default("method"), choices=PREFERENCE_METHODS,
                      help="full: every weight, a frozen copy as reference (the book, default); lora: adapters "
                           "only, the reference is the same model with its adapters off")
    for name, text in NUMBERS:
        pref.add_argument(f"--{name.replace('_', '-')}", type=PS.option_type(name), default=PS.default(name), help=text)
    pref.add_argument("--logprobs", default=PS.default("logprobs"), choices=LOGPROB_MODES,
                      help="an answer's log-probability: mean per token (the book, default) or sum (the paper, trl)")
    pref.add_argument("--max-length", type=PS.option_type("max_length"), default=None,
                      help="cut every text to this many tokens (default: the model's context length)")
    pref.add_argument("--score-prompt", action="store_true",
                      help="count the prompt's tokens in the log-probabilities too (default: the answers only)")
    pref.add_argument("--out", default=None, help="run directory (default: runs/prefer)")
    pref.add_argument("--device", default="auto", type=device_name, help="auto (cuda if available), cpu, cuda, ...")
    pref.add_argument("--save-every", type=PS.option_type("save_every"), default=None, metavar="STEPS",
                      help="also save a checkpoint every STEPS optimizer steps (always: at each epoch end)")
    pref.add_argument("--resume", default=None, metavar="RUN_DIR",
                      help="continue the run in RUN_DIR from its checkpoint, with its own options")
    pref.add_argument("--overwrite", action="store_true", help="replace what --out holds (refused otherwise)")
    add_lora_arguments(pref, head_help="the output head included")
    add_schedule_arguments(pref)
    pref.set_defaults(func=cmd_prefer)
