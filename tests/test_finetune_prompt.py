"""Prompt and prefix tuning of the spam classifier from the command line, and several LoRA runs in one batch."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from gptlora.classifier import calc_accuracy_loader, classify
from gptlora.recipes.finetune import ADAPTER_DIR, load_classifier
from gptlora.formats.hf_layout import config_to_hf
from gptlora.formats.lora_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from gptlora.model import GPTConfig
from gptlora.prompt_tuning import PrefixTunedGPT, PromptTunedGPT
from gptlora.spam import create_dataloaders

MESSAGE = "You are a winner you have been specially selected to receive $1000 cash or a $2000 award."
TINY = GPTConfig(vocab_size=50257, context_length=128, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0,
                 qkv_bias=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-base") / "tiny"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config_to_hf(TINY)))
    return directory


@pytest.fixture(scope="module")
def runs(tiny_dir, small_spam_data_dir, tmp_path_factory):
    """One epoch on the small splits from a random base: prompt tuning, prefix tuning with its MLP, two LoRAs."""
    from conftest import run_cli_on_one_thread

    root = tmp_path_factory.mktemp("prompt-runs")
    common = ["finetune", "--model", str(tiny_dir), "--random-init", "--epochs", "1", "--data-dir",
              str(small_spam_data_dir), "--device", "cpu"]
    options = {"prompt": ["--method", "prompt-tuning", "--num-virtual-tokens", "5"],
               "prefix": ["--method", "prefix-tuning", "--num-virtual-tokens", "4", "--prefix-hidden", "8"],
               "lora2": ["--method", "lora", "--rank", "2"],
               "lora4": ["--method", "lora", "--rank", "4", "--targets", "W_query", "W_value"]}
    result = {}
    for name, extra in options.items():
        status, stdout = run_cli_on_one_thread(common + extra + ["--out", str(root / name)])
        assert status == 0, (name, stdout)
        result[name] = SimpleNamespace(run=root / name, stdout=stdout,
                                       metrics=json.loads((root / name / "metrics.json").read_text()))
    return result


@pytest.mark.parametrize("name, kind, trainable", [
    ("prompt", PromptTunedGPT, 5 * 64 + 2 * 64 + 2),  # the soft prompt [5, 64] and the head
    ("prefix", PrefixTunedGPT, 4 * 64 + (64 * 8 + 8) + (8 * 2 * 2 * 64 + 2 * 2 * 64) + 2 * 64 + 2),
])
def test_prompt_runs_save_the_prompt_and_head_alone_and_reload(runs, name, kind, trainable, small_spam_data_dir,
                                                               tokenizer, run_cli):
    run = runs[name]
    assert run.metrics["trainable_parameters"] == trainable
    assert f"trainable parameters: {trainable:,}" in run.stdout
    assert run.metrics["lr"] == {"prompt": 3e-2, "prefix": 1e-2}[name]
    assert sorted(p.name for p in (run.run / ADAPTER_DIR).iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    assert not (run.run / "classifier.safetensors").exists()
    assert (run.run / ADAPTER_DIR / ADAPTER_WEIGHTS).stat().st_size < 4 * trainable + 2_000  # no base inside

    loaded, info = load_classifier(run.run)
    assert isinstance(loaded, kind) and info["method_options"]["init_text"].startswith("Classify if the message")
    _, val_loader, test_loader = create_dataloaders(small_spam_data_dir, tokenizer)
    for split, loader in (("validation", val_loader), ("test", test_loader)):
        assert calc_accuracy_loader(loader, loaded, "cpu") == run.metrics["accuracy"][split], split
    status, printed = run_cli(["classify", "--run", str(run.run), MESSAGE, "--device", "cpu"])
    assert status == 0 and printed.strip() == classify(MESSAGE, loaded, tokenizer, "cpu", info["max_length"])


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_export_peft_of_a_prompt_run_reproduces_it(runs, tokenizer, tmp_path, run_cli):
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    out = tmp_path / "peft"
    status, _ = run_cli(["export-peft", "--run", str(runs["prompt"].run), "--out", str(out)])
    assert status == 0
    hf_model = transformers.GPT2ForSequenceClassification.from_pretrained(out / "base", num_labels=2).eval()
    peft_model = peft.PeftModel.from_pretrained(hf_model, str(out)).eval()
    loaded, _ = load_classifier(runs["prompt"].run)
    x = torch.tensor([tokenizer.encode(MESSAGE)])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=x).logits, loaded(x)[:, -1, :], atol=1e-4, rtol=0)


def test_export_peft_of_a_prefix_classifier_warns_that_peft_may_not_run_it(runs, tmp_path):
    from gptlora.recipes.finetune import export_run_to_peft

    with pytest.warns(UserWarning, match="prefix-tuned classifier's export may not run in peft"):
        export_run_to_peft(runs["prefix"].run, tmp_path / "peft")
    assert (tmp_path / "peft" / ADAPTER_CONFIG).is_file()


def test_several_lora_runs_classify_in_one_batch(runs, run_cli, capsys):
    singles = [run_cli(["classify", "--run", str(runs[name].run), MESSAGE, "--device", "cpu"])[1].strip()
               for name in ("lora2", "lora4")]
    status, printed = run_cli(["classify", "--run", str(runs["lora2"].run), "--run", str(runs["lora4"].run),
                               MESSAGE, "--device", "cpu"])
    assert status == 0
    assert printed.splitlines() == [f"{runs['lora2'].run}: {singles[0]}", f"{runs['lora4'].run}: {singles[1]}"]

    # The labels alone could agree whatever the routing: the logits of each row must be its run's own.
    from gptlora.recipes.finetune import load_runs_sharing_a_base
    from gptlora.generation import get_tokenizer

    ids = torch.tensor([get_tokenizer().encode(MESSAGE)[:20]] * 3)
    shared, names, _ = load_runs_sharing_a_base([runs["lora2"].run, runs["lora4"].run])
    with torch.no_grad():
        mixed = shared(ids, adapter_names=[names[1], names[0], "__base__"])
        alone = [load_classifier(runs[name].run)[0](ids[:1]) for name in ("lora4", "lora2")]
    for row, expected in enumerate(alone):
        torch.testing.assert_close(mixed[row:row + 1], expected, atol=1e-5, rtol=0)
    assert (mixed[0] - mixed[1]).abs().max() > 1e-3  # the two adapters do differ on this message

    capsys.readouterr()
    status, _ = run_cli(["classify", "--run", str(runs["lora2"].run), "--run", str(runs["prompt"].run), MESSAGE])
    assert status == 1
    assert capsys.readouterr().err.strip().endswith(
        "is a 'prompt-tuning' run; only LoRA runs share a base in one batch: classify it with --run alone")


@pytest.mark.parametrize("options, message", [
    (["--num-virtual-tokens", "0"], "argument --num-virtual-tokens: expected a whole number of at least 1, found 0"),
    (["--method", "prefix-tuning", "--prefix-hidden", "0"], "argument --prefix-hidden: expected a whole number of "
                                                            "at least 1, found 0"),
    (["--num-virtual-tokens", "100"], "100 virtual tokens + 120 tokens of input exceed the context length 128; "
                                      "use at most 8 virtual tokens"),
    (["--prompt-init-text", " "], "the prompt's init text must be a non-empty sentence"),
    (["--prompt-init-text", "spam?", "--random-prompt"], "--random-prompt and --prompt-init-text both say"),
    (["--prefix-hidden", "16"], "a hidden width (the reparameterisation MLP) belongs to prefix-tuning"),
    (["--cache-prefix"], "'prompt-tuning' cannot cache them: its virtual tokens change what the frozen blocks "
                         "compute at every step"),
])
def test_bad_prompt_options_are_one_line_and_leave_nothing(options, message, tiny_dir, small_spam_data_dir,
                                                           tmp_path, capsys):
    from gptlora.cli import app as cli

    try:
        status = cli.main(["finetune", "--model", str(tiny_dir), "--random-init", "--method", "prompt-tuning",
                           "--data-dir", str(small_spam_data_dir), "--out", str(tmp_path / "run"), *options])
    except SystemExit as parse_error:  # ranges are checked while parsing (cli_checks): argparse's exit
        status = parse_error.code
    err = capsys.readouterr().err
    assert status != 0 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_too_many_virtual_tokens_leave_an_earlier_run_as_it_was(runs, tiny_dir, small_spam_data_dir, tmp_path,
                                                               capsys):
    import shutil

    from gptlora.cli import app as cli

    run = shutil.copytree(runs["prompt"].run, tmp_path / "run")
    before = {path.name: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    status = cli.main(["finetune", "--model", str(tiny_dir), "--random-init", "--method", "prompt-tuning",
                       "--data-dir", str(small_spam_data_dir), "--out", str(run), "--overwrite",
                       "--num-virtual-tokens", "100"])
    assert status != 0 and "100 virtual tokens + 120 tokens of input exceed" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in run.rglob("*") if path.is_file()} == before


def test_prepare_for_classification_checks_the_context_before_changing_the_model():
    from gptlora.classifier import prepare_for_classification
    from gptlora.model import GPTModel

    model = GPTModel(TINY)
    head = model.out_head
    with pytest.raises(ValueError, match="200 virtual tokens"):
        prepare_for_classification(model, "prompt-tuning", 2, {"num_virtual_tokens": 200})
    assert model.out_head is head and all(p.requires_grad for p in model.parameters())


def test_a_resumed_prompt_run_ends_where_an_uninterrupted_one_does(tiny_dir, small_spam_data_dir, tmp_path,
                                                                   run_cli):
    common = ["finetune", "--model", str(tiny_dir), "--random-init", "--method", "prompt-tuning",
              "--num-virtual-tokens", "4", "--data-dir", str(small_spam_data_dir), "--device", "cpu"]
    assert run_cli(common + ["--epochs", "2", "--out", str(tmp_path / "straight")])[0] == 0
    assert run_cli(common + ["--epochs", "1", "--out", str(tmp_path / "resumed")])[0] == 0
    assert run_cli(["finetune", "--resume", str(tmp_path / "resumed"), "--epochs", "2"])[0] == 0
    straight, resumed = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("straight", "resumed"))
    assert resumed["history"] == straight["history"] and resumed["accuracy"] == straight["accuracy"]
    weights = [(tmp_path / name / ADAPTER_DIR / ADAPTER_WEIGHTS).read_bytes() for name in ("straight", "resumed")]
    assert weights[0] == weights[1]
