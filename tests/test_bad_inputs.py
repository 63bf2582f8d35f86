"""Every subcommand against bad input: one ``error:`` line, a non-zero exit, no traceback, nothing written.

One row per case in ``BAD_INPUTS``: the command line (``{name}`` is a path of the
``made`` fixture below), a fragment the error line must contain, and the paths
(relative to the case's own folder ``{tmp}``) that must not exist afterwards. To cover
a new subcommand, add rows; the fixture has tiny models, runs and data to point at.

stderr must be exactly that one ``error:`` line. The only other line allowed is a
``warning:`` line the row names (``warning=``): a spam file that is not UCI's is
announced before it is read, so the cases of a broken spam file print that warning and
then their error. The download's progress bar is switched off here: a bar drawn before a
failure (a download whose bytes then fail verification) is progress, not the report. (No
other bar starts before any of these errors.)
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gptlora.cli import app as cli
from gptlora.infra import download


@dataclass(frozen=True)
class Bad:
    """``gptlora ARGV`` must fail with ``expected`` in its one ``error:`` line and leave no ``absent`` path."""

    name: str
    argv: tuple[str, ...]
    expected: str
    absent: tuple[str, ...] = ()
    env: dict = field(default_factory=dict)
    warning: str = ""  # a fragment of the one warning: line that comes before the error, if any
    non_root: bool = False  # file permissions do not stop root: such a case is skipped for root

    def __hash__(self):
        return hash(self.name)


def finetune(*options, model="{tiny}", out="{tmp}/run"):
    """A finetune command line on the tiny model and the small splits, writing to ``out``."""
    return ("finetune", "--model", model, "--data-dir", "{data}", "--device", "cpu", "--out", out, *options)


def pretrain(text, *options, out="{tmp}/run"):
    """A pretrain command line on the tiny model's shape (random weights) and ``text``, writing to ``out``."""
    return ("pretrain", "--text", text, "--model", "{tiny}", "--random-init", "--device", "cpu", "--out", out,
            *options)


RUN = ("{tmp}/run",)
NOT_UCI = "is not byte for byte UCI's SMSSpamCollection"
BAD_INPUTS = [
    # --- the command itself
    Bad("unknown command", ("frobnicate",), "invalid choice: 'frobnicate'"),
    Bad("unknown option", ("finetune", "--epoch-count", "3"), "unrecognized arguments: --epoch-count"),
    Bad("classify without --run", ("classify", "hello"), "the following arguments are required: --run"),
    # --- download
    Bad("download: unknown name", ("download", "gpt2-tiny", "--models-dir", "{tmp}/w"),
        "unknown GPT-2 preset 'gpt2-tiny'", ("{tmp}/w",)),
    Bad("download: offline", ("download", "gpt2-small", "--models-dir", "{tmp}/w"), "GPTLORA_OFFLINE=1 and gpt2-small",
        ("{tmp}/w",), env={"GPTLORA_OFFLINE": "1"}),
    Bad("download: server without the file", ("download", "gpt2-small", "--models-dir", "{tmp}/w", "--base-url",
                                              "{server}/nothing"), "HTTP 404",
        ("{tmp}/w",)),  # not even an empty folder
    Bad("download: damaged answer", ("download", "gpt2-small", "--models-dir", "{tmp}/w", "--base-url",
                                      "{server}/damaged"), "has SHA-256", ("{tmp}/w",)),
    Bad("download: base URL not a URL", ("download", "gpt2-small", "--models-dir", "{tmp}/w", "--base-url",
                                         "huggingface.co"),
        "'huggingface.co' (--base-url or GPTLORA_HF_BASE_URL) is not an http:// or https:// URL", ("{tmp}/w",)),
    Bad("download: --models-dir is a file", ("download", "gpt2-small", "--models-dir", "{a_file}"),
        "is a file, not a directory"),
    # --- generate: numbers
    Bad("generate: negative tokens", ("generate", "--random-init", "--max-new-tokens", "-3"),
        "--max-new-tokens: expected a whole number of at least 1, found -3"),
    Bad("generate: zero tokens", ("generate", "--random-init", "--max-new-tokens", "0"), "of at least 1, found 0"),
    Bad("generate: tokens not a number", ("generate", "--max-new-tokens", "ten"), "found 'ten'"),
    Bad("generate: temperature nan", ("generate", "--temperature", "nan"),
        "--temperature: expected a finite number of at least 0, found 'nan'"),
    Bad("generate: temperature inf", ("generate", "--temperature", "inf"), "found 'inf'"),
    Bad("generate: negative temperature", ("generate", "--temperature", "-0.5"), "found '-0.5'"),
    Bad("generate: top-k 0", ("generate", "--top-k", "0"), "--top-k: expected a whole number of at least 1, found 0"),
    Bad("generate: top-k fraction", ("generate", "--top-k", "2.5"), "found '2.5'"),
    Bad("generate: negative seed", ("generate", "--seed", "-1"),
        "--seed: expected a whole number from 0 to 4294967295"),
    Bad("generate: huge seed", ("generate", "--seed", str(2**40)), "from 0 to 4294967295, found 1099511627776"),
    # --- generate: models
    Bad("generate: unknown model name", ("generate", "--model", "gpt3", "--models-dir", "{tmp}/w"),
        "'gpt3' is neither a directory nor a GPT-2 name", ("{tmp}/w",)),
    Bad("generate: no config.json", ("generate", "--model", "{no_config}"), "config.json not found"),
    Bad("generate: no weights", ("generate", "--model", "{no_weights}"), "model.safetensors not found"),
    Bad("generate: random init, no config.json", ("generate", "--random-init", "--model", "{no_config}"),
        "config.json not found; random weights take their shape"),
    Bad("generate: truncated weights", ("generate", "--model", "{truncated}"), "may be truncated or corrupt"),
    Bad("generate: empty weights file", ("generate", "--model", "{empty_weights}"), "may be truncated or corrupt"),
    Bad("generate: pickle, not safetensors", ("generate", "--model", "{pickled}"), "not a readable safetensors file"),
    Bad("generate: text as weights", ("generate", "--model", "{text_weights}"), "not a readable safetensors file"),
    Bad("generate: config lacks a key", ("generate", "--model", "{config_no_n_embd}"),
        "config.json lacks the GPT-2 field 'n_embd'"),
    Bad("generate: config wrong type", ("generate", "--model", "{config_n_layer_text}"),
        "n_layer='two': expected a whole number of at least 1"),
    Bad("generate: config negative", ("generate", "--random-init", "--model", "{config_n_head_zero}"),
        "n_head=0: expected a whole number of at least 1"),
    Bad("generate: config not JSON", ("generate", "--model", "{config_not_json}"), "is not valid JSON"),
    Bad("generate: config a list", ("generate", "--model", "{config_list}"), "expected a JSON object"),
    Bad("generate: config binary", ("generate", "--model", "{config_binary}"), "is not UTF-8 text"),
    Bad("generate: config.json is a directory", ("generate", "--model", "{config_is_dir}"),
        "config.json is a directory, not a file"),
    Bad("generate: weights are a directory", ("generate", "--model", "{weights_are_dir}"),
        "model.safetensors is a directory, not a file"),
    Bad("generate: config.json unreadable", ("generate", "--model", "{config_unreadable}"), "permission denied for",
        non_root=True),
    Bad("generate: config of another shape", ("generate", "--model", "{other_shape}"),
        "does not match the GPT-2 shape of its config.json"),
    Bad("generate: empty prompt", ("generate", "--random-init", "--model", "{tiny}", "--prompt", ""),
        "--prompt is empty"),
    # --- finetune: numbers (checked before anything is read)
    Bad("finetune: epochs 0", finetune("--epochs", "0"), "--epochs: expected a whole number of at least 1, found 0",
        RUN),
    Bad("finetune: epochs negative", finetune("--epochs", "-2"), "found -2", RUN),
    Bad("finetune: epochs fraction", finetune("--epochs", "1.5"), "found '1.5'", RUN),
    Bad("finetune: batch size 0", finetune("--batch-size", "0"), "--batch-size: expected a whole number of at least 1",
        RUN),
    Bad("finetune: lr 0", finetune("--lr", "0"), "--lr: expected a finite number above 0, found '0'", RUN),
    Bad("finetune: lr negative", finetune("--lr=-1e-3"), "above 0, found '-1e-3'", RUN),
    Bad("finetune: lr nan", finetune("--lr", "nan"), "found 'nan'", RUN),
    Bad("finetune: weight decay negative", finetune("--weight-decay", "-0.1"),
        "--weight-decay: expected a finite number of at least 0", RUN),
    Bad("finetune: eval freq 0", finetune("--eval-freq", "0"), "--eval-freq: expected a whole number of at least 1",
        RUN),
    Bad("finetune: eval iter 0", finetune("--eval-iter", "0"), "--eval-iter: expected a whole number of at least 1",
        RUN),
    Bad("finetune: save every 0", finetune("--save-every", "0"), "--save-every: expected a whole number of at least 1",
        RUN),
    Bad("finetune: rank 0", finetune("--method", "lora", "--rank", "0"),
        "--rank: expected a whole number of at least 1", RUN),
    Bad("finetune: alpha 0", finetune("--method", "lora", "--alpha", "0"), "--alpha: expected a finite number above 0",
        RUN),
    Bad("finetune: dropout 1", finetune("--method", "lora", "--lora-dropout", "1"),
        "--lora-dropout: expected a finite number of at least 0 and below 1, found '1'", RUN),
    Bad("finetune: dropout negative", finetune("--method", "lora", "--lora-dropout", "-0.1"), "found '-0.1'", RUN),
    Bad("finetune: a prompt option with lora", finetune("--method", "lora", "--num-virtual-tokens", "5"),
        "options of another method than --method lora: --num-virtual-tokens (prompt-tuning/prefix-tuning/p-tuning)",
        RUN),
    Bad("finetune: a lora option with prompt tuning", finetune("--method", "prompt-tuning", "--rank", "8"),
        "options of another method than --method prompt-tuning: --rank (lora)", RUN),
    Bad("finetune: lora options with last-block", finetune("--alpha", "8", "--targets", "W_query"),
        "options of another method than --method last-block: --alpha (lora), --targets (lora)", RUN),
    Bad("finetune: seed negative", finetune("--seed", "-5"), "--seed: expected a whole number from 0", RUN),
    Bad("finetune: unknown device", finetune("--device", "gpu"), "--device: expected auto, cpu, cuda, cuda:N", RUN),
    Bad("finetune: missing GPU", finetune("--device", "cuda:99"), "'cuda:99' is not available", RUN),
    # --- finetune: options that do not fit together
    Bad("finetune: unknown method", finetune("--method", "adapters"), "unknown fine-tuning method 'adapters'", RUN),
    Bad("finetune: unmatched targets", finetune("--method", "lora", "--random-init", "--targets", "W_q"),
        "end in att.W_query, att.W_key", RUN),
    Bad("finetune: cache prefix with full", finetune("--method", "full", "--cache-prefix"),
        "cache_prefix works only with method 'last-block'", RUN),
    Bad("finetune: bucketing without dynamic padding", finetune("--random-init", "--bucket-by-length"),
        "bucket_by_length=True needs dynamic_padding=True", RUN),
    Bad("finetune: batch larger than the split", finetune("--random-init", "--batch-size", "500"),
        "the train split in", RUN),
    Bad("finetune: quantized base without lora", finetune("--method", "full", "--quantize-base", "nf4"),
        "a quantized base (nf4) is frozen, so it trains only with --method lora", RUN),
    Bad("finetune: unknown quantization", finetune("--method", "lora", "--quantize-base", "nf5"),
        "unknown quantization 'nf5'; choose one of nf4, int8", RUN),
    Bad("finetune: double quant without nf4", finetune("--method", "lora", "--double-quant"),
        "--double-quant quantizes NF4's block scales, so it needs --quantize-base nf4", RUN),
    Bad("finetune: occupied --out", finetune("--random-init", out="{occupied}"), "already holds files (notes.txt)"),
    Bad("finetune: resume a missing run", ("finetune", "--resume", "{tmp}/nothing"), "no checkpoint at",
        ("{tmp}/nothing",)),
    Bad("finetune: resume and overwrite", ("finetune", "--resume", "{full_run}", "--overwrite"),
        "--resume continues the run in its directory and --overwrite replaces it"),
    Bad("finetune: unknown model", finetune(model="gpt-2-small"),
        "'gpt-2-small' is neither a directory nor a GPT-2 name", RUN),
    Bad("finetune: truncated weights", finetune(model="{truncated}"), "may be truncated or corrupt", RUN),
    Bad("finetune: config lacks a key", finetune("--random-init", model="{config_no_n_embd}"), "lacks the GPT-2 field",
        RUN),
    # --- finetune: the data
    Bad("spam source missing", finetune("--spam-source", "{tmp}/SMSSpamCollection"), "does not exist", RUN),
    Bad("spam source a directory", finetune("--spam-source", "{tmp}"), "is a directory, not a file", RUN),
    Bad("spam source unreadable", finetune("--spam-source", "{unreadable}"), "permission denied for", RUN,
        non_root=True),
    Bad("spam source empty", finetune("--spam-source", "{spam_empty}", "--data-dir", "{tmp}/d"), "no messages found",
        RUN, warning=NOT_UCI),
    Bad("spam source not UTF-8", finetune("--spam-source", "{spam_latin1}", "--data-dir", "{tmp}/d"), "not UTF-8 text",
        RUN, warning=NOT_UCI),
    Bad("spam source binary", finetune("--spam-source", "{spam_png}", "--data-dir", "{tmp}/d"), "not UTF-8 text", RUN,
        warning=NOT_UCI),
    Bad("spam source one column", finetune("--spam-source", "{spam_one_column}", "--data-dir", "{tmp}/d"),
        "expected 2 tab-separated columns", RUN, warning=NOT_UCI),
    Bad("spam source unknown label", finetune("--spam-source", "{spam_bad_label}", "--data-dir", "{tmp}/d"),
        "unknown label 'eggs'", RUN, warning=NOT_UCI),
    Bad("spam source two messages", finetune("--spam-source", "{spam_two}", "--data-dir", "{tmp}/d"),
        "found 1 ham and 1 spam messages: too few", ("{tmp}/run", "{tmp}/d/train.parquet"), warning=NOT_UCI),
    Bad("spam source one class", finetune("--spam-source", "{spam_ham_only}", "--data-dir", "{tmp}/d"),
        "found 20 ham and 0 spam messages", RUN, warning=NOT_UCI),
    Bad("spam source more spam than ham", finetune("--spam-source", "{spam_mostly_spam}", "--data-dir", "{tmp}/d"),
        "found 6 ham and 9 spam", RUN, warning=NOT_UCI),
    Bad("spam zip without the file", finetune("--spam-source", "{zip_without_member}", "--data-dir", "{tmp}/d"),
        "no member named 'SMSSpamCollection'", RUN),
    Bad("data dir is a file", finetune("--random-init", "--data-dir", "{a_file}"), "is a file, not a directory", RUN),
    # --- classify
    Bad("classify: missing run", ("classify", "--run", "{tmp}/nothing", "hello"), "classifier.json not found"),
    Bad("classify: not a run", ("classify", "--run", "{tiny}", "hello"), "classifier.json not found"),
    Bad("classify: empty text", ("classify", "--run", "{full_run}", ""), "empty"),
    Bad("classify: blank text", ("classify", "--run", "{full_run}", "   "), "empty"),
    Bad("classify: run info not JSON", ("classify", "--run", "{run_info_not_json}", "hello"), "is not valid JSON"),
    Bad("classify: run info lacks keys", ("classify", "--run", "{run_info_no_method}", "hello"),
        "lacks 'method'"),
    Bad("classify: truncated classifier", ("classify", "--run", "{run_truncated_weights}", "hello"),
        "may be truncated or corrupt"),
    Bad("classify: adapter of another shape", ("classify", "--run", "{lora_other_shape}", "hello"),
        "expected shape (32, 2) for this model, found (64, 2)"),
    Bad("classify: adapter on another base", ("classify", "--run", "{lora_other_base}", "hello"),
        "trained on other base weights"),
    Bad("classify: adapter missing", ("classify", "--run", "{lora_no_adapter}", "hello"), "has lost its adapter"),
    # --- export-peft
    Bad("export-peft: not a LoRA run", ("export-peft", "--run", "{full_run}", "--out", "{tmp}/peft"),
        "is a 'full' run, which saves a whole model", ("{tmp}/peft",)),
    Bad("export-peft: missing run", ("export-peft", "--run", "{tmp}/nothing", "--out", "{tmp}/peft"),
        "classifier.json not found", ("{tmp}/peft",)),
    Bad("export-peft: occupied --out", ("export-peft", "--run", "{lora_run}", "--out", "{occupied}"),
        "already holds files (notes.txt)", ("{occupied}/adapter_config.json", "{occupied}/adapter_model.safetensors")),
    Bad("export-peft: adapter on another base", ("export-peft", "--run", "{lora_other_base}", "--out", "{tmp}/peft"),
        "trained on other base weights", ("{tmp}/peft",)),
    # --- pretrain (its own checks are in test_pretraining.py)
    Bad("pretrain: empty text", pretrain("{spam_empty}"), "is empty; pass a file with some text", RUN),
    Bad("pretrain: latin-1 text", pretrain("{spam_latin1}"), "is not UTF-8 text", RUN),
    Bad("pretrain: binary text", pretrain("{spam_png}"), "looks like a binary file", RUN),
    Bad("pretrain: no such text", pretrain("{tmp}/missing.txt"), "no text file at", RUN),
    Bad("pretrain: text too short", pretrain("{spam_two}"), "too few for one training window", RUN),
    Bad("pretrain: context too long", pretrain("{spam_two}", "--context-length", "129"),
        "--context-length 129 is not possible", RUN),
    Bad("pretrain: zero epochs", pretrain("{spam_two}", "--epochs", "0"),
        "argument --epochs: expected a whole number of at least 1, found 0", RUN),
    Bad("pretrain: --out holds a run", pretrain("{spam_two}", "--context-length", "2", "--train-ratio", "0.5",
                                                out="{full_run}"), "already holds files"),
    Bad("pretrain: negative seed", pretrain("{spam_two}", "--seed", "-1"),
        "argument --seed: expected a whole number from 0 to 4294967295, found -1", RUN),
    Bad("pretrain: infinite lr", pretrain("{spam_two}", "--lr", "inf"),
        "argument --lr: expected a finite number above 0, found 'inf'", RUN),
    Bad("pretrain: bad device", pretrain("{spam_two}", "--device", "gpu"),
        "argument --device: expected auto, cpu, cuda, cuda:N or another torch device, found 'gpu'", RUN),
    Bad("finetune: --dora over a quantized base", finetune("--method", "lora", "--dora", "--quantize-base", "nf4"),
        "--dora needs the base weights themselves", RUN),
    Bad("finetune: --dora without lora", finetune("--method", "full", "--dora"),
        "options of another method than --method full: --dora (lora)", RUN),
    Bad("finetune: a p-tuning option with prompt-tuning", finetune("--method", "prompt-tuning", "--prompt-encoder",
                                                                   "lstm"),
        "options of another method than --method prompt-tuning: --prompt-encoder (p-tuning)", RUN),
    Bad("finetune: --prefix-hidden with p-tuning", finetune("--method", "p-tuning", "--prefix-hidden", "8"),
        "the prompt encoder's width is --encoder-hidden", RUN),
    Bad("finetune: unknown prompt encoder", finetune("--method", "p-tuning", "--prompt-encoder", "gru"),
        "argument --prompt-encoder: invalid choice", RUN),
    Bad("pretrain: virtual tokens fill the context", pretrain("{spam_two}", "--method", "p-tuning",
                                                              "--num-virtual-tokens", "500"),
        "500 virtual tokens + 1 token of input exceed the context length", RUN),
    Bad("pretrain: a LoRA option with p-tuning", pretrain("{spam_two}", "--method", "p-tuning", "--rank", "4"),
        "options of another method than --method p-tuning: --rank (lora)", RUN),
    # --- the appendix-D options (training.TrainingSchedule), on every training command
    Bad("pretrain: negative warmup", pretrain("{spam_two}", "--warmup-steps", "-1"),
        "expected a whole number of at least 0, found -1", RUN),
    Bad("pretrain: unknown decay", pretrain("{spam_two}", "--decay", "linear"), "invalid choice: 'linear'", RUN),
    Bad("finetune: zero accumulation steps", finetune("--random-init", "--accumulation-steps", "0"),
        "expected a whole number of at least 1, found 0", RUN),
    Bad("finetune: clip norm zero", finetune("--random-init", "--clip-grad-norm", "0"),
        "expected a finite number above 0, found '0'", RUN),
    # --- instruct and generate --instruction (book, chapter 7)
    Bad("instruct: data not JSON", ("instruct", "--data", "{spam_empty}", "--model", "{tiny}", "--random-init",
                                    "--out", "{tmp}/run"), "is not valid JSON (Expecting value at line 1", RUN),
    Bad("instruct: no such data", ("instruct", "--data", "{tmp}/missing.json", "--model", "{tiny}", "--random-init",
                                   "--out", "{tmp}/run"), "no instruction data at", RUN),
    Bad("instruct: prompt tuning", ("instruct", "--method", "prompt-tuning", "--out", "{tmp}/run"),
        "invalid choice: 'prompt-tuning'", RUN),
    Bad("instruct: zero max length", ("instruct", "--max-length", "1", "--out", "{tmp}/run"),
        "expected a whole number of at least 2, found 1", RUN),
    Bad("generate: --input without --instruction", ("generate", "--model", "{tiny}", "--input", "x"),
        "--input is the input of an --instruction"),
    Bad("generate: empty instruction", ("generate", "--model", "{tiny}", "--instruction", " "),
        "--instruction is empty"),
    Bad("score: no such file", ("score", "{tmp}/missing.json"), "no responses file at"),
    Bad("score: not records", ("score", "{spam_empty}"), "is not a JSON file"),
    Bad("score: unreachable judge", ("score", "{responses}", "--judge-url", "http://127.0.0.1:9/v1"),
        "cannot reach the judge at http://127.0.0.1:9/v1/chat/completions"),
    Bad("generate: bad device", ("generate", "--model", "{tiny}", "--device", "gpu"),
        "argument --device: expected auto, cpu, cuda, cuda:N or another torch device, found 'gpu'"),
    Bad("instruct: negative warmup", ("instruct", "--warmup-steps", "-2", "--out", "{tmp}/run"),
        "argument --warmup-steps: expected a whole number of at least 0, found -2", RUN),
    # --- prefer (DPO, chapter 12)
    Bad("prefer: records without chosen/rejected", ("prefer", "--data", "{instruction_records}", "--model", "{tiny}",
                                                    "--random-init", "--out", "{tmp}/run"),
        "record 0 of", RUN),
    Bad("prefer: no such data", ("prefer", "--data", "{tmp}/missing.json", "--model", "{tiny}", "--random-init",
                                 "--out", "{tmp}/run"), "no preference data at", RUN),
    Bad("prefer: beta zero", ("prefer", "--beta", "0", "--out", "{tmp}/run"),
        "argument --beta: expected a finite number above 0, found '0'", RUN),
    Bad("prefer: negative beta", ("prefer", "--beta", "-0.1", "--out", "{tmp}/run"),
        "argument --beta: expected a finite number above 0", RUN),
    Bad("prefer: LoRA start run on another base", ("prefer", "--data", "{preference_records}", "--model",
                                                   "{lm_lora_other_base}", "--method", "lora", "--out", "{tmp}/run"),
        "was trained on other base weights", RUN),
    Bad("pretrain: unknown precision", ("pretrain", "--precision", "fp8", "--out", "{tmp}/run"),
        "argument --precision: invalid choice: 'fp8'", RUN),
    Bad("finetune: tf32 on a cpu", finetune("--random-init", "--precision", "tf32"),
        "precision tf32 is a setting of CUDA's tensor cores, found device cpu", RUN),
    Bad("bench: unknown option", ("bench", "--options", "fp64", "--device", "cpu"),
        "--options: unknown fp64; expected some of fp32"),
    Bad("bench: unknown model", ("bench", "--model", "gpt2-huge", "--device", "cpu"), "unknown GPT-2 preset"),
    Bad("generate: --compile with --instruction", ("generate", "--model", "{tiny}", "--instruction", "Say hi",
                                                  "--compile"),
        "--compile continues a plain --prompt"),
]


# ---------------------------------------------------------------- the files the rows point at

TINY_HF = {"vocab_size": 50257, "n_positions": 128, "n_embd": 32, "n_head": 2, "n_layer": 2}


def write_config(directory: Path, config=None, raw: bytes | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_bytes(raw if raw is not None else json.dumps(config or TINY_HF).encode())
    return directory


@pytest.fixture(scope="module")
def made(tmp_path_factory, small_spam_data_dir):
    """Tiny models (good and broken), a full run, a LoRA run (good and broken), bad spam files, a server."""
    import torch

    from gptlora.model import GPTModel
    from gptlora.formats.hf_layout import config_from_hf
    from gptlora.lora import apply_lora
    from gptlora.formats.lora_io import save_adapter
    from gptlora.pretrained import save_hf
    from test_download import LoopbackServer

    root = tmp_path_factory.mktemp("bad-inputs")
    torch.manual_seed(0)
    tiny = save_hf(GPTModel(config_from_hf(TINY_HF)), root / "tiny")
    weights = (tiny / "model.safetensors").read_bytes()
    paths = {"tiny": tiny, "data": small_spam_data_dir}

    def model_dir(name, config=None, raw_config=None, weight_bytes=weights):
        directory = write_config(root / name, config, raw_config)
        if weight_bytes is not None:
            (directory / "model.safetensors").write_bytes(weight_bytes)
        paths[name] = directory

    model_dir("no_weights", weight_bytes=None)
    paths["no_config"] = root / "no_config"
    paths["no_config"].mkdir()
    (paths["no_config"] / "model.safetensors").write_bytes(weights)
    model_dir("truncated", weight_bytes=weights[: len(weights) // 3])
    model_dir("empty_weights", weight_bytes=b"")
    pickled = root / "pickle.pt"
    torch.save({"wte.weight": torch.zeros(2, 2)}, pickled)
    model_dir("pickled", weight_bytes=pickled.read_bytes())
    model_dir("text_weights", weight_bytes=b"these are not weights\n")
    model_dir("config_no_n_embd", {k: v for k, v in TINY_HF.items() if k != "n_embd"})
    model_dir("config_n_layer_text", {**TINY_HF, "n_layer": "two"})
    model_dir("config_n_head_zero", {**TINY_HF, "n_head": 0})
    model_dir("config_not_json", raw_config=b'{"n_embd": 32,')
    model_dir("config_list", raw_config=b"[1, 2, 3]")
    model_dir("config_binary", raw_config=bytes(range(128, 256)))
    model_dir("other_shape", {**TINY_HF, "n_embd": 64})
    model_dir("config_is_dir", raw_config=b"{}")
    (paths["config_is_dir"] / "config.json").unlink()
    (paths["config_is_dir"] / "config.json").mkdir()
    model_dir("weights_are_dir", weight_bytes=None)
    (paths["weights_are_dir"] / "model.safetensors").mkdir()
    model_dir("config_unreadable")
    (paths["config_unreadable"] / "config.json").chmod(0)

    # Runs: a full one and a LoRA one, one epoch each on the small splits.
    for method in ("full", "lora"):
        status = cli.main(["finetune", "--model", str(tiny), "--random-init", "--method", method, "--epochs", "1",
                           "--data-dir", str(small_spam_data_dir), "--device", "cpu",
                           "--out", str(root / f"{method}_run")])
        assert status == 0
        paths[f"{method}_run"] = root / f"{method}_run"

    def run_copy(name, source):
        shutil.copytree(source, root / name)
        paths[name] = root / name
        return root / name

    info = json.loads((paths["full_run"] / "classifier.json").read_text())
    (run_copy("run_info_not_json", paths["full_run"]) / "classifier.json").write_text("{")
    (run_copy("run_info_no_method", paths["full_run"]) / "classifier.json").write_text(
        json.dumps({k: v for k, v in info.items() if k != "method"}))
    weights_path = run_copy("run_truncated_weights", paths["full_run"]) / "classifier.safetensors"
    weights_path.write_bytes(weights_path.read_bytes()[:1000])
    lora_info = json.loads((paths["lora_run"] / "classifier.json").read_text())
    other_base = run_copy("lora_other_base", paths["lora_run"])
    lora_info_other = {**lora_info, "base_source": {**lora_info["base_source"], "seed": 99}}
    (other_base / "classifier.json").write_text(json.dumps(lora_info_other))
    other_shape = run_copy("lora_other_shape", paths["lora_run"])
    shutil.rmtree(other_shape / "adapter")
    wider = GPTModel(config_from_hf({**TINY_HF, "n_embd": 64}))
    save_adapter(apply_lora(wider, rank=2, alpha=2, verbose=False), other_shape / "adapter", verbose=False)
    shutil.rmtree(run_copy("lora_no_adapter", paths["lora_run"]) / "adapter")

    # Spam files.
    def spam(name, content: bytes):
        paths[name] = root / name
        paths[name].write_bytes(content)

    spam("spam_empty", b"")
    spam("spam_latin1", "ham\tcaf\u00e9 au lait\n".encode("latin-1"))
    spam("spam_png", b"\x89PNG\r\n\x1a\n" + bytes(64))
    spam("spam_one_column", b"ham hello there\n")
    spam("spam_bad_label", b"eggs\thello\n")
    spam("spam_two", b"ham\thello\nspam\tWIN a prize\n")
    spam("spam_ham_only", b"".join(b"ham\tmessage %d\n" % i for i in range(20)))
    spam("spam_mostly_spam", b"".join(b"ham\tmessage %d\n" % i for i in range(6)) +
         b"".join(b"spam\tWIN %d\n" % i for i in range(9)))
    spam("unreadable", b"ham\thello\n")
    spam("responses", json.dumps([{"instruction": "Say hi.", "output": "Hi.", "model_response": "Hi"}]).encode())
    spam("instruction_records", json.dumps([{"instruction": "Say hi.", "output": "Hi."}] * 20).encode())
    spam("preference_records", json.dumps([{"instruction": "Say hi.", "chosen": "Hi.", "rejected": "No."}] * 20).encode())
    # A LoRA language-model run whose adapter was trained on other weights than its recorded base (the tiny model).
    from gptlora.recipes.run_dir import base_source

    paths["lm_lora_other_base"] = root / "lm_lora_other_base"
    torch.manual_seed(99)
    other = apply_lora(GPTModel(config_from_hf(TINY_HF)), rank=2, alpha=2, verbose=False)
    save_adapter(other, paths["lm_lora_other_base"] / "adapter", verbose=False)
    (paths["lm_lora_other_base"] / "language_model.json").write_text(json.dumps(dict(
        method="lora", method_options=dict(rank=2, alpha=2), base_source=base_source(str(tiny)),
        config=other.cfg.to_dict())))
    paths["unreadable"].chmod(0)
    paths["zip_without_member"] = root / "other.zip"
    with zipfile.ZipFile(paths["zip_without_member"], "w") as archive:
        archive.writestr("readme.txt", "no spam here")
    paths["a_file"] = root / "a_file.txt"
    paths["a_file"].write_text("not a folder")
    damaged = "/damaged/openai-community/gpt2/resolve/main/config.json"
    with LoopbackServer({damaged: (tiny / "config.json").read_bytes()}) as server:
        server.corrupt.add(damaged)  # one byte flipped, while the Hub's headers give the true size and SHA-256
        server.linked_headers = True
        paths["server"] = server.url
        yield paths


@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda case: case.name)
def test_bad_input_gets_one_error_line_and_leaves_nothing(case, made, tmp_path, capsys, monkeypatch):
    if case.non_root and hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("running as root, which reads any file")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("someone's")
    names = {**{key: str(value) for key, value in made.items()}, "tmp": str(tmp_path), "occupied": str(occupied)}
    monkeypatch.delenv(download.OFFLINE_ENV, raising=False)
    monkeypatch.delenv("GPTLORA_SPAM_SOURCE", raising=False)
    monkeypatch.setenv("GPTLORA_HF_BASE_URL", made["server"])  # nothing reaches the internet
    monkeypatch.setenv("GPTLORA_SPAM_URL", made["server"] + "/spam.zip")
    monkeypatch.setattr(download, "DEFAULT_BACKOFF_S", 0.0)
    monkeypatch.setattr(download, "tqdm", functools.partial(download.tqdm, disable=True))
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    try:
        status = cli.main([argument.format(**names) for argument in case.argv])
    except SystemExit as exit_:  # argparse's errors
        status = exit_.code
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert status not in (0, None), err
    assert len(lines) == 1 + bool(case.warning), err  # exactly one error: line, and the named warning
    if case.warning:
        assert lines[0].startswith("warning: ") and case.warning in lines[0], err
    assert lines[-1].startswith("error: ") and "unexpected" not in lines[-1], err
    assert case.expected in lines[-1], err
    for path in case.absent:
        assert not Path(path.format(**names)).exists(), path
    if case.name == "finetune: occupied --out" or case.name == "export-peft: occupied --out":
        assert os.listdir(occupied) == ["notes.txt"]


def test_the_table_covers_every_subcommand_with_at_least_60_cases():
    commands = {case.argv[0] for case in BAD_INPUTS}
    subcommands = set(cli.build_parser()._subparsers._group_actions[0].choices)
    assert subcommands <= commands and len(BAD_INPUTS) >= 60
    assert len({case.name for case in BAD_INPUTS}) == len(BAD_INPUTS)


def test_debug_shows_the_traceback(capsys, monkeypatch):
    from gptlora.cli.checks import DEBUG_ENV

    monkeypatch.delenv(DEBUG_ENV, raising=False)
    with pytest.raises(ValueError, match="unknown GPT-2 preset"):
        cli.main(["--debug", "download", "gpt2-tiny"])
    with pytest.raises(ValueError, match="unknown GPT-2 preset"):
        cli.main(["download", "gpt2-tiny", "--debug"])
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(ValueError, match="unknown GPT-2 preset"):
        cli.main(["download", "gpt2-tiny"])


def test_warnings_are_one_line(tmp_path, capsys, monkeypatch):
    import warnings

    from gptlora.cli import app as cli_module

    def warn_then_fail(args):
        warnings.warn("something to know", UserWarning)
        return 0

    parser = cli_module.build_parser()
    monkeypatch.setattr(cli_module, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["download"].set_defaults(func=warn_then_fail)
    assert cli.main(["download", "gpt2-small"]) == 0
    assert capsys.readouterr().err == "warning: something to know\n"


def test_range_helpers_accept_the_range_and_name_it_otherwise():
    import argparse

    from gptlora.cli.checks import positive_float, probability, real_number, whole_number

    assert whole_number(2, 5)("5") == 5 and real_number(maximum=2.5)("-7") == -7.0 and probability()("0") == 0.0
    for check, text, message in [
        (whole_number(2, 5), "6", "expected a whole number from 2 to 5, found 6"),
        (whole_number(), "x", "expected a whole number, found 'x'"),
        (real_number(maximum=2.5), "3", "expected a finite number of at most 2.5, found '3'"),
        (positive_float(), "-inf", "expected a finite number above 0, found '-inf'"),
        (probability(), "0.999999", None),
        (probability(), "1.0", "expected a finite number of at least 0 and below 1, found '1.0'"),
    ]:
        if message is None:
            assert check(text) == float(text)
            continue
        with pytest.raises(argparse.ArgumentTypeError) as error:
            check(text)
        assert str(error.value) == message


def test_a_message_of_several_lines_is_reported_by_its_first_line():
    from gptlora.cli.checks import error_line

    report = "could not do X: found Y, expected Z; do W"
    assert error_line(ValueError(f"{report}\n  detail 1\n  detail 2\n"), (ValueError,)) == \
        f"error: {report} (--debug shows 2 more lines)"
    assert error_line(ValueError(report), (ValueError,)) == f"error: {report}"
    assert error_line(KeyError("k"), (ValueError,)).startswith("error: unexpected KeyError: 'k' (run again with --debug")
