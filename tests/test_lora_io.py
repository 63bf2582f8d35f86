"""LoRA adapter files: round trip, base checks, several adapters on one base, and the export to peft."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_lora import TINY, ids, randomize_adapters, tiny_gpt
from torch import nn

from gptlora.lora import apply_lora, lora_layers, set_adapter
from gptlora.formats.lora_io import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, BaseMismatchError, base_fingerprint, base_state_dict,
                             load_adapter, save_adapter)
from gptlora.formats.lora_peft_export import export_peft
from gptlora.infra.tensor_hash import tensors_sha256
from gptlora.model import GPTModel
from gptlora.pretrained import save_hf


def classifier_base(seed=0) -> GPTModel:
    """A tiny GPT with a tied embedding and a fresh Linear(D, 2) head, like the spam classifier."""
    model = tiny_gpt(seed)
    torch.manual_seed(seed + 100)
    model.out_head = nn.Linear(TINY.emb_dim, 2)
    return model


def adapted_classifier(seed=0, adapter_seed=1, **lora_options) -> GPTModel:
    model = classifier_base(seed)
    options = dict(rank=4, alpha=8, target_modules=["W_query", "W_value", "ff.layers.0"],
                   modules_to_save=["out_head"], verbose=False)
    apply_lora(model, **{**options, **lora_options})
    randomize_adapters(model, seed=adapter_seed)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "copies"):
                for copy in module.copies.values():
                    copy.weight.add_(0.1)
    return model


def test_round_trip_onto_a_fresh_base(tmp_path, capsys):
    model = adapted_classifier()
    x = ids()
    info = save_adapter(model, tmp_path / "adapter")
    assert f"{info['parameters']:,} parameters, {info['bytes']:,} bytes" in capsys.readouterr().out
    stored = load_file(str(tmp_path / "adapter" / ADAPTER_WEIGHTS))
    lora_keys = {f"trf_blocks.{i}.{m}.{ab}" for i in range(2) for m in ("att.W_query", "att.W_value", "ff.layers.0")
                 for ab in "AB"}
    assert set(stored) == lora_keys | {"out_head.weight", "out_head.bias"}  # nothing of the base
    assert info["parameters"] == sum(t.numel() for t in stored.values())
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert (config["rank"], config["alpha"], config["scaling"]) == (4, 8, "alpha/rank")
    assert config["base_model"]["class"] == "GPTModel" and config["base_model"]["config"]["emb_dim"] == TINY.emb_dim

    fresh = classifier_base()
    assert load_adapter(fresh, tmp_path / "adapter") == "default"
    assert torch.equal(fresh(x), model(x))
    assert not any(p.requires_grad for p in fresh.parameters())


def test_loading_onto_another_base_is_a_clear_error(tmp_path):
    save_adapter(adapted_classifier(), tmp_path / "adapter", verbose=False)
    other_weights = classifier_base(seed=3)
    with pytest.raises(ValueError, match="other base weights.*check_fingerprint=False"):
        load_adapter(other_weights, tmp_path / "adapter")
    fingerprint = base_fingerprint(other_weights)
    load_adapter(other_weights, tmp_path / "adapter", check_fingerprint=False)  # when it is meant
    assert base_fingerprint(other_weights) == fingerprint  # an adapter does not change the base

    wider = GPTModel(TINY.__class__(**{**TINY.to_dict(), "emb_dim": 48}))
    wider.out_head = nn.Linear(48, 2)
    with pytest.raises(ValueError, match=r"trf_blocks.0.att.W_query.A: expected shape \(48, 4\).*found \(32, 4\)"):
        load_adapter(wider, tmp_path / "adapter")
    assert not lora_layers(wider)  # a failed load leaves the model untouched


def test_base_mismatch_has_its_own_error_and_the_fingerprint_is_the_shared_hash(tmp_path):
    save_adapter(adapted_classifier(), tmp_path / "adapter", verbose=False)
    with pytest.raises(BaseMismatchError):
        load_adapter(classifier_base(seed=3), tmp_path / "adapter")
    base = classifier_base()
    load_adapter(base, tmp_path / "adapter")
    with pytest.raises(ValueError, match="already has an adapter named 'default'") as raised:
        load_adapter(base, tmp_path / "adapter")
    assert not isinstance(raised.value, BaseMismatchError)
    state = base_state_dict(base)
    assert base_fingerprint(base) == "sha256:" + tensors_sha256(list(state.items())) == "sha256:" + tensors_sha256(state)
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    (tmp_path / "adapter" / ADAPTER_CONFIG).write_text(json.dumps({**config, "version": 1}))
    with pytest.raises(ValueError, match="adapter format version 1; this gptlora reads version 2"):
        load_adapter(classifier_base(), tmp_path / "adapter")


def test_two_adapters_on_one_base(tmp_path):
    first, second = adapted_classifier(adapter_seed=1), adapted_classifier(adapter_seed=2, rank=2)
    x = ids()
    save_adapter(first, tmp_path / "first", verbose=False)
    save_adapter(second, tmp_path / "second", verbose=False)

    base = classifier_base()
    embedding = base.tok_emb.weight
    load_adapter(base, tmp_path / "first", adapter_name="spam-a")
    load_adapter(base, tmp_path / "second", adapter_name="spam-b")
    assert torch.equal(base(x), second(x))  # the last one loaded is active
    set_adapter(base, "spam-a")
    assert torch.equal(base(x), first(x))
    set_adapter(base, "spam-b")
    assert torch.equal(base(x), second(x))
    assert base.tok_emb.weight is embedding  # the base was never reloaded
    with pytest.raises(ValueError, match="already has an adapter named 'spam-a'"):
        load_adapter(base, tmp_path / "first", adapter_name="spam-a")


def hf_reference(base: GPTModel, classifier: bool, directory):
    """The transformers GPT-2 made from ``base``'s weights, as a user would: save_hf, then from_pretrained."""
    transformers = pytest.importorskip("transformers")
    save_hf(base, directory)
    if classifier:  # score is new (random): the peft adapter brings the trained head
        return transformers.GPT2ForSequenceClassification.from_pretrained(
            directory, num_labels=2, pad_token_id=TINY.vocab_size - 1).eval()
    return transformers.GPT2LMHeadModel.from_pretrained(directory).eval()


# peft rightly warns that the tied lm_head carries a LoRA and that lm_head is no Conv1D; transformers about a rename.
@pytest.mark.filterwarnings("ignore:.*tied layer is part of the adapter", "ignore:fan_in_fan_out is set to True",
                            "ignore::FutureWarning")
@pytest.mark.parametrize("task, options", [
    ("lm", dict(scaling="alpha/rank", rank_pattern={"W_key": 2})),  # every layer, tied head, mixed ranks
    ("classifier", dict(scaling="alpha/sqrt(rank)", target_modules=None, modules_to_save=None)),  # LoRA on the head
    ("classifier", dict(scaling="alpha")),  # q and v only, head and its bias trained in full
])
def test_export_peft_reproduces_our_logits(tmp_path, task, options):
    peft = pytest.importorskip("peft")
    x = ids(tokens=9)
    x[x == TINY.vocab_size - 1] = 0  # keep the pad id out: the classifier then pools the last token
    if task == "lm":
        model = tiny_gpt()
        hf_model = hf_reference(model, classifier=False, directory=tmp_path / "base")
        apply_lora(model, rank=4, alpha=8, verbose=False, **options)
        randomize_adapters(model)
    else:
        hf_model = hf_reference(tiny_gpt(), classifier=True, directory=tmp_path / "base")
        model = adapted_classifier(**options)
    export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / ADAPTER_CONFIG).read_text())
    assert config["fan_in_fan_out"] and "transformer.h.0.attn.c_attn" in config["target_modules"]

    hf_names = {name for name, _ in hf_model.named_parameters(remove_duplicate=False)}
    for key in load_file(str(tmp_path / "peft" / ADAPTER_WEIGHTS)):  # every exported tensor has a place
        name = key.removeprefix("base_model.model.")
        assert name.split(".lora_")[0] + ".weight" in hf_names if ".lora_" in name else name in hf_names, key
    peft_model = peft.PeftModel.from_pretrained(hf_model, str(tmp_path / "peft"))
    theirs = peft_model(input_ids=x).logits
    ours = model(x) if task == "lm" else model(x)[:, -1, :]
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)



def test_export_peft_is_still_importable_from_lora():
    """Users' scripts wrote ``from gptlora.lora import export_peft`` before it moved to formats.lora_peft_export;
    in a fresh process too, whichever of the two modules is imported first."""
    import subprocess
    import sys

    from gptlora.formats.lora_peft_export import export_peft as moved
    from gptlora.lora import export_peft

    assert export_peft is moved
    for first in ("gptlora.formats.lora_peft_export", "gptlora.lora"):
        code = f"import {first}; from gptlora.lora import export_peft; print(export_peft.__module__)"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert done.stdout.strip() == "gptlora.formats.lora_peft_export"
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        from gptlora import lora

        lora.no_such_name
