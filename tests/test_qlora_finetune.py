"""QLoRA end to end: `finetune --method lora --quantize-base nf4` against the fp32 LoRA run on the same base
and seed, the run reloaded and checked by its fingerprint, and `generate --int8` (the options' bad-input
rows are in test_bad_inputs.py)."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from gptlora.cli import app as cli
from gptlora.classifier import calc_accuracy_loader, classify
from gptlora.recipes.finetune import ADAPTER_DIR, load_classifier
from gptlora.lora import lora_layers
from gptlora.generation import generate_text
from gptlora.formats.lora_io import read_adapter_config
from gptlora.model import GPTConfig, GPTModel
from gptlora.pretrained import load_pretrained, save_hf
from gptlora.qlora import quantize_base
from gptlora.quantization import NF4Linear
from gptlora.spam import create_dataloaders
from test_finetune_lora import MESSAGE, base_dir, lora_run  # noqa: F401  (fixtures: the tiny base, the fp32 run)


@pytest.fixture(scope="module")
def qlora_run(base_dir, lora_run, tmp_path_factory, run_cli):  # noqa: F811
    """The same command as ``lora_run`` (book defaults, 1 epoch, seed 123) with an NF4 base."""
    run = tmp_path_factory.mktemp("qlora") / "run"
    status, printed = run_cli(["finetune", "--model", str(base_dir), "--method", "lora", "--quantize-base", "nf4",
                               "--epochs", "1", "--data-dir", str(lora_run.data_dir), "--out", str(run),
                               "--device", "cpu"])
    metrics = json.loads((run / "metrics.json").read_text()) if status == 0 else None
    return SimpleNamespace(status=status, stdout=printed, run=run, metrics=metrics, data_dir=lora_run.data_dir)


def test_qlora_ends_within_one_point_of_fp32_lora(qlora_run, lora_run):  # noqa: F811
    assert qlora_run.status == 0, qlora_run.stdout
    assert qlora_run.metrics["trainable_parameters"] == lora_run.metrics["trainable_parameters"]
    qlora, lora = qlora_run.metrics["accuracy"], lora_run.metrics["accuracy"]
    assert abs(qlora["test"] - lora["test"]) <= 0.01, (qlora, lora)
    info = json.loads((qlora_run.run / "classifier.json").read_text())
    assert info["base_source"]["quantize"] == {"method": "nf4"}  # recorded, so classify rebuilds it
    assert "quantize" not in json.loads((lora_run.run / "classifier.json").read_text())["base_source"]
    fingerprints = {read_adapter_config(r.run / ADAPTER_DIR)["base_fingerprint"] for r in (qlora_run, lora_run)}
    assert len(fingerprints) == 2  # the NF4 base is another base


@pytest.mark.slow
@pytest.mark.parametrize("options", [["nf4", "--double-quant"], ["int8"]], ids=["nf4-double-quant", "int8"])
def test_the_other_quantized_bases_end_within_one_point_of_fp32_lora(options, base_dir, lora_run, tmp_path,  # noqa: F811
                                                                     run_cli):
    """The README's accuracy rows for NF4 with double quantization and int8 (``-s`` prints them)."""
    run = tmp_path / "run"
    status, printed = run_cli(["finetune", "--model", str(base_dir), "--method", "lora", "--quantize-base", *options,
                               "--epochs", "1", "--data-dir", str(lora_run.data_dir), "--out", str(run),
                               "--device", "cpu"])
    assert status == 0, printed
    accuracy, fp32 = json.loads((run / "metrics.json").read_text())["accuracy"], lora_run.metrics["accuracy"]
    print(" ".join(options), "train / validation / test accuracy (%):",
          " / ".join(f"{100 * accuracy[split]:.2f}" for split in ("train", "validation", "test")))
    assert abs(accuracy["test"] - fp32["test"]) <= 0.01, (accuracy, fp32)


def test_qlora_run_reloads_and_classifies_identically(qlora_run, tokenizer, run_cli):
    loaded, info = load_classifier(qlora_run.run)
    wrapped = [layer.linear for name, layer in lora_layers(loaded).items() if name != "out_head"]
    assert wrapped and all(isinstance(layer, NF4Linear) for layer in wrapped)
    _, val_loader, test_loader = create_dataloaders(qlora_run.data_dir, tokenizer)
    for split, loader in (("validation", val_loader), ("test", test_loader)):
        assert calc_accuracy_loader(loader, loaded, "cpu") == qlora_run.metrics["accuracy"][split], split
    status, printed = run_cli(["classify", "--run", str(qlora_run.run), MESSAGE, "--device", "cpu"])
    assert status == 0 and printed.strip() == classify(MESSAGE, loaded, tokenizer, "cpu", info["max_length"])


def test_a_differently_quantized_base_is_refused(qlora_run, tmp_path, capsys):
    other = shutil.copytree(qlora_run.run, tmp_path / "run")
    info = json.loads((other / "classifier.json").read_text())
    info["base_source"]["quantize"] = {"method": "nf4", "double_quant": True}
    (other / "classifier.json").write_text(json.dumps(info))
    assert cli.main(["classify", "--run", str(other), MESSAGE, "--device", "cpu"]) == 1
    assert "trained on other base weights" in capsys.readouterr().err


@pytest.fixture(scope="module")
def odd_width_base(tmp_path_factory):
    """A random GPT whose width, 72, is not a multiple of the fused int8 kernel's 16 (its MLP's 288 is)."""
    torch.manual_seed(14)
    model = GPTModel(GPTConfig(vocab_size=50257, context_length=32, emb_dim=72, n_heads=4, n_layers=2,
                               drop_rate=0.0, qkv_bias=True))
    return save_hf(model, tmp_path_factory.mktemp("base") / "gpt-72")


@pytest.mark.parametrize("which", ["tiny base", "72 wide"])
def test_generate_int8_gives_the_greedy_tokens_of_the_dequantized_int8_model(which, base_dir, odd_width_base,  # noqa: F811
                                                                             tokenizer, run_cli):
    model_dir = base_dir if which == "tiny base" else odd_width_base
    prompt, new_tokens = "Hello, I am", 10
    status, int8 = run_cli(["generate", "--model", str(model_dir), "--prompt", prompt, "--max-new-tokens",
                            str(new_tokens), "--int8"])
    assert status == 0, int8
    # the same int8 codes applied as dequantized float32 weights (no fused kernel, no bfloat16)
    plain = quantize_base(load_pretrained(model_dir).eval(), "int8", include_head=True)
    assert int8.strip() == generate_text(plain, prompt, tokenizer, new_tokens)


def test_export_peft_refuses_a_qlora_run(qlora_run, tmp_path, capsys):
    assert cli.main(["export-peft", "--run", str(qlora_run.run), "--out", str(tmp_path / "peft")]) == 1
    assert "was trained on a quantized base (QLoRA, nf4)" in capsys.readouterr().err
    assert not (tmp_path / "peft").exists()


def test_a_qlora_run_resumes_with_its_quantized_base(base_dir, small_spam_data_dir, tmp_path, run_cli):  # noqa: F811
    """--resume takes --quantize-base from the checkpoint and quantizes the base again; the checkpoint's
    fingerprint of the frozen weights covers the NF4 codes (buffers), so it checks that base."""
    run = tmp_path / "run"
    status, printed = run_cli(["finetune", "--model", str(base_dir), "--method", "lora", "--quantize-base", "nf4",
                               "--epochs", "1", "--data-dir", str(small_spam_data_dir), "--out", str(run),
                               "--device", "cpu"])
    assert status == 0, printed
    status, printed = run_cli(["finetune", "--resume", str(run), "--epochs", "2", "--device", "cpu"])
    assert status == 0, printed
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["base_source"]["quantize"] == {"method": "nf4"}
