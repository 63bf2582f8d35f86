"""``gptlora instruct`` (instruction fine-tuning, book chapter 7) and ``gptlora generate --instruction``.

The options become one ``recipes.settings.InstructSettings`` (``run_settings.instruct_settings``), checked
when it is made, which ``recipes.instruct_run.run_instruct`` then runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .checks import device_name
from .run_arguments import add_lora_arguments, add_model_arguments, add_schedule_arguments
from .run_settings import instruct_settings, options_given, resumed_arguments, run_options


def cmd_instruct(args) -> int:
    from ..infra.distributed import is_main_process, local_main_first, start_processes, stop_processes
    from ..instruction_data import load_instruction_data
    from ..recipes.instruct_run import run_instruct
    from ..recipes.run_dir import download_base
    from .app import pick_device

    args = resumed_arguments(args) if args.resume else args  # the run's own options
    settings = instruct_settings(args)  # bad options fail before any download
    out = args.out or "runs/instruct"
    device = pick_device(args.device)
    try:
        start_processes(device)  # under torchrun: join now, so that one process downloads first
        data = local_main_first(load_instruction_data, settings.data, settings.data_dir)
        local_main_first(download_base, settings.base_source)
        metrics = run_instruct(data, settings, out, device=device, resume=bool(args.resume),
                               overwrite=args.overwrite, command_options=run_options(args))
        if not is_main_process():  # under torchrun, rank 0 reports
            return 0
    finally:
        stop_processes()
    print(f"trainable parameters: {metrics['trainable_parameters']:,} (method {settings.method}); final training "
          f"loss {metrics['train_loss']:.3f}, validation loss {metrics['val_loss']:.3f}; training took "
          f"{metrics['training_seconds']:.1f} s")
    responses = ""
    if "test_responses" in metrics:
        print_scores(metrics["test_scores"])
        responses = f", the test split's responses in {metrics['test_responses']}"
    print(f"model and metrics.json are in {out}{responses}; try: gptlora generate --model {out} "
          "--instruction '...'")
    return 0


def add_instruct_parser(sub) -> None:
    """The ``instruct`` and ``score`` subcommands; numeric options take their range and default from
    ``InstructSettings``."""
    from ..recipes.settings import INSTRUCT_METHODS, InstructSettings as INS

    ins = sub.add_parser("instruct", help="fine-tune GPT-2 to follow instructions (book, chapter 7)")
    add_model_arguments(ins, random_init_help="random weights of that shape, configured as the book's chapter 5 "
                                              "(no download; to try the pipeline, not to get answers)")
    ins.set_defaults(model="gpt2-medium")
    ins.add_argument("--data", default="instruction-data",
                     help="'instruction-data' (the book's 1,100 records, downloaded to DATA_DIR on first use) or a "
                          "JSON file: a list of {instruction, input, output} records")
    ins.add_argument("--data-dir", default=INS.default("data_dir"),
                     help="where instruction-data is stored (default: data)")
    ins.add_argument("--method", default=INS.default("method"), choices=INSTRUCT_METHODS,
                     help="full: every weight (the book, default); lora: low-rank adapters only")
    ins.add_argument("--epochs", type=INS.option_type("epochs"), default=INS.default("epochs"),
                     help="passes over the training split (default: 2)")
    ins.add_argument("--lr", type=INS.option_type("lr"), default=INS.default("lr"),
                     help="AdamW learning rate (default: 5e-5)")
    ins.add_argument("--weight-decay", type=INS.option_type("weight_decay"), default=INS.default("weight_decay"),
                     help="AdamW weight decay (default: 0.1)")
    ins.add_argument("--batch-size", type=INS.option_type("batch_size"), default=INS.default("batch_size"),
                     help="records per optimizer step (default: 8)")
    ins.add_argument("--seed", type=INS.option_type("seed"), default=INS.default("seed"),
                     help="seeds shuffles and new weights (default: 123)")
    ins.add_argument("--eval-freq", type=INS.option_type("eval_freq"), default=INS.default("eval_freq"),
                     help="print losses every N steps (default: 5)")
    ins.add_argument("--eval-iter", type=INS.option_type("eval_iter"), default=INS.default("eval_iter"),
                     help="batches per printed loss (default: 5)")
    ins.add_argument("--max-length", type=INS.option_type("max_length"), default=None,
                     help="cut every example to this many tokens (default: the model's context length)")
    ins.add_argument("--mask-prompt", action="store_true",
                     help="take the loss over the response tokens only (the prompt's targets become -100)")
    ins.add_argument("--response-tokens", type=INS.option_type("response_tokens"),
                     default=INS.default("response_tokens"),
                     help="tokens of each answer to the test split, written to test-responses.json (default: "
                          "256; 0: no answers)")
    ins.add_argument("--out", default=None, help="run directory (default: runs/instruct)")
    ins.add_argument("--device", default="auto", type=device_name, help="auto (cuda if available), cpu, cuda, ...")
    ins.add_argument("--save-every", type=INS.option_type("save_every"), default=None, metavar="STEPS",
                     help="also save a checkpoint every STEPS optimizer steps (always: at each epoch end)")
    ins.add_argument("--resume", default=None, metavar="RUN_DIR",
                     help="continue the run in RUN_DIR from its checkpoint, with its own options")
    ins.add_argument("--overwrite", action="store_true", help="replace what --out holds (refused otherwise)")
    add_judge_arguments(ins)
    add_lora_arguments(ins, head_help="the output head included")
    add_schedule_arguments(ins)
    ins.set_defaults(func=cmd_instruct)

    score = sub.add_parser("score", help="score instruction responses against their reference outputs")
    score.add_argument("responses", help="a JSON list of records with output and model_response (an instruct run's "
                                         "test-responses.json, or the book's instruction-data-with-response.json)")
    add_judge_arguments(score)
    score.set_defaults(func=cmd_score)


def add_judge_arguments(parser: argparse.ArgumentParser) -> None:
    """``--judge-url`` and ``--judge-model``: the book's larger-model scoring, through a local server."""
    parser.add_argument("--judge-url", default=None, metavar="URL",
                        help="also ask a model served at this OpenAI-compatible API base for a 0-100 score, as the "
                             "book does, e.g. http://localhost:11434/v1 (Ollama); default: offline scores only")
    parser.add_argument("--judge-model", default="llama3", help="the judge's model name (default: llama3)")


def print_scores(scores: dict) -> None:
    """The mean scores: the offline ones on a line, the judge's (when asked) on the next."""
    print(f"test split ({scores['records']} records): exact match {scores['exact_match']:.1%}, token F1 "
          f"{scores['token_f1']:.3f}")
    if "judge" in scores:
        print_judge_score(scores)


def print_judge_score(scores: dict) -> None:
    unparsed = f" ({scores['judge_unparsed']} replies without a score)" if scores["judge_unparsed"] else ""
    print(f"judge ({scores['judge_model']}): {scores['judge']:.1f}/100{unparsed}")


def cmd_score(args) -> int:
    import json

    from ..instruction_scoring import check_judge_url, offline_scores, with_judge_scores

    path = Path(args.responses)
    if not path.is_file():
        raise FileNotFoundError(f"no responses file at {path}; pass an instruct run's test-responses.json")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a JSON file ({error}); expected a list of records") from None
    if not isinstance(records, list) or not records or not all(
            isinstance(r, dict) and isinstance(r.get("output"), str) and isinstance(r.get("model_response"), str)
            for r in records):
        raise ValueError(f"{path} is not a non-empty JSON list of records with the text fields output and "
                         "model_response")
    if args.judge_url is not None:
        check_judge_url(args.judge_url)
        if not all(isinstance(r.get("instruction"), str) and isinstance(r.get("input", ""), str) for r in records):
            raise ValueError(f"the judge is shown each record's instruction, but {path} has records without a text "
                             "field instruction (or with an input that is not text); score it without --judge-url")
    scores = offline_scores(records)
    print_scores(scores)  # first: a judge that fails leaves these on screen
    if args.judge_url is not None:
        print_judge_score(with_judge_scores(scores, records, args.judge_url, args.judge_model))
    return 0


def add_instruction_arguments(gen: argparse.ArgumentParser) -> None:
    """``generate --instruction/--input``: answer in the Alpaca format instead of continuing ``--prompt``."""
    gen.add_argument("--instruction", default=None,
                     help="answer this instruction (Alpaca prompt, as `gptlora instruct` trains) and print only "
                          "the response; --max-new-tokens then defaults to 256")
    gen.add_argument("--input", default=None, help="with --instruction: the input it refers to (optional)")


def generate_response(args, model) -> int:
    """Print ``model``'s response to ``--instruction`` (and ``--input``) for ``gptlora generate``."""
    from ..generation import get_tokenizer
    from ..recipes.instruct_run import respond

    max_new_tokens = args.max_new_tokens if "max_new_tokens" in options_given(args) else 256
    entry = dict(instruction=args.instruction, input=args.input or "")
    print(respond(model, entry, get_tokenizer(), max_new_tokens, temperature=args.temperature, top_k=args.top_k))
    return 0


def check_instruction_arguments(args) -> None:
    """One-line ValueErrors for ``--input`` without ``--instruction`` and for an empty ``--instruction``
    (before any model is loaded)."""
    if args.input is not None and args.instruction is None:
        raise ValueError("--input is the input of an --instruction; give --instruction too (or use --prompt)")
    if args.instruction is not None and not args.instruction.strip():
        raise ValueError("--instruction is empty: give the task to carry out, e.g. --instruction 'Rewrite the "
                         "sentence in passive voice.'")


def note_untuned(model_path: str, info: dict | None) -> None:
    """A stderr note when ``--instruction`` goes to a model that was not instruction fine-tuned."""
    if not info or "instruction" not in info:
        print(f"note: {model_path} was not instruction fine-tuned (`gptlora instruct`); expect a poor answer",
              file=sys.stderr)
