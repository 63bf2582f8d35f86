"""One settings object per kind of run, checked once when it is made.

A run of a recipe is described by one dataclass (:class:`FinetuneSettings` for
``finetune.run_finetune``, :class:`PretrainSettings` for ``pretrain_run.run_pretrain``,
:class:`InstructSettings` for ``instruct_run.run_instruct``, :class:`PreferenceSettings` for
``prefer_run.run_prefer``). They share the book's
appendix-D options (:class:`ScheduleSettings`: warmup, cosine decay, clipping, accumulation).
``gptlora`` builds it from the command line, the recipe reads it, and the run stores it:
its :meth:`~RunSettings.fingerprint` goes into the checkpoint (``--resume`` refuses a run
whose settings differ) and :meth:`~RunSettings.to_json` into ``metrics.json``. The same
object made in Python (``FinetuneSettings(method="lora", epochs=2)``) is checked the same way.

What every kind shares lives in :class:`RunSettings`; a new kind of run copies this pattern::

    @dataclass
    class InstructSettings(RunSettings):
        epochs: int = setting(2, whole_number(1), fingerprint=False)   # range checked in __post_init__
        ...
        def validate(self) -> None:   # checks between fields (optional)
            ...

``setting(default, check)`` declares a field with its allowed range (``infra.ranges``: the
very objects the command line parses with, see :meth:`RunSettings.option_type`), and whether it
belongs to the fingerprint (settings that may change on resume, such as ``epochs``, and where
files are, do not). This module imports no torch: the command line reads it while parsing.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path

from ..infra.ranges import (DECAYS, PRECISIONS, SCHEDULE_RANGES, SEED, NumberRange, check_precision, fraction,
                            positive_float, real_number, whole_number)


def setting(default, check: NumberRange | None = None, *, fingerprint: bool = True, optional: bool = False):
    """A dataclass field with a ``default``, a range ``check`` (None: no range), and whether the run's
    fingerprint includes it. ``optional``: None is allowed too (then the recipe's default applies)."""
    return field(default=default, metadata=dict(check=check, fingerprint=fingerprint, optional=optional))


@dataclass
class RunSettings:
    """The shared part of every kind of run's settings: checks, JSON, fingerprint, command-line types."""

    def __post_init__(self):
        for item in fields(self):
            check = item.metadata.get("check")
            if check is not None:
                check.check(item.name, getattr(self, item.name), optional=item.metadata["optional"])
        self.validate()

    def validate(self) -> None:
        """Checks between fields, and values completed from others (e.g. a method's default learning rate).
        Must give the same result when run again on its own output (``from_json(to_json())`` is the same)."""

    def to_json(self) -> dict:
        """The settings as JSON values (paths as strings), field by field."""
        return {item.name: _json_value(getattr(self, item.name)) for item in fields(self)}

    @classmethod
    def from_json(cls, values: dict):
        """Settings from :meth:`to_json`'s output (checked again); an unknown key is a ValueError."""
        unknown = sorted(set(values) - {item.name for item in fields(cls)})
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; expected some of "
                             f"{', '.join(item.name for item in fields(cls))}")
        return cls(**values)

    def fingerprint(self) -> dict:
        """The settings that define the run (JSON values): resuming with any of them different is refused."""
        return {name: value for name, value in self.to_json().items()
                if self.__dataclass_fields__[name].metadata.get("fingerprint", True)}

    def changed(self, **changes):
        """A copy with ``changes`` applied, checked again."""
        return replace(self, **changes)

    @classmethod
    def option_type(cls, name: str) -> NumberRange:
        """The range check of field ``name``, as an argparse ``type=`` (one range for both uses)."""
        return cls.__dataclass_fields__[name].metadata["check"]

    @classmethod
    def default(cls, name: str):
        """The default of field ``name`` (for the command line's ``default=``)."""
        value = cls.__dataclass_fields__[name].default
        assert value is not MISSING, f"{cls.__name__}.{name} has no plain default"
        return value


def _json_value(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_json_value(item) for item in value]
    if isinstance(value, dict):
        return {key: _json_value(item) for key, item in value.items()}
    return value


# --- appendix D: the learning-rate schedule and gradients of every training run ----------

SCHEDULE_FIELDS = ("warmup_steps", "initial_lr", "decay", "min_lr", "clip_grad_norm", "accumulation_steps")
# How the steps are computed (infra.precision, docs/performance.md): not appendix D, shared the same way.
SPEED_FIELDS = ("precision", "gradient_checkpointing", "compile")


@dataclass
class ScheduleSettings(RunSettings):
    """The book's appendix D, shared by every kind of training run: the fields of ``training.TrainingSchedule``
    (:attr:`schedule`), whose defaults change nothing (chapters 5 and 6 take the book's exact steps).

    In the fingerprint they are one ``schedule`` entry, present only when the schedule is not the default
    (``training.schedule_fingerprint``): the checkpoints of runs without one resume as they were written.
    Subclasses that override :meth:`validate` call ``super().validate()``.
    """

    warmup_steps: int = setting(0, SCHEDULE_RANGES["warmup_steps"], fingerprint=False)
    initial_lr: float = setting(0.0, SCHEDULE_RANGES["initial_lr"], fingerprint=False)
    decay: str = setting(DECAYS[0], fingerprint=False)
    min_lr: float = setting(0.0, SCHEDULE_RANGES["min_lr"], fingerprint=False)
    clip_grad_norm: float | None = setting(None, SCHEDULE_RANGES["clip_grad_norm"], fingerprint=False, optional=True)
    accumulation_steps: int = setting(1, SCHEDULE_RANGES["accumulation_steps"], fingerprint=False)
    # How the steps are computed. Only a precision other than the default changes the numbers enough to be in
    # the fingerprint (and only then, so older checkpoints resume); checkpointing and compiling do not.
    precision: str = setting(PRECISIONS[0], fingerprint=False)
    gradient_checkpointing: bool = setting(False, fingerprint=False)
    compile: bool = setting(False, fingerprint=False)

    def validate(self) -> None:
        self.schedule  # noqa: B018  (made once here: a bad decay fails now, not when training starts)
        check_precision(self.precision)

    @property
    def schedule(self):
        """The ``training.TrainingSchedule`` of these fields."""
        from ..training import TrainingSchedule  # torch: imported when settings are made, not when parsing

        return TrainingSchedule(**{name: getattr(self, name) for name in SCHEDULE_FIELDS})

    def fingerprint(self) -> dict:
        from ..training import schedule_fingerprint

        precision = {} if self.precision == PRECISIONS[0] else {"precision": self.precision}
        return {**super().fingerprint(), **schedule_fingerprint(self.schedule), **precision}

    def precision_on(self, device):
        """The ``infra.precision.Precision`` of this run on ``device`` (``auto`` resolved there)."""
        from ..infra.precision import Precision

        return Precision(self.precision, device)


def schedule_keywords(schedule) -> dict:
    """A ``training.TrainingSchedule`` (or None) as settings keywords: how the recipes' keyword wrappers
    (``finetune_spam(..., schedule=...)``) take one."""
    return {} if schedule is None else schedule.to_dict()


# --- chapter 6: fine-tuning a classifier (finetune.run_finetune, `gptlora finetune`) -----

# AdamW learning rates per method. LoRA's is the book's appendix E rate with its original scaling
# (alpha, 5e-5) carried over to alpha/rank: at rank 16, alpha 16 the update is 16 times smaller per
# step, and Adam moves every entry by about the learning rate, so 16 x 5e-5 = 8e-4 (roughly equivalent).
DEFAULT_LR = {"last-block": 5e-5, "full": 5e-5, "lora": 8e-4}
# Prompt and prefix tuning move a few vectors far from where they start: Lester et al. use 0.3 (Adafactor);
# peft's AdamW examples 3e-2 (prompt) and 1e-2 (prefix), 1e-3 (P-tuning).
DEFAULT_LR.update({"prompt-tuning": 3e-2, "prefix-tuning": 1e-2, "p-tuning": 1e-3})  # p-tuning: peft's example


@dataclass
class FinetuneSettings(ScheduleSettings):
    """Everything that decides a spam fine-tuning run (the book's chapter 6 defaults).

    ``method``: last-block (the book), full, lora (``use_dora`` in its options: DoRA), prompt-tuning,
    prefix-tuning or p-tuning; ``method_options`` its options (``classifier.method_settings``: completed
    with the method's defaults and checked here). The appendix-D fields: :class:`ScheduleSettings`.
    ``lr=None`` becomes the method's :data:`DEFAULT_LR`. ``base_source`` (``run_dir.base_source``)
    says how to rebuild the base, which a run that saves only an adapter needs; with ``quantize``
    in it (QLoRA) the method must be lora. ``base_model`` is the name the run records for it.
    """

    method: str = "last-block"
    method_options: dict | None = None
    data_dir: str | Path = setting("data", fingerprint=False)  # the data's SHA-256 is in the fingerprint
    epochs: int = setting(5, whole_number(1), fingerprint=False)  # may grow on resume
    lr: float | None = setting(None, positive_float(), optional=True)
    weight_decay: float = setting(0.1, real_number(0))
    batch_size: int = setting(8, whole_number(1))
    seed: int = setting(123, SEED)
    eval_freq: int = setting(50, whole_number(1))
    eval_iter: int = setting(5, whole_number(1))
    dynamic_padding: bool = False
    bucket_by_length: bool = False
    cache_prefix: bool = False
    save_every: int | None = setting(None, whole_number(1), fingerprint=False, optional=True)
    base_model: str | None = setting(None, fingerprint=False)
    base_source: dict | None = setting(None, fingerprint=False)

    def validate(self) -> None:
        from ..classifier import method_settings  # torch: imported when settings are made, not when parsing
        from ..prompt_tuning import PROMPT_METHODS
        from ..qlora import check_quantize_method

        super().validate()
        self.method_options = method_settings(self.method, self.method_options)  # complete: recorded in full
        check_quantize_method(self.quantize_method, self.method)
        if self.quantize_method and (self.method_options or {}).get("use_dora"):
            raise ValueError(f"--dora needs the base weights themselves (their row norms, at every step), found "
                             f"--quantize-base {self.quantize_method}: leave out one of the two")
        if self.cache_prefix and self.gradient_checkpointing:
            raise ValueError("--gradient-checkpointing recomputes blocks in the backward pass, and --cache-prefix "
                             "runs only the last one (the frozen blocks once per message): leave out one of the two")
        if self.cache_prefix and self.method != "last-block":
            why = ("its virtual tokens change what the frozen blocks compute at every step"
                   if self.method in PROMPT_METHODS
                   else "it trains the lower blocks too, so their output changes at every step")
            raise ValueError(f"cache_prefix works only with method 'last-block' (frozen blocks below the trained "
                             f"one); {self.method!r} cannot cache them: {why}")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.method]

    @property
    def quantize_method(self) -> str | None:
        """``"nf4"`` or ``"int8"`` for a QLoRA run's base (from ``base_source``), else None."""
        return ((self.base_source or {}).get("quantize") or {}).get("method")


# --- chapter 5: pretraining on a text (pretrain_run.run_pretrain, `gptlora pretrain`) ----

PRETRAIN_METHODS = ("full", "lora", "p-tuning")


@dataclass
class PretrainSettings(ScheduleSettings):
    """Everything that decides a pretraining run (the book's chapter 5 defaults).

    ``method``: full (the book), lora (``method_options``: ``classifier.lora_options``) or p-tuning
    (``prompt_tuning.prompt_method_options``; its soft prompt starts from random numbers, as peft's,
    unless ``init_text`` is given). The appendix-D fields: :class:`ScheduleSettings`.
    ``context_length=None``: the base's (256 for the book's random GPT-2 small). ``train_ratio``:
    the share of the text's characters to train on. Each epoch ends with a greedy sample of
    ``sample_tokens`` tokens after ``prompt``. ``base_source`` (``run_dir.base_source``) says which
    model to start from; ``text_name`` is what the run records as its text.
    """

    method: str = "full"
    method_options: dict | None = None
    context_length: int | None = setting(None, whole_number(1), optional=True)
    epochs: int = setting(10, whole_number(1), fingerprint=False)
    lr: float = setting(4e-4, positive_float())
    weight_decay: float = setting(0.1, real_number(0))
    batch_size: int = setting(2, whole_number(1))
    train_ratio: float = setting(0.90, fraction())
    seed: int = setting(123, SEED)
    eval_freq: int = setting(5, whole_number(1))
    eval_iter: int = setting(5, whole_number(1))
    prompt: str = "Every effort moves you"
    sample_tokens: int = setting(50, whole_number(1))
    save_every: int | None = setting(None, whole_number(1), fingerprint=False, optional=True)
    text_name: str | None = setting(None, fingerprint=False)
    base_source: dict | None = setting(None, fingerprint=False)

    def validate(self) -> None:
        from ..classifier import lora_options
        from ..prompt_tuning import prompt_method_options

        super().validate()
        if self.method not in PRETRAIN_METHODS:
            raise ValueError(f"unknown pretraining method {self.method!r}; choose one of {', '.join(PRETRAIN_METHODS)}")
        if self.method_options and self.method == "full":
            raise ValueError(f"method {self.method!r} takes no options, found {sorted(self.method_options)}")
        if self.method == "lora":
            self.method_options = lora_options(self.method_options)
        elif self.method == "p-tuning":
            self.method_options = prompt_method_options(self.method, {"init_text": None, **(self.method_options or {})})


# --- chapter 7: instruction fine-tuning (instruct_run.run_instruct, `gptlora instruct`) --

INSTRUCT_METHODS = ("full", "lora")


@dataclass
class InstructSettings(ScheduleSettings):
    """Everything that decides an instruction fine-tuning run (the book's chapter 7 defaults: batch 8,
    lr 5e-5, 2 epochs, 256-token answers).

    ``method``: full (the book) or lora (``method_options``: ``classifier.lora_options``). ``data``
    names where the records came from (``instruction-data``, or a JSON file: recorded; the records' own
    SHA-256 is in the fingerprint).
    ``max_length=None``: the base's context length. ``mask_prompt``: the loss over the responses only.
    After training, ``response_tokens`` greedy tokens answer each test record (0: none), scored against
    the references and, with ``judge_url``, by a judge model. ``base_source`` (``run_dir.base_source``):
    the model to start from. The training itself is a pretraining run (:meth:`pretrain_settings`).
    """

    method: str = "full"
    method_options: dict | None = None
    data: str | None = setting(None, fingerprint=False)  # where the records came from (recorded only)
    data_dir: str | Path = setting("data", fingerprint=False)
    epochs: int = setting(2, whole_number(1), fingerprint=False)
    lr: float = setting(5e-5, positive_float())
    weight_decay: float = setting(0.1, real_number(0))
    batch_size: int = setting(8, whole_number(1))
    seed: int = setting(123, SEED)
    eval_freq: int = setting(5, whole_number(1))
    eval_iter: int = setting(5, whole_number(1))
    max_length: int | None = setting(None, whole_number(2), optional=True)
    mask_prompt: bool = False
    response_tokens: int = setting(256, whole_number(0), fingerprint=False)
    save_every: int | None = setting(None, whole_number(1), fingerprint=False, optional=True)
    judge_url: str | None = setting(None, fingerprint=False)
    judge_model: str = setting("llama3", fingerprint=False)
    base_source: dict | None = setting(None, fingerprint=False)

    def validate(self) -> None:
        from ..classifier import lora_options

        super().validate()
        if self.method not in INSTRUCT_METHODS:
            raise ValueError(f"unknown instruction fine-tuning method {self.method!r}; choose one of "
                             f"{', '.join(INSTRUCT_METHODS)}")
        if self.method_options and self.method != "lora":
            raise ValueError(f"method {self.method!r} takes no options, found {sorted(self.method_options)}")
        self.method_options = lora_options(self.method_options) if self.method == "lora" else None
        if self.judge_url is not None:  # before any training: a bad address would fail only after it
            from ..instruction_scoring import check_judge_url

            check_judge_url(self.judge_url)

    def pretrain_settings(self, context_length: int, prompt: str) -> PretrainSettings:
        """The settings of the training itself: chapter 5's loop over the instruction batches, with windows
        of ``context_length`` tokens and ``prompt`` (a validation record's) sampled after each epoch."""
        same = {name: getattr(self, name) for name in (
            "method", "method_options", "epochs", "lr", "weight_decay", "batch_size", "seed", "eval_freq",
            "eval_iter", "save_every", "base_source", *SCHEDULE_FIELDS, *SPEED_FIELDS)}
        return PretrainSettings(**same, context_length=context_length, prompt=prompt, text_name=self.data)


# --- chapter 12: preference tuning with DPO (prefer_run.run_prefer, `gptlora prefer`) ----

PREFERENCE_METHODS = ("full", "lora")
LOGPROB_MODES = ("mean", "sum")


@dataclass
class PreferenceSettings(ScheduleSettings):
    """Everything that decides a DPO run (the defaults: the book's dpo-from-scratch notebook: beta 0.1,
    AdamW lr 5e-6 and weight decay 0.01, batch 8, 1 epoch, losses every 5 steps over 5 batches).

    ``method``: full (every weight; the reference is a frozen copy) or lora (adapters only; the reference
    is the same model with its adapters off; ``method_options``: ``classifier.lora_options``).
    ``logprobs``: ``mean`` per answer token (the book) or ``sum`` (the paper, ``trl``), see
    ``preference.sequence_logprobs``. ``mask_prompt``: score the answers only (the book's default).
    ``max_length=None``: the model's context length. After training, ``response_tokens`` greedy tokens
    answer each test record before (the reference) and after (0: none). ``base_source``
    (``run_dir.base_source``): the model to start from, an ``instruct`` run's directory or any GPT-2.
    """

    method: str = "full"
    method_options: dict | None = None
    beta: float = setting(0.1, positive_float())
    logprobs: str = "mean"
    data: str | None = setting(None, fingerprint=False)
    data_dir: str | Path = setting("data", fingerprint=False)
    epochs: int = setting(1, whole_number(1), fingerprint=False)
    lr: float = setting(5e-6, positive_float())
    weight_decay: float = setting(0.01, real_number(0))
    batch_size: int = setting(8, whole_number(1))
    seed: int = setting(123, SEED)
    eval_freq: int = setting(5, whole_number(1))
    eval_iter: int = setting(5, whole_number(1))
    max_length: int | None = setting(None, whole_number(2), optional=True)
    mask_prompt: bool = True
    response_tokens: int = setting(256, whole_number(0), fingerprint=False)
    save_every: int | None = setting(None, whole_number(1), fingerprint=False, optional=True)
    base_source: dict | None = setting(None, fingerprint=False)

    def validate(self) -> None:
        from ..classifier import lora_options

        super().validate()
        if self.method not in PREFERENCE_METHODS:
            raise ValueError(f"unknown preference tuning method {self.method!r}; choose one of "
                             f"{', '.join(PREFERENCE_METHODS)}")
        if self.logprobs not in LOGPROB_MODES:
            raise ValueError(f"logprobs: expected one of {', '.join(LOGPROB_MODES)}, found {self.logprobs!r}")
        if self.method_options and self.method != "lora":
            raise ValueError(f"method {self.method!r} takes no options, found {sorted(self.method_options)}")
        self.method_options = lora_options(self.method_options) if self.method == "lora" else None
