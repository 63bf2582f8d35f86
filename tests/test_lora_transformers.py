"""gptlora's LoRA on a Hugging Face ``transformers`` model: peft's RoBERTa tutorial counts, peft parity, ``Trainer``.

The peft tutorial (RoBERTa on SST-2) puts ``LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=32,
lora_dropout=0.01, target_modules=["query"])`` on ``roberta-base`` and prints
``trainable params: 665,858 || all params: 125,313,028 || trainable%: 0.5314``: 12 query layers
at rank 4 (12 * 4 * (768 + 768) = 73,728) plus the classification head trained in full (peft adds
it to ``modules_to_save`` for SEQ_CLS: 768 * 768 + 768 + 768 * 2 + 2 = 592,130); "all" counts the
head twice (frozen original and trained copy). Each 768x768 query weight (589,824 numbers) is
adapted by 6,144 (4 * (768 + 768)).
"""

import contextlib
import copy
import io

import pytest
import torch

from gptlora.formats.lora_io import load_adapter, save_adapter
from gptlora.lora import apply_lora, lora_disabled, lora_layers, trainable_summary

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TUTORIAL = "trainable params: 665,858 || all params: 125,313,028 || trainable%: 0.5314"
# roberta-base's config.json differs from RobertaConfig()'s defaults in these (the Hub's roberta-base config).
ROBERTA_BASE = dict(max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5)
SMALL = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
             max_position_embeddings=40, type_vocab_size=1, hidden_dropout_prob=0.0,
             attention_probs_dropout_prob=0.0)
OURS = dict(rank=4, alpha=32, target_modules=["query"], modules_to_save=["classifier"])


def roberta(seed=0, device=None, **config):
    """A random-initialised ``RobertaForSequenceClassification`` (2 labels), no download."""
    torch.manual_seed(seed)
    with torch.device(device) if device else contextlib.nullcontext():
        return transformers.RobertaForSequenceClassification(transformers.RobertaConfig(**config))


def peft_summary(model) -> str:
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=32, lora_dropout=0.01,
                                                   target_modules=["query"])).print_trainable_parameters()
    return printed.getvalue().strip()


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("config, expected", [
    (ROBERTA_BASE, TUTORIAL),  # the tutorial's numbers, exactly
    ({}, "trainable params: 665,858 || all params: 125,312,260 || trainable%: 0.5314"),  # RobertaConfig() itself
])
def test_the_tutorial_summary_line_and_peft_agree(config, expected):
    """Counted on the meta device: shapes only, no 125M-parameter allocation."""
    model = apply_lora(roberta(device="meta", **config), **OURS, verbose=False)
    assert trainable_summary(model) == expected
    assert peft_summary(roberta(device="meta", **config)) == expected
    query = model.roberta.encoder.layer[0].attention.self.query
    assert query.linear.weight.numel() == 589_824
    assert sum(p.numel() for p in query.lora["default"].parameters()) == 6_144


def randomized(model, seed=1):
    """Give every adapter and the head's copy numbers away from their start, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in (p for p in model.parameters() if p.requires_grad):
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=gen))
    return model


def batch(rows=3, tokens=9, seed=4):
    ids = torch.randint(3, SMALL["vocab_size"], (rows, tokens), generator=torch.Generator().manual_seed(seed))
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids))


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("use_dora", [False, True])
def test_outputs_equal_peft_s_with_the_same_adapter_weights(use_dora):
    ours = randomized(apply_lora(roberta(**SMALL), **OURS, use_dora=use_dora, verbose=False)).eval()
    theirs = peft.get_peft_model(roberta(**SMALL), peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=32,
                                                                   target_modules=["query"],
                                                                   use_dora=use_dora)).eval()
    state = theirs.state_dict()
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            lora, prefix = layer.lora["default"], f"base_model.model.{name}"
            state[f"{prefix}.lora_A.default.weight"].copy_(lora.A.T)
            state[f"{prefix}.lora_B.default.weight"].copy_(lora.B.T)
            if use_dora:
                state[f"{prefix}.lora_magnitude_vector.default.weight"].copy_(lora.magnitude)
        for key, tensor in ours.classifier.copies["default"].state_dict().items():
            state[f"base_model.model.classifier.modules_to_save.default.{key}"].copy_(tensor)
        mine = ours(**batch()).logits
        with lora_disabled(ours):
            assert not torch.allclose(ours(**batch()).logits, mine, atol=1e-3)  # the adapter changes the output
        torch.testing.assert_close(mine, theirs(**batch()).logits, atol=1e-5, rtol=0)


class InMemory(torch.utils.data.Dataset):
    """A tiny labelled data set: label 1 when the first token id is even."""

    def __init__(self, rows=16):
        data = batch(rows=rows, seed=7)
        self.rows = [dict(input_ids=ids, attention_mask=mask, labels=int(ids[0]) % 2 == 0)
                     for ids, mask in zip(data["input_ids"], data["attention_mask"])]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return {**self.rows[index], "labels": torch.tensor(int(self.rows[index]["labels"]))}


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_trainer_trains_only_the_adapters_and_the_saved_adapter_reloads(tmp_path):
    model = apply_lora(roberta(**SMALL), **OURS, verbose=False)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    arguments = transformers.TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=3,
                                               per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
                                               save_strategy="no", use_cpu=True, disable_tqdm=True)
    transformers.Trainer(model=model, args=arguments, train_dataset=InMemory()).train()
    for name, parameter in model.named_parameters():
        moved = not torch.equal(parameter.detach(), before[name])
        assert moved == parameter.requires_grad, name  # the adapters (and the head's copy) moved, nothing else
    assert any(".lora.default.B" in name for name, p in model.named_parameters() if p.requires_grad)

    save_adapter(model, tmp_path / "adapter", verbose=False)
    fresh = roberta(**SMALL)  # the same seed: the same base weights (the fingerprint checks it)
    load_adapter(fresh, tmp_path / "adapter")
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(**batch()).logits, model(**batch()).logits)
    with pytest.raises(ValueError, match="other base weights"):
        load_adapter(roberta(seed=1, **SMALL), tmp_path / "adapter")
