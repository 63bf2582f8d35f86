"""DoRA (Liu et al., 2024) as an option of LoRA: the maths, the detached norm, merging, files, and peft parity."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_lora import TINY, ids, randomize_adapters, tiny_gpt
from test_lora_io import adapted_classifier, classifier_base, hf_reference
from torch import nn

from gptlora.formats.lora_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter, save_adapter
from gptlora.formats.lora_peft_export import export_peft
from gptlora.lora import (LinearWithLoRA, apply_lora, lora_layers, merge_lora, set_adapter, trainable_summary,
                          unmerge_lora)
from gptlora.model import count_parameters
from gptlora.qlora import quantize_base


def randomize_magnitudes(model, seed=3):
    """Move every DoRA magnitude off its starting value, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for lora in layer.lora.values():
                noise = torch.randn(lora.magnitude.shape, generator=gen).to(lora.magnitude.dtype)
                lora.magnitude.mul_(1 + 0.3 * noise)


def dora_layer(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    layer = LinearWithLoRA(nn.Linear(6, 5), rank=2, alpha=4, dropout=dropout, use_dora=True)
    return layer


def test_starts_at_the_base_with_the_row_norms_as_magnitude():
    layer = dora_layer()
    lora = layer.lora["default"]
    assert lora.magnitude.shape == (5,)
    torch.testing.assert_close(lora.magnitude, layer.linear.weight.norm(dim=1))  # one length per output unit
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), layer.linear(x), atol=1e-6, rtol=0)
    assert count_parameters(layer, trainable_only=True) == 2 * (6 + 5) + 5 + 6 * 5 + 5  # nothing frozen yet here


def test_output_is_magnitude_times_direction_by_hand():
    layer = dora_layer()
    lora = layer.lora["default"]
    with torch.no_grad():
        lora.B.normal_()
        lora.magnitude.mul_(torch.linspace(0.5, 1.5, 5))
    w, b = layer.linear.weight.double(), layer.linear.bias.double()
    adapted = w + 2.0 * (lora.A.double() @ lora.B.double()).T  # scaling alpha/rank = 4/2
    by_hand = lora.magnitude.double()[:, None] * adapted / adapted.norm(dim=1, keepdim=True)
    x = torch.randn(4, 6)
    torch.testing.assert_close(layer(x).double(), x.double() @ by_hand.T + b, atol=1e-6, rtol=0)


def test_the_norm_is_a_constant_in_the_backward_pass():
    """Gradients equal those of the formula with the norm detached, and differ from the undetached one."""
    layer = dora_layer()
    lora = layer.lora["default"]
    with torch.no_grad():
        lora.B.normal_()
    x, target = torch.randn(4, 6), torch.randn(4, 5)
    w, b = layer.linear.weight.detach(), layer.linear.bias.detach()

    def grads(output):
        params = (lora.A, lora.B, lora.magnitude)
        return torch.autograd.grad(nn.functional.mse_loss(output, target), params)

    def formula(detach):
        adapted = w + lora.scaling * (lora.A @ lora.B).T
        norm = adapted.norm(dim=1, keepdim=True)
        return x @ (lora.magnitude[:, None] * adapted / (norm.detach() if detach else norm)).T + b

    ours, detached, full = grads(layer(x)), grads(formula(True)), grads(formula(False))
    for mine, expected in zip(ours, detached):
        torch.testing.assert_close(mine, expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(ours[0], full[0], atol=1e-5)  # the detach is not a no-op


def test_merge_is_exact_and_unmerge_restores_the_weight():
    """In float64, so that the check sees the maths rather than float32 rounding of logits near 40."""
    model = tiny_gpt(tied=True).double()
    embedding = model.tok_emb.weight.detach().clone()
    apply_lora(model, rank=4, alpha=8, use_dora=True, verbose=False)
    randomize_adapters(model)
    randomize_magnitudes(model)
    weights = {n: layer.linear.weight for n, layer in lora_layers(model).items()}
    x = ids()
    adapted = model(x)
    assert not torch.allclose(adapted, tiny_gpt().double()(x), atol=1e-2)
    merge_lora(model)
    torch.testing.assert_close(model(x), adapted, atol=1e-10, rtol=0)
    assert torch.equal(model.tok_emb.weight, embedding)  # the tied head merged into a copy
    unmerge_lora(model)
    assert all(layer.linear.weight is weights[n] for n, layer in lora_layers(model).items())
    assert torch.equal(model(x), adapted)


def test_trains_magnitude_a_and_b_only():
    model = tiny_gpt()
    apply_lora(model, rank=4, alpha=8, target_modules=["W_query", "W_value"], use_dora=True, verbose=False)
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"A", "B", "magnitude"}
    expected = 2 * 2 * (4 * (TINY.emb_dim + TINY.emb_dim) + TINY.emb_dim)  # 2 blocks x (q, v) x (A, B, m)
    assert trainable_summary(model).startswith(f"trainable params: {expected:,} ||")


def test_mixed_batch_rows_match_each_adapter_alone():
    model = tiny_gpt().double()  # float64: row subsets change float32 summation order
    apply_lora(model, rank=4, alpha=8, use_dora=True, verbose=False)
    apply_lora(model, rank=2, alpha=2, adapter_name="plain", verbose=False)
    randomize_adapters(model)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora["default"].magnitude.mul_(1.1)
    x = ids(batch=3)
    mixed = model(x, adapter_names=["default", "plain", "__base__"])
    set_adapter(model, "default")
    torch.testing.assert_close(mixed[0], model(x)[0], atol=1e-10, rtol=0)
    set_adapter(model, "plain")
    torch.testing.assert_close(mixed[1], model(x)[1], atol=1e-10, rtol=0)


def test_adapter_files_hold_the_magnitude_and_round_trip(tmp_path):
    model = adapted_classifier(use_dora=True)
    randomize_magnitudes(model)
    save_adapter(model, tmp_path / "dora", verbose=False)
    stored = load_file(str(tmp_path / "dora" / ADAPTER_WEIGHTS))
    assert stored["trf_blocks.0.att.W_query.magnitude"].shape == (TINY.emb_dim,)
    assert json.loads((tmp_path / "dora" / ADAPTER_CONFIG).read_text())["use_dora"] is True
    fresh = classifier_base()
    load_adapter(fresh, tmp_path / "dora")
    x = ids()
    assert torch.equal(fresh(x), model(x))


def test_dora_over_a_quantized_base_is_refused_in_one_line():
    model = tiny_gpt(tied=False)
    quantize_base(model, method="int8")
    with pytest.raises(ValueError, match=r"^DoRA needs the base weight itself .* \(int8\): use plain LoRA on a "
                                         r"quantized base, or DoRA on a full-precision one$"):
        apply_lora(model, rank=2, alpha=2, use_dora=True, verbose=False)
    assert not lora_layers(model)  # refused before any layer changed


# peft rightly warns that the tied lm_head carries a LoRA and that lm_head is no Conv1D; transformers about a rename.
@pytest.mark.filterwarnings("ignore:.*tied layer is part of the adapter", "ignore:fan_in_fan_out is set to True",
                            "ignore::FutureWarning", "ignore::UserWarning")
@pytest.mark.parametrize("task", ["lm", "lm-tied-head", "classifier"])
def test_export_matches_peft_use_dora_merged_and_unmerged(tmp_path, task):
    """peft's ``use_dora=True`` on the same weights gives our outputs to 1e-5, before and after merging."""
    peft = pytest.importorskip("peft")
    x = ids(tokens=9)
    x[x == TINY.vocab_size - 1] = 0  # keep the pad id out: the classifier then pools the last token
    if task.startswith("lm"):  # mixed ranks; every layer, or every layer but the tied head
        model = tiny_gpt()
        hf_model = hf_reference(model, classifier=False, directory=tmp_path / "base")
        apply_lora(model, rank=4, alpha=8, rank_pattern={"W_key": 2}, use_dora=True, verbose=False,
                   exclude_modules=None if task == "lm-tied-head" else ["out_head"])
        randomize_adapters(model)
    else:  # q and v only (c_attn's key third has no adapter), head trained in full
        hf_model = hf_reference(tiny_gpt(), classifier=True, directory=tmp_path / "base")
        model = adapted_classifier(use_dora=True)
    randomize_magnitudes(model)
    export_peft(model, tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / ADAPTER_CONFIG).read_text())["use_dora"] is True
    ours = model(x) if task.startswith("lm") else model(x)[:, -1, :]
    peft_model = peft.PeftModel.from_pretrained(hf_model, str(tmp_path / "peft")).eval()
    torch.testing.assert_close(peft_model(input_ids=x).logits, ours, atol=1e-5, rtol=0)
    if task == "lm-tied-head":
        return  # peft merges a tied lm_head into the weight it shares with wte (it warns): the embedding changes
    merged_theirs = peft_model.merge_and_unload()(input_ids=x).logits
    merge_lora(model)
    merged_ours = model(x) if task.startswith("lm") else model(x)[:, -1, :]
    torch.testing.assert_close(merged_theirs, ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(merged_ours, merged_theirs, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- the command line: --dora

@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory):
    """A randomly initialised GPT-2 (32 wide, 2 layers, context 128) in the Hugging Face layout, head tied."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny-gpt2")
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                                         vocab_size=50257)).save_pretrained(directory)
    return directory


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_finetune_dora_run_reloads_and_exports_to_peft(run_cli, tiny_gpt2_dir, small_spam_data_dir, tokenizer,
                                                       tmp_path):
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    from gptlora.recipes.finetune import ADAPTER_DIR, load_classifier

    run = tmp_path / "run"
    status, printed = run_cli(["finetune", "--model", str(tiny_gpt2_dir), "--method", "lora", "--dora", "--rank",
                               "2", "--alpha", "4", "--targets", "W_query", "W_value", "--epochs", "1",
                               "--data-dir", str(small_spam_data_dir), "--out", str(run), "--device", "cpu"])
    assert status == 0, printed
    per_layer = 2 * (32 + 32) + 32  # A, B and the magnitude of one 32x32 layer at rank 2
    assert f"trainable parameters: {2 * 2 * per_layer:,} (method lora" in printed
    stored = load_file(str(run / ADAPTER_DIR / ADAPTER_WEIGHTS))
    model, _ = load_classifier(run)
    wrapper = model.trf_blocks[0].att.W_query
    assert torch.equal(stored["trf_blocks.0.att.W_query.magnitude"], wrapper.lora["default"].magnitude)
    # training moved the magnitude away from the base weight's row norms, where it started
    assert not torch.allclose(wrapper.lora["default"].magnitude, wrapper.linear.weight.norm(dim=1), atol=1e-6)

    assert run_cli(["export-peft", "--run", str(run), "--out", str(tmp_path / "peft")])[0] == 0
    hf_model = transformers.GPT2ForSequenceClassification.from_pretrained(tiny_gpt2_dir, num_labels=2).eval()
    peft_model = peft.PeftModel.from_pretrained(hf_model, str(tmp_path / "peft")).eval()
    x = torch.tensor([tokenizer.encode("85233 FREE>Ringtone!Reply REAL")])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=x).logits, model(x)[:, -1, :], atol=1e-5, rtol=0)


def test_pretrain_dora_run_reloads(run_cli, tiny_gpt2_dir, spam_file, tmp_path):
    from gptlora.recipes.pretrain_run import load_language_model

    text = tmp_path / "text.txt"
    text.write_text(spam_file.read_text(encoding="utf-8")[:4000], encoding="utf-8")
    status, printed = run_cli(["pretrain", "--text", str(text), "--model", str(tiny_gpt2_dir), "--method", "lora",
                               "--dora", "--rank", "2", "--alpha", "4", "--context-length", "32", "--epochs", "1",
                               "--eval-freq", "5", "--eval-iter", "1", "--sample-tokens", "3", "--out",
                               str(tmp_path / "run"), "--device", "cpu"])
    assert status == 0, printed
    model, info = load_language_model(tmp_path / "run")
    assert info["method_options"]["use_dora"] is True
    assert all(layer.lora["default"].use_dora for layer in lora_layers(model).values())


def test_gpt2_small_dora_count_adds_one_magnitude_per_output_unit():
    """LoRA's appendix-E recipe (rank 16 on every linear layer, the 2-class head included) with DoRA."""
    from gptlora.recipes.method_comparison import trainable_on_meta

    magnitudes = 12 * (3 * 768 + 768 + 4 * 768 + 768) + 2  # per block q, k, v, out_proj, ff.0, ff.2; the head
    assert trainable_on_meta("dora") == trainable_on_meta("lora") + magnitudes == 2_749_474
