"""LoRA fine-tuning of the spam classifier end to end: the CLI, an adapter-only run directory,
reloading onto a fresh base, classify, the peft export, and the book's numbers (real weights only)."""

from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from gptlora.cli import app as cli
from gptlora.cli.run_settings import lora_method_options
from gptlora.classifier import LORA_DEFAULTS, calc_accuracy_loader, classify, prepare_for_classification
from gptlora.recipes.finetune import ADAPTER_DIR, load_classifier
from gptlora.lora import lora_disabled, lora_layers
from gptlora.formats.lora_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, base_fingerprint, read_adapter_config
from gptlora.lora_layer import SCALINGS
from gptlora.model import GPTConfig, GPTModel, count_parameters
from gptlora.pretrained import load_pretrained, save_hf
from gptlora.spam import create_dataloaders

SPLITS = ("train", "validation", "test")
MESSAGE = "85233 FREE>Ringtone!Reply REAL"  # the first test message


@pytest.fixture(scope="module")
def base_dir(tiny_spam_run, tmp_path_factory):
    """A 'pretrained' base that knows about spam: conftest's fully fine-tuned tiny GPT, given back a
    language-model head (tied to its token embedding, as GPT-2's) and saved as a Hugging Face checkpoint."""
    model, _ = load_classifier(tiny_spam_run.run)
    model.out_head = nn.Linear(model.cfg.emb_dim, model.cfg.vocab_size, bias=False)
    model.tie_weights()
    return save_hf(model, tmp_path_factory.mktemp("base") / "tiny-spam-gpt")


@pytest.fixture(scope="module")
def lora_run(base_dir, tiny_spam_run, tmp_path_factory, run_cli):
    """``gptlora finetune --method lora`` on that base with the book's defaults (rank 16, alpha 16, all layers)."""
    run = tmp_path_factory.mktemp("lora") / "run"
    status, printed = run_cli(["finetune", "--model", str(base_dir), "--method", "lora", "--epochs", "1",
                               "--data-dir", str(tiny_spam_run.data_dir), "--out", str(run), "--device", "cpu"])
    metrics = json.loads((run / "metrics.json").read_text()) if status == 0 else None
    return SimpleNamespace(status=status, stdout=printed, run=run, metrics=metrics, data_dir=tiny_spam_run.data_dir)


def fresh_base_with_head(base_dir, seed=123) -> GPTModel:
    """What a LoRA run's base is: the checkpoint plus the head drawn under the run's seed (no LoRA)."""
    model = load_pretrained(base_dir)
    torch.manual_seed(seed)
    return prepare_for_classification(model, "full")


def test_lora_run_trains_and_saves_only_the_adapter(lora_run, base_dir):
    assert lora_run.status == 0
    metrics = lora_run.metrics
    assert metrics["lr"] == 8e-4  # the method-aware default
    assert metrics["method_options"] == LORA_DEFAULTS
    # rank 16 on every linear layer, the 2-class head included: 16 * (in + out) each
    expected = sum(16 * (m.in_features + m.out_features) for m in fresh_base_with_head(base_dir).modules()
                   if isinstance(m, nn.Linear))
    assert metrics["trainable_parameters"] == expected
    assert f"trainable parameters: {expected:,} (method lora, lr 0.0008)" in lora_run.stdout
    for split in SPLITS:
        assert f"{split} accuracy: {metrics['accuracy'][split]:.2%}" in lora_run.stdout
    assert metrics["accuracy"]["test"] >= 0.90

    run = lora_run.run
    assert {"accuracy.png", ADAPTER_DIR, "classifier.json", "loss.png", "metrics.json"} <= set(os.listdir(run))
    assert not (run / "classifier.safetensors").exists()
    assert sorted(os.listdir(run / ADAPTER_DIR)) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    adapter_bytes = (run / ADAPTER_DIR / ADAPTER_WEIGHTS).stat().st_size
    assert adapter_bytes < 4 * expected + 20_000  # float32 A and B, plus the safetensors header
    base_bytes = (base_dir / "model.safetensors").stat().st_size
    assert all(path.stat().st_size < 0.05 * base_bytes for path in run.rglob("*") if path.is_file())  # no base copy


def test_adapter_reloads_onto_a_fresh_base_with_the_same_accuracy(lora_run, base_dir, tokenizer):
    loaded, info = load_classifier(lora_run.run)
    assert info["method"] == "lora" and info["base_source"]["model"] == str(base_dir.resolve())
    _, val_loader, test_loader = create_dataloaders(lora_run.data_dir, tokenizer)
    # (the training loader shuffles and drops its last batch: its rows differ from one call to the next)
    for split, loader in (("validation", val_loader), ("test", test_loader)):
        assert calc_accuracy_loader(loader, loaded, "cpu") == lora_run.metrics["accuracy"][split], split
    # The fingerprint was taken after training, in the training process: equal to a fresh base's, the
    # base weights and the frozen head came out of training bitwise unchanged.
    fresh = fresh_base_with_head(base_dir)
    assert read_adapter_config(lora_run.run / ADAPTER_DIR)["base_fingerprint"] == base_fingerprint(fresh)
    assert len(lora_layers(loaded)) == 2 * 6 + 1
    x = torch.tensor([tokenizer.encode(MESSAGE)])
    with torch.no_grad(), lora_disabled(loaded):
        base_logits = loaded(x)
    with torch.no_grad():
        torch.testing.assert_close(base_logits, fresh.eval()(x), rtol=0, atol=0)
        assert not torch.equal(loaded(x), base_logits)  # the adapter learned something


def test_classify_cli_loads_base_and_adapter(lora_run, tokenizer, run_cli):
    loaded, info = load_classifier(lora_run.run)
    status, printed = run_cli(["classify", "--run", str(lora_run.run), MESSAGE, "--device", "cpu"])
    assert status == 0
    assert printed.strip() == classify(MESSAGE, loaded, tokenizer, "cpu", info["max_length"])


def test_another_base_or_head_is_a_clear_error(lora_run, base_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match="(?s)trained on other base weights.*was passed in"):
        load_classifier(lora_run.run, base=GPTModel(load_pretrained(base_dir).cfg))
    other_head = shutil.copytree(lora_run.run, tmp_path / "run")
    info = json.loads((other_head / "classifier.json").read_text())
    (other_head / "classifier.json").write_text(json.dumps({**info, "seed": info["seed"] + 1}))
    assert cli.main(["classify", "--run", str(other_head), MESSAGE, "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "trained on other base weights" in err and "needs the exact base" in err
    assert "check_fingerprint" not in err  # a Python-only argument: no use to the command's user


# transformers warns about a renamed attribute; peft that fan_in_fan_out is set.
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:fan_in_fan_out is set to True")
def test_export_peft_reproduces_the_run(lora_run, base_dir, tiny_spam_run, tokenizer, tmp_path, capsys):
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    out = tmp_path / "peft"
    assert cli.main(["export-peft", "--run", str(lora_run.run), "--out", str(out)]) == 0
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"] == str(base_dir.resolve())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    hf_model = transformers.GPT2ForSequenceClassification.from_pretrained(base_dir, num_labels=2).eval()
    peft_model = peft.PeftModel.from_pretrained(hf_model, str(out))
    loaded, _ = load_classifier(lora_run.run)
    x = torch.tensor([tokenizer.encode(MESSAGE)])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=x).logits, loaded(x)[:, -1, :], atol=1e-4, rtol=0)

    capsys.readouterr()
    assert cli.main(["export-peft", "--run", str(tiny_spam_run.run), "--out", str(tmp_path / "x")]) == 1
    assert "only a `--method lora` run has an adapter to export" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:fan_in_fan_out is set to True")
def test_an_exported_classifier_classifies_a_padded_batch_in_peft(tiny_spam_run, small_spam_data_dir, tokenizer,
                                                                  tmp_path, run_cli):
    """The export of a random-base run writes pad_token_id (end-of-text, as the classifier pads) into the
    base's config.json: GPT2ForSequenceClassification then classifies a batch of messages of several
    lengths, each row read at its last real token, with our model's logits for each message alone."""
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    run, out = tmp_path / "run", tmp_path / "peft"
    status, _ = run_cli(["finetune", "--model", str(tiny_spam_run.model_dir), "--random-init", "--method", "lora",
                         "--rank", "2", "--epochs", "1", "--dynamic-padding", "--data-dir", str(small_spam_data_dir),
                         "--out", str(run), "--device", "cpu"])
    assert status == 0
    assert run_cli(["export-peft", "--run", str(run), "--out", str(out)])[0] == 0
    assert json.loads((out / "base" / "config.json").read_text())["pad_token_id"] == 50256
    hf_model = transformers.GPT2ForSequenceClassification.from_pretrained(out / "base", num_labels=2).eval()
    peft_model = peft.PeftModel.from_pretrained(hf_model, str(out)).eval()
    ours, _ = load_classifier(run)
    messages = ["Hi", MESSAGE, "Are we still meeting at the station at six, or did the plan change again?"]
    rows = [tokenizer.encode(message) for message in messages]
    assert len({len(row) for row in rows}) == 3 and all(50256 not in row for row in rows)
    width = max(len(row) for row in rows)
    batch = torch.tensor([row + [50256] * (width - len(row)) for row in rows])
    with torch.no_grad():
        expected = torch.cat([ours(torch.tensor([row]))[:, -1, :] for row in rows])
        torch.testing.assert_close(peft_model(input_ids=batch).logits, expected, atol=1e-4, rtol=0)


def test_cli_lora_options_match_the_library(capsys):
    parser = cli.build_parser()
    finetune = parser._subparsers._group_actions[0].choices["finetune"]
    scaling = next(a for a in finetune._actions if a.dest == "scaling")
    assert tuple(scaling.choices) == tuple(SCALINGS) and scaling.default == LORA_DEFAULTS["scaling"]
    defaults = {a.dest: a.default for a in finetune._actions}
    assert (defaults["rank"], defaults["alpha"], defaults["lora_dropout"]) == (
        LORA_DEFAULTS["rank"], LORA_DEFAULTS["alpha"], LORA_DEFAULTS["dropout"])
    assert defaults["lr"] is None and "8e-4 for lora" in finetune.format_help()

    args = parser.parse_args(["finetune", "--method", "lora", "--rank", "2", "--alpha", "3", "--targets", "W_query",
                              "W_value", "--scaling", "alpha", "--lora-dropout", "0.1"])
    model = prepare_for_classification(GPTModel(GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4,
                                                          n_layers=1)), "lora", method_options=lora_method_options(args))
    layers = lora_layers(model)
    assert sorted(layers) == ["trf_blocks.0.att.W_query", "trf_blocks.0.att.W_value"]
    lora = layers["trf_blocks.0.att.W_query"].lora["default"]
    assert (lora.rank, lora.scaling, lora.dropout_p) == (2, 3.0, 0.1)


def test_documented_recipe_count_on_gpt2_small():
    """The recipe itself (head, then LoRA on every linear layer) on gpt2-small: 2,666,528 trainable.

    Built on the meta device: counting needs shapes only, so no 124M-parameter allocation.
    """
    with torch.device("meta"):
        model = GPTModel(GPTConfig.from_preset("gpt2-small", qkv_bias=True))
        model.tie_weights()
        prepare_for_classification(model, "lora")
    assert count_parameters(model, trainable_only=True) == 2_666_528
    assert count_parameters(model) == 124_441_346 + 2_666_528


@pytest.mark.parametrize("method, options, message", [
    ("lora", {"rank": 0}, "rank must be a positive integer"),
    ("lora", {"dropout": 1.5}, r"dropout must be a probability in \[0, 1\)"),
    ("last-block", {"rank": 8}, "method 'last-block' takes no options"),
])
def test_bad_method_options_are_refused_before_the_head_changes(method, options, message):
    model = GPTModel(GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=1))
    head = model.out_head
    with pytest.raises(ValueError, match=message):
        prepare_for_classification(model, method, method_options=options)
    assert model.out_head is head and all(p.requires_grad for p in model.parameters())


def test_cli_finetune_bad_lora_option_is_one_line_before_any_work(tmp_path, capsys):
    data = tmp_path / "data"
    with pytest.raises(SystemExit) as exit_:  # checked while parsing the command line
        cli.main(["finetune", "--method", "lora", "--rank", "0", "--data-dir", str(data),
                  "--out", str(tmp_path / "run"), "--random-init"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("error: gptlora finetune: argument --rank: expected a whole number of at "
                                       "least 1, found 0 (see `gptlora finetune --help`)\n")
    assert not data.exists() and not (tmp_path / "run").exists()  # nothing downloaded, no run started


def test_trained_model_as_base_is_named_for_what_it_is(lora_run):
    trained, _ = load_classifier(lora_run.run)
    with pytest.raises(ValueError, match="already has an adapter named 'default'") as raised:
        load_classifier(lora_run.run, base=trained)
    assert "exact base" not in str(raised.value)


def test_unknown_lora_option_is_refused_before_any_change():
    model = GPTModel(GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=1))
    head = model.out_head
    with pytest.raises(ValueError, match=r"unknown LoRA option\(s\) \['ranks'\]; expected some of rank, alpha"):
        prepare_for_classification(model, "lora", method_options={"ranks": 8})
    assert model.out_head is head
