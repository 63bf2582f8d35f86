"""``gptlora instruct`` (instruction fine-tuning, book chapter 7) and ``gptlora generate --instruction``.

The options become one :class:`InstructSettings`, checked when it is made, which
``recipes.instruct_run.instruct_finetune`` then runs.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .checks import SEED, device_name, positive_float, real_number, whole_number
from .schedule_options import add_schedule_arguments, schedule_from_args

METHODS = ("full", "lora")


@dataclass
class InstructSettings:
    """Everything an instruction fine-tuning run needs; a bad value is a one-line ValueError on creation.

    The defaults are the book's chapter 7 (GPT-2 medium, batch 8, lr 5e-5, 2 epochs,
    256-token answers); ``method_options`` are LoRA's (see ``classifier.lora_options``).
    """

    model: str = "gpt2-medium"
    models_dir: str = "weights"
    random_init: bool = False
    data: str = "instruction-data"
    data_dir: str = "data"
    method: str = "full"
    method_options: dict | None = None
    epochs: int = 2
    lr: float = 5e-5
    weight_decay: float = 0.1
    batch_size: int = 8
    seed: int = 123
    eval_freq: int = 5
    eval_iter: int = 5
    max_length: int | None = None
    mask_prompt: bool = False
    response_tokens: int = 256
    out: str = "runs/instruct"
    device: str = "auto"
    save_every: int | None = None
    resume: bool = False
    overwrite: bool = False
    schedule: object = field(default=None)  # training.TrainingSchedule; None: the default one
    judge_url: str | None = None
    judge_model: str = "llama3"

    def __post_init__(self):
        from ..classifier import lora_options
        from ..training import TrainingSchedule

        if self.method not in METHODS:
            raise ValueError(f"unknown instruction fine-tuning method {self.method!r}; choose one of "
                             f"{', '.join(METHODS)}")
        if self.method == "lora":
            self.method_options = lora_options(self.method_options)
        elif self.method_options:
            raise ValueError(f"method {self.method!r} takes no options, found {sorted(self.method_options)}")
        for name in ("epochs", "batch_size", "eval_freq", "eval_iter"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a whole number of at least 1, found {getattr(self, name)!r}")
        for name, minimum in (("max_length", 2), ("save_every", 1)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < minimum):
                raise ValueError(f"{name} must be a whole number of at least {minimum}, found {value!r}")
        if not isinstance(self.response_tokens, int) or self.response_tokens < 0:
            raise ValueError(f"response_tokens must be a whole number of 0 or more, found {self.response_tokens!r}")
        if not self.lr > 0 or not self.weight_decay >= 0:
            raise ValueError(f"lr must be above 0 and weight_decay 0 or more, found {self.lr} and {self.weight_decay}")
        if self.resume and self.overwrite:
            raise ValueError("resume continues the run in its directory and overwrite replaces it: choose one")
        self.schedule = self.schedule or TrainingSchedule()
        if not isinstance(self.schedule, TrainingSchedule):
            raise ValueError(f"schedule must be a training.TrainingSchedule, found {type(self.schedule).__name__}")

    def run(self, command_options: dict | None = None) -> dict:
        """Download what is missing (the data, a named model), train, answer the test split; the metrics
        (None on the other processes under ``torchrun``: rank 0 reports)."""
        from ..infra.distributed import is_main_process, local_main_first, start_processes, stop_processes
        from ..instruction_data import load_instruction_data
        from ..recipes.instruct_run import instruct_finetune
        from ..recipes.pretrain_run import base_source
        from .app import pick_device

        source = base_source(self.model, self.models_dir, self.random_init, self.seed)
        device = pick_device(self.device)
        try:
            start_processes(device)  # under torchrun: join now, so that one process downloads first
            data = local_main_first(load_instruction_data, self.data, self.data_dir)
            local_main_first(download_named_model, source)
            metrics = instruct_finetune(data, self.out, source, method=self.method,
                                        method_options=self.method_options,
                                        epochs=self.epochs, lr=self.lr, weight_decay=self.weight_decay,
                                        batch_size=self.batch_size, seed=self.seed, eval_freq=self.eval_freq,
                                        eval_iter=self.eval_iter, max_length=self.max_length,
                                        mask_prompt=self.mask_prompt, response_tokens=self.response_tokens,
                                        device=device, data_name=self.data, save_every=self.save_every,
                                        resume=self.resume, overwrite=self.overwrite, command_options=command_options,
                                        schedule=self.schedule, judge_url=self.judge_url,
                                        judge_model=self.judge_model)
            return metrics if is_main_process() else None  # asked before the processes part
        finally:
            stop_processes()

    def to_dict(self) -> dict:
        """The settings as JSON-able values (the schedule as its fields)."""
        return {**asdict(self), "schedule": self.schedule.to_dict()}


def download_named_model(source: dict) -> None:
    """Download a named GPT-2 the run will load (nothing for a directory or random weights)."""
    from ..pretrained import download_gpt2, preset_named

    if not source["random_init"] and not Path(source["model"]).is_dir():
        download_gpt2(preset_named(source["model"]), source["models_dir"])


def settings_from_args(args: argparse.Namespace) -> InstructSettings:
    """The :class:`InstructSettings` of parsed ``gptlora instruct`` options."""
    from .app import lora_method_options

    return InstructSettings(model=args.model, models_dir=args.models_dir, random_init=args.random_init,
                            data=args.data, data_dir=args.data_dir, method=args.method,
                            method_options=lora_method_options(args), epochs=args.epochs, lr=args.lr,
                            weight_decay=args.weight_decay, batch_size=args.batch_size, seed=args.seed,
                            eval_freq=args.eval_freq, eval_iter=args.eval_iter, max_length=args.max_length,
                            mask_prompt=args.mask_prompt, response_tokens=args.response_tokens,
                            out=args.out or "runs/instruct", device=args.device, save_every=args.save_every,
                            resume=bool(args.resume), overwrite=args.overwrite, schedule=schedule_from_args(args),
                            judge_url=args.judge_url, judge_model=args.judge_model)


def cmd_instruct(args) -> int:
    from .app import NOT_RUN_OPTIONS, resumed_arguments

    args = resumed_arguments(args) if args.resume else args  # the run's own options
    settings = settings_from_args(args)
    metrics = settings.run(command_options={k: v for k, v in vars(args).items() if k not in NOT_RUN_OPTIONS})
    if metrics is None:  # under torchrun, rank 0 reports
        return 0
    print(f"trainable parameters: {metrics['trainable_parameters']:,} (method {settings.method}); final training "
          f"loss {metrics['train_loss']:.3f}, validation loss {metrics['val_loss']:.3f}; training took "
          f"{metrics['training_seconds']:.1f} s")
    responses = ""
    if "test_responses" in metrics:
        print_scores(metrics["test_scores"])
        responses = f", the test split's responses in {metrics['test_responses']}"
    print(f"model and metrics.json are in {settings.out}{responses}; try: gptlora generate --model {settings.out} "
          "--instruction '...'")
    return 0


def add_instruct_parser(sub, add_model_arguments, add_lora_arguments) -> None:
    """The ``instruct`` subcommand (the model and LoRA option helpers are ``app``'s, shared by the commands)."""
    ins = sub.add_parser("instruct", help="fine-tune GPT-2 to follow instructions (book, chapter 7)")
    add_model_arguments(ins, random_init_help="random weights of that shape, configured as the book's chapter 5 "
                                              "(no download; to try the pipeline, not to get answers)")
    ins.set_defaults(model="gpt2-medium")
    ins.add_argument("--data", default="instruction-data",
                     help="'instruction-data' (the book's 1,100 records, downloaded to DATA_DIR on first use) or a "
                          "JSON file: a list of {instruction, input, output} records")
    ins.add_argument("--data-dir", default="data", help="where instruction-data is stored (default: data)")
    ins.add_argument("--method", default="full", choices=METHODS,
                     help="full: every weight (the book, default); lora: low-rank adapters only")
    ins.add_argument("--epochs", type=whole_number(1), default=2, help="passes over the training split (default: 2)")
    ins.add_argument("--lr", type=positive_float(), default=5e-5, help="AdamW learning rate (default: 5e-5)")
    ins.add_argument("--weight-decay", type=real_number(0), default=0.1, help="AdamW weight decay (default: 0.1)")
    ins.add_argument("--batch-size", type=whole_number(1), default=8, help="records per optimizer step (default: 8)")
    ins.add_argument("--seed", type=SEED, default=123, help="seeds shuffles and new weights (default: 123)")
    ins.add_argument("--eval-freq", type=whole_number(1), default=5, help="print losses every N steps (default: 5)")
    ins.add_argument("--eval-iter", type=whole_number(1), default=5, help="batches per printed loss (default: 5)")
    ins.add_argument("--max-length", type=whole_number(2), default=None,
                     help="cut every example to this many tokens (default: the model's context length)")
    ins.add_argument("--mask-prompt", action="store_true",
                     help="take the loss over the response tokens only (the prompt's targets become -100)")
    ins.add_argument("--response-tokens", type=whole_number(0), default=256,
                     help="tokens of each answer to the test split, written to test-responses.json (default: "
                          "256; 0: no answers)")
    ins.add_argument("--out", default=None, help="run directory (default: runs/instruct)")
    ins.add_argument("--device", default="auto", type=device_name, help="auto (cuda if available), cpu, cuda, ...")
    ins.add_argument("--save-every", type=whole_number(1), default=None, metavar="STEPS",
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
    """One line of mean scores."""
    judge = (f", judge ({scores['judge_model']}) {scores['judge']:.1f}/100"
             + (f" ({scores['judge_unparsed']} replies without a score)" if scores["judge_unparsed"] else "")
             if "judge" in scores else "")
    print(f"test split ({scores['records']} records): exact match {scores['exact_match']:.1%}, token F1 "
          f"{scores['token_f1']:.3f}{judge}")


def cmd_score(args) -> int:
    import json

    from ..instruction_scoring import score_responses

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
    print_scores(score_responses(records, args.judge_url, args.judge_model))
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
    from .app import options_given

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
