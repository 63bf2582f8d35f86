"""The settings dataclasses: checked once when made, with the command line's own ranges; JSON round trip;
a fingerprint with the same keys as before they existed (so older checkpoints still resume)."""

from __future__ import annotations

import math

import pytest

from gptlora.cli import app as cli
from gptlora.cli.run_settings import finetune_settings
from gptlora.infra.ranges import whole_number
from gptlora.recipes.settings import (DEFAULT_LR, SCHEDULE_FIELDS, FinetuneSettings, InstructSettings,
                                      PretrainSettings, ScheduleSettings)

# The settings part of the checkpoint fingerprints written before the settings dataclasses: a run
# checkpointed then resumes now only if these keys (and their values) are unchanged.
FINETUNE_FINGERPRINT = {"method", "method_options", "seed", "lr", "weight_decay", "batch_size", "eval_freq",
                        "eval_iter", "dynamic_padding", "bucket_by_length", "cache_prefix"}
PRETRAIN_FINGERPRINT = {"method", "method_options", "seed", "lr", "weight_decay", "batch_size", "eval_freq",
                        "eval_iter", "context_length", "train_ratio", "prompt", "sample_tokens"}


@pytest.mark.parametrize("kind, changes, message", [
    (FinetuneSettings, dict(epochs=0), "epochs: expected a whole number of at least 1, found 0"),
    (FinetuneSettings, dict(lr=math.inf), "lr: expected a finite number above 0, found inf"),
    (FinetuneSettings, dict(seed=-1), "seed: expected a whole number from 0 to 4294967295, found -1"),
    (FinetuneSettings, dict(batch_size=2.5), "batch_size: expected a whole number of at least 1, found 2.5"),
    (FinetuneSettings, dict(eval_freq=True), "eval_freq: expected a whole number of at least 1, found True"),
    (FinetuneSettings, dict(method="bogus"), "unknown fine-tuning method 'bogus'"),
    (FinetuneSettings, dict(method="full", method_options=dict(rank=4)), "method 'full' takes no options"),
    (FinetuneSettings, dict(method="lora", method_options=dict(rank=0)), "rank must be a positive integer"),
    (FinetuneSettings, dict(method="full", cache_prefix=True), "cache_prefix works only with method 'last-block'"),
    (FinetuneSettings, dict(base_source=dict(quantize=dict(method="nf4"))), "trains only with --method lora"),
    (PretrainSettings, dict(train_ratio=1.0), "train_ratio: expected a finite number above 0 and below 1"),
    (PretrainSettings, dict(weight_decay=math.nan), "weight_decay: expected a finite number of at least 0"),
    (PretrainSettings, dict(context_length=0), "context_length: expected a whole number of at least 1, found 0"),
    (PretrainSettings, dict(method="last-block"), "unknown pretraining method 'last-block'"),
    (PretrainSettings, dict(method="full", method_options=dict(rank=4)), "method 'full' takes no options"),
    (PretrainSettings, dict(method="p-tuning", method_options=dict(encoder="gru")), "unknown P-tuning prompt encoder"),
    (FinetuneSettings, dict(method="lora", method_options=dict(use_dora=True), base_source=dict(quantize=dict(
        method="nf4"))), "--dora needs the base weights themselves"),
    (FinetuneSettings, dict(warmup_steps=-1), "warmup_steps: expected a whole number of at least 0, found -1"),
    (PretrainSettings, dict(clip_grad_norm=0.0), "clip_grad_norm: expected a finite number above 0, found 0.0"),
    (PretrainSettings, dict(decay="linear"), "decay: expected one of none, cosine, found 'linear'"),
    (InstructSettings, dict(accumulation_steps=0), "accumulation_steps: expected a whole number of at least 1"),
    (InstructSettings, dict(method="p-tuning"), "unknown instruction fine-tuning method 'p-tuning'"),
    (InstructSettings, dict(max_length=1), "max_length: expected a whole number of at least 2, found 1"),
])
def test_bad_settings_are_refused_when_made(kind, changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        kind(**changes)


def test_settings_are_completed_once_and_survive_json():
    settings = FinetuneSettings(method="lora", method_options=dict(rank=4), save_every=10)
    assert settings.lr == DEFAULT_LR["lora"] and settings.method_options["alpha"] == 16  # completed
    assert FinetuneSettings.from_json(settings.to_json()) == settings  # completing again changes nothing
    assert settings.changed(epochs=7).epochs == 7
    with pytest.raises(ValueError, match="epochs: expected"):
        settings.changed(epochs=-1)  # a copy is checked again
    with pytest.raises(ValueError, match=r"unknown FinetuneSettings field\(s\) \['rnak'\]"):
        FinetuneSettings.from_json({"rnak": 4})
    pretrain = PretrainSettings(method="lora")
    assert PretrainSettings.from_json(pretrain.to_json()) == pretrain


def test_fingerprints_keep_their_keys_and_leave_out_what_may_change():
    assert set(FinetuneSettings().fingerprint()) == FINETUNE_FINGERPRINT
    assert set(PretrainSettings().fingerprint()) == PRETRAIN_FINGERPRINT
    # epochs and save_every may change on resume: they are not part of it
    assert FinetuneSettings(epochs=9, save_every=3).fingerprint() == FinetuneSettings().fingerprint()


def test_a_schedule_other_than_the_default_is_one_fingerprint_entry():
    """Appendix D's options are settings like the others, but the fingerprint holds them as one ``schedule``
    entry, and only when they change the run: a checkpoint written without one still resumes."""
    from gptlora.training import TrainingSchedule

    scheduled = FinetuneSettings(warmup_steps=2, decay="cosine", clip_grad_norm=1.0)
    assert scheduled.fingerprint()["schedule"] == TrainingSchedule(warmup_steps=2, decay="cosine",
                                                                   clip_grad_norm=1.0).to_dict()
    assert set(scheduled.fingerprint()) == FINETUNE_FINGERPRINT | {"schedule"}
    assert FinetuneSettings.from_json(scheduled.to_json()) == scheduled
    instruct = InstructSettings(method="lora", accumulation_steps=2, base_source=dict(model="m"))
    pretrain = instruct.pretrain_settings(64, "### Instruction:")  # what the instruct recipe trains with
    assert pretrain.schedule == instruct.schedule and pretrain.method_options == instruct.method_options
    assert (pretrain.context_length, pretrain.lr, pretrain.epochs) == (64, 5e-5, 2)


def test_the_command_line_parses_with_the_settings_ranges_and_defaults():
    """One range and one default per option: the parser's come from the settings' fields."""
    parser = cli.build_parser()
    for command, kind in (("finetune", FinetuneSettings), ("pretrain", PretrainSettings)):
        sub = parser._subparsers._group_actions[0].choices[command]
        actions = {action.dest: action for action in sub._actions}
        for name in ("epochs", "lr", "weight_decay", "batch_size", "seed", "eval_freq", "eval_iter", "save_every"):
            assert actions[name].type is kind.option_type(name), (command, name)
            if name != "save_every":
                assert actions[name].default == kind.default(name), (command, name)
    for command in ("finetune", "pretrain", "instruct"):  # appendix D: the same fields on every training command
        actions = {action.dest: action
                   for action in parser._subparsers._group_actions[0].choices[command]._actions}
        for name in SCHEDULE_FIELDS:
            if name != "decay":
                assert actions[name].type is ScheduleSettings.option_type(name), (command, name)
            assert actions[name].default == ScheduleSettings.default(name), (command, name)
    instruct = {action.dest: action for action in parser._subparsers._group_actions[0].choices["instruct"]._actions}
    for name in ("epochs", "lr", "batch_size", "max_length", "response_tokens"):
        assert instruct[name].type is InstructSettings.option_type(name), name
    assert isinstance(FinetuneSettings.option_type("epochs"), type(whole_number(1)))


def counting(monkeypatch, module, name) -> list:
    """Replace ``module.name`` by a wrapper that records each call's arguments in the returned list."""
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls


def test_the_command_line_builds_settings_once(monkeypatch):
    """``method_settings`` (the method's options, completed and checked) and the check that the method may
    train on a quantized base each run once for a finetune command line (three times each, before)."""
    import gptlora.classifier as classifier
    import gptlora.qlora as qlora

    method_calls = counting(monkeypatch, classifier, "method_settings")
    quantize_calls = counting(monkeypatch, qlora, "check_quantize_method")
    argv = ["finetune", "--method", "lora", "--rank", "4", "--epochs", "2", "--quantize-base", "nf4"]
    args = cli.build_parser().parse_args(argv)
    args.argv = argv
    settings = finetune_settings(args)
    assert len(method_calls) == 1 and len(quantize_calls) == 1
    assert settings.method_options["rank"] == 4 and settings.epochs == 2 and settings.quantize_method == "nf4"
    assert settings.base_source["random_init"] is False and settings.base_model == "gpt2-small"


def test_dora_p_tuning_and_the_schedule_reach_the_settings_from_the_command_line():
    from gptlora.cli.run_settings import instruct_settings, pretrain_settings

    def parsed(argv):
        args = cli.build_parser().parse_args(argv)
        args.argv = argv
        return args

    lora = finetune_settings(parsed(["finetune", "--method", "lora", "--dora", "--warmup-steps", "3",
                                     "--decay", "cosine"]))
    assert lora.method_options["use_dora"] is True and lora.fingerprint()["schedule"]["warmup_steps"] == 3
    prompt = finetune_settings(parsed(["finetune", "--method", "p-tuning", "--prompt-encoder", "lstm",
                                       "--encoder-hidden", "8"]))
    assert (prompt.method_options["encoder"], prompt.method_options["hidden"], prompt.lr) == ("lstm", 8, 1e-3)
    pre = pretrain_settings(parsed(["pretrain", "--method", "p-tuning", "--num-virtual-tokens", "4",
                                    "--accumulation-steps", "2"]))
    assert pre.method_options["num_virtual_tokens"] == 4 and pre.method_options["init_text"] is None
    assert pre.schedule.accumulation_steps == 2
    ins = instruct_settings(parsed(["instruct", "--method", "lora", "--rank", "4", "--clip-grad-norm", "1"]))
    assert ins.method_options["rank"] == 4 and ins.clip_grad_norm == 1.0 and ins.data == "instruction-data"
