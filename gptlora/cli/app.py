"""The gptlora command: one subcommand per stage of the pipeline.

Each subcommand is a thin wrapper: it parses arguments and calls the package's
functions, so everything the command does can also be done from Python.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .checks import (SEED, CommandParser, add_debug_option, debug_requested, device_name, error_line,
                     one_line_warnings, real_number, whole_number)
from ..infra.download import DownloadError  # light: the standard library and tqdm
from .run_settings import finetune_settings, pretrain_settings, resumed_arguments, run_options
from .instruct import (add_instruct_parser, add_instruction_arguments, check_instruction_arguments,
                       generate_response, note_untuned)
from .bench import add_bench_parser
from .prefer import add_prefer_parser
from .run_arguments import add_lora_arguments, add_model_arguments, add_prompt_arguments, add_schedule_arguments

# What a user can cause and fix (a bad option, a missing or existing file, no network): main() prints
# these as one line, "error: ...", and exits with 1. Anything else is a bug and keeps its traceback.
USER_ERRORS = (DownloadError, OSError, ValueError, NotImplementedError)


def cmd_download(args) -> int:
    from ..pretrained import download_gpt2

    print(download_gpt2(args.name, args.models_dir, base_url=args.base_url))
    return 0


def cmd_generate(args) -> int:
    import torch

    from ..generation import generate_text, get_tokenizer
    from ..pretrained import pretrained_or_random
    from ..prompt_tuning import VirtualTokenModel

    check_instruction_arguments(args)
    if not args.prompt:
        raise ValueError("--prompt is empty: give some text to continue (or '<|endoftext|>' to start from nothing, "
                         "as GPT-2 was trained to)")
    torch.manual_seed(args.seed)  # --random-init: the same weights for the same seed
    info = None
    if Path(args.model).is_dir() and pretraining_run(args.model):  # the --out directory of `gptlora pretrain`
        from ..recipes.pretrain_run import load_language_model

        model, info = load_language_model(args.model)
    else:
        model = pretrained_or_random(args.model, args.models_dir, args.random_init).eval()
    virtual = isinstance(model, VirtualTokenModel)  # a P-tuning run: its base is what --int8 quantizes
    if args.int8:  # weight-only int8, the head included: fewer bytes to read per generated token
        from ..lora import lora_wrappers, merge_lora
        from ..qlora import quantize_base

        if lora_wrappers(model):  # a LoRA run: fold its adapters into the weights first, then quantize those
            model = merge_lora(model, unload=True)
        quantize_base(model.base if virtual else model, "int8", include_head=True, fused_int8=True)
    model.to(pick_device(args.device))
    if args.random_init:
        print(f"note: {args.model} with random weights (--random-init): expect gibberish", file=sys.stderr)
    # Seeded again, right before sampling, as the book does (torch.manual_seed(123); generate(...)): building
    # the model drew from the generator (its initial weights, before the saved ones replace them), so the
    # seed above alone gave other draws than the book's and its sample "Every effort moves you stand to work ...".
    torch.manual_seed(args.seed)
    if args.instruction is not None and args.compile:
        raise ValueError("--compile continues a plain --prompt; an --instruction's response is generated eagerly: "
                         "leave out one of the two")
    if args.instruction is not None:  # an `instruct` run: the Alpaca prompt in, only the response out
        note_untuned(args.model, info)
        return generate_response(args, model)
    if args.compile:  # one fixed-shape step, compiled (CUDA graphs on a GPU): static_generation
        return print_compiled_generation(args, model, virtual)
    # (a P-tuning run's prompt cannot stay in a sliding KV cache: it generates without one)
    text = generate_text(model, args.prompt, get_tokenizer(), args.max_new_tokens, use_cache=not virtual,
                         temperature=args.temperature, top_k=args.top_k, progress=True)
    print(text)
    return 0


def print_compiled_generation(args, model, virtual: bool) -> int:
    """``generate --compile``: the prompt's continuation from ``static_generation.CompiledGenerator``."""
    from ..generation import get_tokenizer, text_to_token_ids, token_ids_to_text
    from ..infra.speed import compile_unavailable
    from ..static_generation import CompiledGenerator

    if virtual:
        raise ValueError("generate --compile runs a plain GPT model; a P-tuning run's prompt needs the eager "
                         "path: leave out --compile")
    device = next(model.parameters()).device
    reason = compile_unavailable(device)
    if reason:
        print(f"--compile: torch.compile cannot run here ({reason}); generating without it", file=sys.stderr)
    ids = text_to_token_ids(args.prompt, get_tokenizer()).to(device)
    generator = CompiledGenerator(model.eval(), ids.shape[1] + args.max_new_tokens, compile=reason is None)
    print(token_ids_to_text(generator.generate(ids, args.max_new_tokens, args.temperature, args.top_k),
                            get_tokenizer()))
    return 0


def pick_device(name: str):
    """The ``torch.device`` for a ``--device`` value: ``"auto"`` is cuda when available, else cpu."""
    import torch

    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def prepare_files(data_dir, spam_source, source: dict) -> None:
    """Put the spam splits and, for a GPT-2 name, its weights on disk (downloading what is missing)."""
    from ..recipes.run_dir import download_base, preset_to_download
    from ..spam import prepare_spam_data

    preset_to_download(source)  # a typo fails before the data is downloaded
    prepare_spam_data(data_dir, spam_source)
    download_base(source)


def cmd_finetune(args) -> int:
    from ..infra.distributed import is_main_process, local_main_first, start_processes, stop_processes
    from ..recipes.finetune import load_base, run_finetune
    from ..generation import get_tokenizer

    try:
        args = resumed_arguments(args) if args.resume else args
        out = args.out or f"runs/spam-{Path(args.model).name}-{args.method}"
        settings = finetune_settings(args)  # bad options fail before any download
        start_processes(pick_device(args.device))  # under torchrun: join now, so that one process prepares first
        local_main_first(prepare_files, args.data_dir, args.spam_source, settings.base_source)
        model = load_base(settings.base_source)
        metrics = run_finetune(model, get_tokenizer(), settings, out, device=pick_device(args.device),
                               resume=bool(args.resume), overwrite=args.overwrite, command_options=run_options(args))
        if not is_main_process():  # under torchrun, rank 0 reports
            return 0
    finally:
        stop_processes()
    print(f"trainable parameters: {metrics['trainable_parameters']:,} (method {args.method}, lr {metrics['lr']:g})")
    for split, accuracy in metrics["accuracy"].items():
        print(f"{split} accuracy: {accuracy:.2%}")
    print(f"training took {metrics['training_seconds']:.1f} s; classifier, metrics.json, loss.png and "
          f"accuracy.png are in {out}")
    return 0


def cmd_classify(args) -> int:
    from ..classifier import classify
    from ..recipes.finetune import load_classifier
    from ..generation import get_tokenizer

    device = pick_device(args.device)
    if len(args.run) > 1:  # LoRA runs on one base: one batch, a row per run
        from ..recipes.finetune import load_runs_sharing_a_base

        model, names, info = load_runs_sharing_a_base(args.run, device)
        labels = classify(args.text, model, get_tokenizer(), device, info["max_length"],
                          pad_to_max_length=not info["dynamic_padding"], adapter_names=names)
        for run, label in zip(args.run, labels):
            print(f"{run}: {label}")
        return 0
    model, info = load_classifier(args.run[0], device)
    print(classify(args.text, model, get_tokenizer(), device, info["max_length"],
                   pad_to_max_length=not info["dynamic_padding"]))
    return 0


def pretraining_run(path) -> bool:
    """Whether ``path`` is the directory of a `gptlora pretrain` run (``pretrain_run.is_pretraining_run``)."""
    from ..recipes.pretrain_run import is_pretraining_run

    return is_pretraining_run(path)


def cmd_export_peft(args) -> int:
    from ..recipes.finetune import export_run_to_peft
    from ..recipes.pretrain_run import export_pretraining_run_to_peft

    existing = sorted(entry.name for entry in Path(args.out).iterdir()) if Path(args.out).is_dir() else []
    if existing:
        raise FileExistsError(f"{args.out} already holds files ({', '.join(existing[:5])}); choose another --out "
                              "or remove them")
    classifier = not pretraining_run(args.run)
    out = (export_run_to_peft if classifier else export_pretraining_run_to_peft)(args.run, args.out)
    print(f"peft adapter written to {out}; load it with peft.PeftModel.from_pretrained(hf_model, {str(out)!r})")
    if classifier and not (Path(out) / "base").is_dir():  # an exported random base has it in its config.json
        print("for batches of several messages, give the classifier GPT-2's end-of-text as padding token: "
              "GPT2ForSequenceClassification.from_pretrained(base, num_labels=2, pad_token_id=50256)")
    return 0


def cmd_pretrain(args) -> int:
    from ..infra.distributed import is_main_process, stop_processes
    from ..recipes.pretrain_run import run_pretrain
    from ..text_data import load_text

    args = resumed_arguments(args) if args.resume else args  # the run's own options, as finetune does
    settings = pretrain_settings(args)
    text = load_text(args.text, args.data_dir)
    out = args.resume or args.out or "runs/pretrain"
    try:
        metrics = run_pretrain(text, settings, out, device=pick_device(args.device), resume=bool(args.resume),
                               overwrite=args.overwrite, command_options=run_options(args))
        if not is_main_process():
            return 0
    finally:
        stop_processes()
    print(f"trainable parameters: {metrics['trainable_parameters']:,} (method {args.method}); final training loss "
          f"{metrics['train_loss']:.3f}, validation loss {metrics['val_loss']:.3f} (perplexity "
          f"{metrics['val_loss_perplexity']:.1f}); training took {metrics['training_seconds']:.1f} s")
    print(f"model, metrics.json and loss.png are in {out}; try: gptlora generate --model {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    # A run's numeric options take their range (type=) and default from its settings dataclass: one place.
    from ..recipes.settings import PRETRAIN_METHODS, FinetuneSettings as FINE, PretrainSettings as PRE

    parser = CommandParser(prog="gptlora", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    down = sub.add_parser("download", help="download pretrained GPT-2 weights (verified, resumable)")
    down.add_argument("name", help="gpt2-small, gpt2-medium, gpt2-large, gpt2-xl (or 124M, 355M, 774M, 1558M)")
    down.add_argument("--models-dir", default="weights", help="files go to MODELS_DIR/NAME/ (default: weights)")
    down.add_argument("--base-url", default=None,
                      help="download from this server instead of the Hugging Face Hub and its mirror "
                           "(comma-separated for several; default: $GPTLORA_HF_BASE_URL)")
    down.set_defaults(func=cmd_download)

    gen = sub.add_parser("generate", help="continue a prompt with a GPT-2 model")
    add_model_arguments(gen, random_init_help="use the named size with random weights instead of pretrained "
                                              "ones (no download)")
    gen.add_argument("--prompt", default="Every effort moves you", help="text to continue (default: %(default)r)")
    gen.add_argument("--max-new-tokens", type=whole_number(1), default=15, help="tokens to add (default: 15)")
    gen.add_argument("--temperature", type=real_number(0), default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=whole_number(1), default=None,
                     help="sample only among the K most likely tokens")
    gen.add_argument("--seed", type=SEED, default=123, help="random seed for sampling (default: 123)")
    gen.add_argument("--int8", action="store_true",
                     help="store the linear layers and the head as int8 weights (per output channel) and use "
                          "PyTorch's fused int8 kernel where it has one: faster and smaller, slightly different")
    gen.add_argument("--device", default="auto", type=device_name,
                     help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    gen.add_argument("--compile", action="store_true",
                     help="a fixed-shape decode step compiled once (CUDA graphs on a GPU; the gpt-fast approach): "
                          "the same tokens, much faster per token after a one-off compile; the prompt and new "
                          "tokens must fit the context")
    add_instruction_arguments(gen)
    gen.set_defaults(func=cmd_generate)

    fine = sub.add_parser("finetune", help="fine-tune GPT-2 as an SMS spam classifier (book, chapter 6)")
    add_model_arguments(fine, random_init_help="start from random weights of that shape (a preset, or the "
                                               "directory's config.json)")
    fine.add_argument("--method", default=FINE.default("method"),
                      help="last-block: last block + final norm + head (the book, default); full: everything; "
                           "lora: low-rank adapters; prompt-tuning: a soft prompt + the head; prefix-tuning: "
                           "learned keys and values at every layer + the head; p-tuning: a soft prompt made by a "
                           "small trained encoder + the head")
    fine.add_argument("--epochs", type=FINE.option_type("epochs"), default=FINE.default("epochs"),
                      help="passes over the training split (default: 5)")
    fine.add_argument("--lr", type=FINE.option_type("lr"), default=FINE.default("lr"),
                      help="AdamW learning rate (default: 8e-4 for lora, 5e-5 for the other methods)")
    fine.add_argument("--weight-decay", type=FINE.option_type("weight_decay"), default=FINE.default("weight_decay"),
                      help="AdamW weight decay (default: 0.1)")
    fine.add_argument("--batch-size", type=FINE.option_type("batch_size"), default=FINE.default("batch_size"),
                      help="messages per optimizer step, over all processes (default: 8)")
    fine.add_argument("--seed", type=FINE.option_type("seed"), default=FINE.default("seed"),
                      help="seeds shuffling and the new head, as the book does (default: 123)")
    fine.add_argument("--eval-freq", type=FINE.option_type("eval_freq"), default=FINE.default("eval_freq"),
                      help="log losses every N steps (default: 50)")
    fine.add_argument("--eval-iter", type=FINE.option_type("eval_iter"), default=FINE.default("eval_iter"),
                      help="batches per logged loss/accuracy (default: 5)")
    fine.add_argument("--dynamic-padding", action="store_true",
                      help="pad each batch to its longest text and classify from the last real token")
    fine.add_argument("--bucket-by-length", action="store_true",
                      help="with --dynamic-padding: batch messages of similar length together (less padding)")
    fine.add_argument("--cache-prefix", action="store_true",
                      help="--method last-block only: run the frozen blocks once per message and train the last "
                           "block on their cached output (same results, several times faster)")
    fine.add_argument("--data-dir", default="data", help="where the prepared splits live (default: data)")
    fine.add_argument("--spam-source", default=None,
                      help="a local SMSSpamCollection file or UCI zip instead of downloading "
                           "(default: $GPTLORA_SPAM_SOURCE)")
    fine.add_argument("--out", default=None, help="run directory (default: runs/spam-MODEL-METHOD)")
    fine.add_argument("--device", default="auto", type=device_name,
                      help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    fine.add_argument("--save-every", type=FINE.option_type("save_every"), default=None, metavar="STEPS",
                      help="also save a checkpoint every STEPS optimizer steps (always: at each epoch end)")
    fine.add_argument("--resume", default=None, metavar="RUN_DIR",
                      help="continue the run in RUN_DIR from its checkpoint, with its own options (--epochs, "
                           "--device and --save-every may change)")
    fine.add_argument("--overwrite", action="store_true", help="replace what --out holds (refused otherwise)")
    add_lora_arguments(fine, head_help="the new head included")
    add_prompt_arguments(fine, "prompt, prefix and P-tuning (--method prompt-tuning / prefix-tuning / p-tuning)",
                         default_text="'Classify if the message is spam or not spam.\\n'")
    qlora = fine.add_argument_group("QLoRA (--method lora only)")
    qlora.add_argument("--quantize-base", default=None, metavar="nf4|int8",
                       help="store the frozen base's linear layers quantized (nf4: 4-bit NormalFloat, blocks of 64; "
                            "int8: per output channel) under full-precision adapters; the head stays float")
    qlora.add_argument("--double-quant", action="store_true",
                       help="with --quantize-base nf4: quantize the block scales too (8-bit, blocks of 256)")
    add_schedule_arguments(fine)
    fine.set_defaults(func=cmd_finetune)

    pre = sub.add_parser("pretrain", help="train a GPT on a text by next-token prediction (book, chapter 5)")
    pre.add_argument("--text", default="the-verdict",
                     help="'the-verdict' (downloaded to DATA_DIR on first use) or a UTF-8 text file")
    pre.add_argument("--model", default=None,
                     help="GPT-2 name or checkpoint directory (pretrained weights unless --random-init); "
                          "default: the book's GPT_CONFIG_124M from random weights")
    pre.add_argument("--models-dir", default="weights", help="where named models are stored (default: weights)")
    pre.add_argument("--random-init", action="store_true",
                     help="random weights of that shape, configured as the book (dropout 0.1, no qkv bias)")
    pre.add_argument("--context-length", type=PRE.option_type("context_length"), default=None,
                     help="tokens per training window (default: 256 from random weights, else the model's)")
    pre.add_argument("--method", default=PRE.default("method"), choices=PRETRAIN_METHODS,
                     help="full: every weight (the book, default); lora: low-rank adapters only; p-tuning: a soft "
                          "prompt made by a small trained encoder, before every window")
    pre.add_argument("--epochs", type=PRE.option_type("epochs"), default=PRE.default("epochs"),
                     help="passes over the training text (default: 10)")
    pre.add_argument("--lr", type=PRE.option_type("lr"), default=PRE.default("lr"),
                     help="AdamW learning rate (default: 4e-4)")
    pre.add_argument("--weight-decay", type=PRE.option_type("weight_decay"), default=PRE.default("weight_decay"),
                     help="AdamW weight decay (default: 0.1)")
    pre.add_argument("--batch-size", type=PRE.option_type("batch_size"), default=PRE.default("batch_size"),
                     help="windows per optimizer step (default: 2)")
    pre.add_argument("--train-ratio", type=PRE.option_type("train_ratio"), default=PRE.default("train_ratio"),
                     help="share of the text's characters to train on; the rest validates (default: 0.9)")
    pre.add_argument("--seed", type=PRE.option_type("seed"), default=PRE.default("seed"),
                     help="seeds the weights and shuffles (default: 123)")
    pre.add_argument("--eval-freq", type=PRE.option_type("eval_freq"), default=PRE.default("eval_freq"),
                     help="print losses every N steps (default: 5)")
    pre.add_argument("--eval-iter", type=PRE.option_type("eval_iter"), default=PRE.default("eval_iter"),
                     help="batches per printed loss (default: 5)")
    pre.add_argument("--prompt", default=PRE.default("prompt"), help="start of each epoch's sample")
    pre.add_argument("--sample-tokens", type=PRE.option_type("sample_tokens"), default=PRE.default("sample_tokens"),
                     help="tokens of each epoch's sample (default: 50)")
    pre.add_argument("--data-dir", default="data", help="where the-verdict is stored (default: data)")
    pre.add_argument("--out", default=None, help="run directory (default: runs/pretrain)")
    pre.add_argument("--device", default="auto", type=device_name,
                     help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    pre.add_argument("--save-every", type=PRE.option_type("save_every"), default=None, metavar="STEPS",
                     help="also save a checkpoint every STEPS optimizer steps (always: at each epoch end)")
    pre.add_argument("--resume", default=None, metavar="RUN_DIR",
                     help="continue the run in RUN_DIR from its checkpoint (give the same options)")
    pre.add_argument("--overwrite", action="store_true", help="replace what --out holds (refused otherwise)")
    add_lora_arguments(pre, head_help="the output head included")
    add_prompt_arguments(pre, "P-tuning (--method p-tuning)", default_text="random numbers, as peft")
    add_schedule_arguments(pre)
    pre.set_defaults(func=cmd_pretrain)

    add_instruct_parser(sub)
    add_prefer_parser(sub)
    add_bench_parser(sub)

    cls = sub.add_parser("classify", help="label a text with a classifier from `gptlora finetune`")
    cls.add_argument("--run", required=True, action="append",
                     help="the --out directory of a finetune run; repeat it for several LoRA runs that share a "
                          "base: they classify the text in one batch, one row each")
    cls.add_argument("text", help="the message to label")
    cls.add_argument("--device", default="auto", type=device_name, help="auto (cuda if available), cpu, cuda, ...")
    cls.set_defaults(func=cmd_classify)

    exp = sub.add_parser("export-peft", help="write a LoRA run's adapter in Hugging Face peft's format")
    exp.add_argument("--run", required=True, help="the --out directory of a `finetune --method lora` run")
    exp.add_argument("--out", required=True, help="directory for adapter_config.json + adapter_model.safetensors")
    exp.set_defaults(func=cmd_export_peft)
    add_debug_option(parser, sub.choices)  # last: every subcommand gets it
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # `finetune --resume` needs what was written
    if not hasattr(args, "func"):
        parser.print_help()
        return 0
    if hasattr(args, "resume"):  # a run's command: run_settings.options_given compares with its defaults
        args.defaults = vars(parser.parse_args([args.command]))
    try:
        with one_line_warnings():
            return args.func(args)
    except Exception as error:  # a user's mistake or a bug: one line either way, the traceback on request
        if debug_requested(args):
            raise
        print(error_line(error, USER_ERRORS), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
