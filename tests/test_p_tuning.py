"""P-tuning: the prompt encoder against peft's (same architecture, same start), files, the peft export, the CLI."""

import json

import pytest
import torch
from test_lora import TINY, ids, tiny_gpt
from test_lora_io import classifier_base, hf_reference
from test_prompt_tuning import perturbed

from gptlora.formats.lora_io import ADAPTER_CONFIG, BaseMismatchError
from gptlora.formats.prompt_tuning_io import export_prompt_peft, load_prompt, save_prompt
from gptlora.model import count_parameters
from gptlora.p_tuning import PromptEncoder, PTunedGPT, apply_p_tuning
from gptlora.prompt_tuning import prompt_method_options


def p_tuned(encoder="mlp", hidden=None, head=False, n=3, seed=5):
    """A tiny model with a P-tuning encoder of ``n`` virtual tokens, every trainable number perturbed."""
    base = classifier_base() if head else tiny_gpt()
    return perturbed(apply_p_tuning(base, n, encoder, hidden, modules_to_save=["out_head"] if head else None), seed)


@pytest.mark.parametrize("encoder, hidden", [("mlp", None), ("mlp", 12), ("lstm", 8)])
def test_the_encoder_is_peft_s_number_for_number(encoder, hidden):
    """Same parameter names and shapes, and under one seed the same starting numbers and the same prompt."""
    peft = pytest.importorskip("peft")
    config = peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, token_dim=TINY.emb_dim,
                                      num_transformer_submodules=1, num_attention_heads=TINY.n_heads,
                                      num_layers=TINY.n_layers, encoder_reparameterization_type=encoder.upper(),
                                      encoder_hidden_size=hidden or TINY.emb_dim)
    torch.manual_seed(0)
    theirs = peft.tuners.p_tuning.PromptEncoder(config)
    torch.manual_seed(0)
    ours = PromptEncoder(4, TINY.emb_dim, encoder, hidden)
    mine, reference = ours.state_dict(), theirs.state_dict()
    assert list(mine) == list(reference)
    for key in mine:
        assert torch.equal(mine[key], reference[key]), key
    with torch.no_grad():
        torch.testing.assert_close(ours(2), theirs(torch.arange(4).expand(2, -1)), atol=1e-6, rtol=0)


def test_counts_and_only_the_encoder_and_the_head_train():
    d, h, n = TINY.emb_dim, 12, 3
    model = p_tuned("mlp", hidden=h, head=True, n=n)
    mlp = n * d + (d * h + h) + (h * h + h) + (h * d + d)
    assert count_parameters(model, trainable_only=True) == mlp + (d * 2 + 2)  # + the head's copy
    assert all(not p.requires_grad for name, p in model.base.named_parameters() if "copies" not in name)
    lstm = PromptEncoder(n, d, "lstm", h)
    per_direction = lambda inputs: 4 * h * (inputs + h) + 2 * 4 * h  # noqa: E731  (gates: W_ih, W_hh, 2 biases)
    expected = n * d + 2 * per_direction(d) + 2 * per_direction(2 * h) + (2 * h * 2 * h + 2 * h) + (2 * h * d + d)
    assert count_parameters(lstm) == expected


def test_options_belong_to_their_method():
    assert prompt_method_options("p-tuning", {})["encoder"] == "mlp"
    with pytest.raises(ValueError, match="a prompt encoder .* belongs to p-tuning, not prompt-tuning"):
        prompt_method_options("prompt-tuning", {"encoder": "lstm"})
    with pytest.raises(ValueError, match="unknown P-tuning prompt encoder 'gru'; choose one of mlp, lstm"):
        prompt_method_options("p-tuning", {"encoder": "gru"})


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_files_round_trip_with_the_base_fingerprint(tmp_path, encoder):
    model = p_tuned(encoder, hidden=8, head=True)
    save_prompt(model, tmp_path / "p", verbose=False)
    config = json.loads((tmp_path / "p" / ADAPTER_CONFIG).read_text())
    assert (config["method"], config["encoder"], config["hidden"]) == ("p-tuning", encoder, 8)
    loaded = load_prompt(classifier_base(), tmp_path / "p")
    x = ids()
    assert isinstance(loaded, PTunedGPT) and torch.equal(loaded(x), model(x))
    with pytest.raises(BaseMismatchError):
        load_prompt(classifier_base(seed=3), tmp_path / "p")


# peft warns that GPT-2 with inputs_embeds and no pad token reads the last position: that is what we compare.
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
@pytest.mark.parametrize("task", ["lm", "classifier"])
def test_export_to_peft_reproduces_our_logits(tmp_path, encoder, task):
    peft = pytest.importorskip("peft")
    x = ids(tokens=6)
    x[x == TINY.vocab_size - 1] = 0  # keep the pad id out: the classifier then pools the last token
    classifier = task == "classifier"
    hf_model = hf_reference(tiny_gpt(), classifier, tmp_path / "base")
    model = p_tuned(encoder, hidden=8, head=classifier)
    export_prompt_peft(model, tmp_path / "peft", base_model_name_or_path=str(tmp_path / "base"))
    config = json.loads((tmp_path / "peft" / ADAPTER_CONFIG).read_text())
    assert (config["peft_type"], config["encoder_reparameterization_type"]) == ("P_TUNING", encoder.upper())
    peft_model = peft.PeftModel.from_pretrained(hf_model, str(tmp_path / "peft")).eval()
    with torch.no_grad():
        theirs, ours = peft_model(input_ids=x).logits, model(x)
    if classifier:
        ours = ours[:, -1, :]
    else:  # peft returns the virtual positions' logits first
        theirs = theirs[:, model.num_virtual_tokens:]
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_finetune_p_tuning_run_reloads_and_exports(run_cli, small_spam_data_dir, tokenizer, tmp_path):
    from gptlora.classifier import calc_accuracy_loader
    from gptlora.formats.hf_layout import config_to_hf
    from gptlora.model import GPTConfig
    from gptlora.recipes.finetune import load_classifier
    from gptlora.spam import create_dataloaders

    config = GPTConfig(vocab_size=50257, context_length=128, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
                       qkv_bias=True)
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text(json.dumps(config_to_hf(config)))
    run = tmp_path / "run"
    status, printed = run_cli(["finetune", "--model", str(tmp_path / "tiny"), "--random-init", "--method", "p-tuning",
                               "--prompt-encoder", "lstm", "--encoder-hidden", "8", "--num-virtual-tokens", "4",
                               "--epochs", "1", "--data-dir", str(small_spam_data_dir), "--out", str(run),
                               "--device", "cpu"])
    assert status == 0, printed
    d, h = 32, 8
    lstm = 2 * (4 * h * (d + h) + 8 * h) + 2 * (4 * h * (2 * h + h) + 8 * h)
    encoder = 4 * d + lstm + (2 * h * 2 * h + 2 * h) + (2 * h * d + d)
    assert f"trainable parameters: {encoder + 2 * d + 2:,} (method p-tuning, lr 0.001)" in printed
    loaded, _ = load_classifier(run)
    assert isinstance(loaded, PTunedGPT) and loaded.prompt.encoder_type == "lstm"
    _, val_loader, _ = create_dataloaders(small_spam_data_dir, tokenizer)
    metrics = json.loads((run / "metrics.json").read_text())
    assert calc_accuracy_loader(val_loader, loaded, "cpu") == metrics["accuracy"]["validation"]

    # the export's logits are checked against peft above; here the command writes peft's P-tuning files
    assert run_cli(["export-peft", "--run", str(run), "--out", str(tmp_path / "peft")])[0] == 0
    exported = json.loads((tmp_path / "peft" / ADAPTER_CONFIG).read_text())
    assert (exported["peft_type"], exported["encoder_reparameterization_type"]) == ("P_TUNING", "LSTM")


def test_gpt2_small_count_with_the_head():
    """20 virtual tokens, the MLP encoder at peft's default width (the model's, 768), the 2-class head."""
    from gptlora.recipes.method_comparison import trainable_on_meta

    assert trainable_on_meta("p-tuning") == 20 * 768 + 3 * (768 * 768 + 768) + 768 * 2 + 2 == 1_788_674


@pytest.fixture(scope="module")
def pretraining_setup(tmp_path_factory, spam_file):
    """A tiny random GPT-2 checkpoint (32 wide, context 64), a 4,000-character text, and the common command."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("p-tuning-pretrain")
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                         vocab_size=50257)).save_pretrained(root / "tiny-gpt2")
    (root / "text.txt").write_text(spam_file.read_text(encoding="utf-8")[:4000], encoding="utf-8")
    common = ["pretrain", "--text", str(root / "text.txt"), "--model", str(root / "tiny-gpt2"), "--method",
              "p-tuning", "--num-virtual-tokens", "4", "--epochs", "1", "--eval-freq", "5", "--eval-iter", "1",
              "--lr", "1e-2", "--sample-tokens", "3", "--device", "cpu"]
    return root / "tiny-gpt2", common


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_pretrain_p_tuning_run_generates_and_exports_to_peft(run_cli, pretraining_setup, tmp_path, capsys):
    """Continued pretraining of a (tiny, random) GPT-2 checkpoint with P-tuning: the windows leave room for
    the prompt, the run reloads, generates (without a KV cache) and exports to peft with the same logits."""
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    from gptlora.recipes.pretrain_run import load_language_model

    base_dir, common = pretraining_setup
    status, printed = run_cli(common + ["--out", str(tmp_path / "run")])
    assert status == 0, printed
    model, info = load_language_model(tmp_path / "run")
    assert isinstance(model, PTunedGPT) and info["context_length"] == 64 - 4  # the windows leave room for 4
    assert model.prompt.encoder_type == "mlp" and info["method_options"]["init_text"] is None
    for extra in ([], ["--int8"]):
        status, generated = run_cli(["generate", "--model", str(tmp_path / "run"), "--max-new-tokens", "3", *extra])
        assert status == 0 and generated.startswith("Every effort moves you"), extra

    assert run_cli(["export-peft", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "peft")])[0] == 0
    hf = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(base_dir),
                                        str(tmp_path / "peft")).eval()
    ids = torch.randint(0, 50257, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs, ours = hf(input_ids=ids).logits[:, 4:], model(ids)  # peft gives the virtual positions first
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)

    capsys.readouterr()
    status, _ = run_cli(common + ["--context-length", "62", "--out", str(tmp_path / "long")])
    assert status == 1 and "4 virtual tokens + 62 tokens of input exceed the context length 64" in \
        capsys.readouterr().err
    assert not (tmp_path / "long").exists()


def test_pretrain_p_tuning_resumes_as_if_never_stopped(run_cli, pretraining_setup, tmp_path):
    from gptlora.recipes.pretrain_run import load_language_model

    _, common = pretraining_setup
    assert run_cli(common + ["--epochs", "2", "--out", str(tmp_path / "whole")])[0] == 0
    assert run_cli(common + ["--out", str(tmp_path / "half")])[0] == 0
    assert run_cli(["pretrain", "--resume", str(tmp_path / "half"), "--epochs", "2"])[0] == 0
    history = [json.loads((tmp_path / run / "metrics.json").read_text())["history"] for run in ("whole", "half")]
    assert history[0]["val_losses"] == history[1]["val_losses"]
    whole, half = (load_language_model(tmp_path / run)[0] for run in ("whole", "half"))
    assert all(torch.equal(a, b) for a, b in zip(whole.prompt.state_dict().values(), half.prompt.state_dict().values()))
