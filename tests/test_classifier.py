"""Classification fine-tuning: position choice, loss/accuracy, the training loop, save/load and the CLI."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from gptlora.cli import app as cli
from gptlora.classifier import (
    calc_accuracy_loader,
    calc_loss_loader,
    classification_logits,
    classify,
    prepare_for_classification,
    train_classifier,
)
from gptlora.recipes.finetune import load_classifier
from gptlora.model import GPTConfig, GPTModel
from gptlora.spam import create_dataloaders, pad_batch

TINY = GPTConfig(vocab_size=50257, context_length=128, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0, qkv_bias=True)


@pytest.fixture(scope="module")
def data_dir(spam_data_dir):
    """The book's three parquet splits (prepared once per session by conftest.py)."""
    return spam_data_dir


def tiny_model(seed=123) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(TINY)


class LastTokenParity(nn.Module):
    """A stand-in 'model' that predicts class ``id % 2`` at every position: ``[B, T] -> [B, T, 2]``."""

    def forward(self, ids):
        return nn.functional.one_hot(ids % 2, 2).float() * 10


def test_classification_logits_reads_last_position_or_last_real_token():
    logits = torch.arange(2 * 4 * 3, dtype=torch.float).view(2, 4, 3)  # [B=2, T=4, C=3]
    assert torch.equal(classification_logits(logits), logits[:, -1])
    assert torch.equal(classification_logits(logits, torch.tensor([2, 4])), torch.stack([logits[0, 1], logits[1, 3]]))


def test_right_padding_leaves_the_last_real_tokens_logits_unchanged(tokenizer):
    model = tiny_model().eval()
    texts = ["Free entry in 2 a wkly comp to win FA Cup final tkts", "Ok lar... Joking wif u oni..."]
    items = [(torch.tensor(tokenizer.encode(text)), torch.tensor(0)) for text in texts]
    ids, _, lengths = pad_batch(items)
    with torch.no_grad():
        batched = classification_logits(model(ids), lengths)
        alone = torch.cat([model(item.unsqueeze(0))[:, -1] for item, _ in items])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


def test_loss_and_accuracy_over_the_first_batches_restore_the_mode():
    ids = torch.tensor([[5, 1], [5, 2], [5, 3], [5, 4]])  # last tokens 1, 2, 3, 4 -> classes 1, 0, 1, 0
    labels = torch.tensor([1, 0, 0, 0])
    loader = DataLoader(TensorDataset(ids, labels), batch_size=2)
    model = LastTokenParity().train()
    assert calc_accuracy_loader(loader, model, "cpu") == 3 / 4
    assert calc_accuracy_loader(loader, model, "cpu", num_batches=1) == 1.0
    expected = nn.functional.cross_entropy(model(ids)[:, -1], labels).item()
    assert calc_loss_loader(loader, model, "cpu") == pytest.approx(expected)
    assert model.training  # evaluation switched to eval mode and back
    assert math.isnan(calc_loss_loader(DataLoader(TensorDataset(ids[:0], labels[:0])), model, "cpu"))


def test_training_loop_is_generic_about_model_and_inputs():
    """Float inputs (like cached hidden states) into a non-GPT model: the loop needs only model(inputs)."""
    torch.manual_seed(0)
    features = torch.randn(64, 5, 4)  # [B, T, D]
    labels = (features[:, -1, 0] > 0).long()
    loader = DataLoader(TensorDataset(features, labels), batch_size=8, shuffle=True, drop_last=True)
    model = nn.Linear(4, 2)
    before = calc_accuracy_loader(loader, model, "cpu")
    history = train_classifier(model, loader, loader, torch.optim.SGD(model.parameters(), lr=0.5), "cpu",
                               num_epochs=3, eval_freq=4, eval_iter=2, progress=False)
    train_losses, val_losses, train_accs, val_accs, examples_seen = history  # unpacks like the book's tuple
    assert examples_seen == 3 * 64 and history.global_step == 3 * 8 - 1 and history.epochs_done == 3
    assert len(train_losses) == len(val_losses) == 6  # steps 0, 4, 8, ... 20
    assert len(train_accs) == len(val_accs) == 3
    assert train_losses[-1] < train_losses[0]
    assert calc_accuracy_loader(loader, model, "cpu") > max(before, 0.9)


def test_last_block_training_leaves_frozen_parameters_bitwise_unchanged(data_dir, tokenizer):
    train_loader, _, _ = create_dataloaders(data_dir, tokenizer)
    small = DataLoader(Subset(train_loader.dataset, range(48)), batch_size=8, shuffle=True, drop_last=True)
    model = prepare_for_classification(tiny_model(), "last-block")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in model.named_parameters()
                         if name.startswith(("trf_blocks.1.", "final_norm.", "out_head."))}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    # Like the book, hand every parameter to AdamW (with weight decay): frozen ones must still not move.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    train_classifier(model, small, small, optimizer, "cpu", num_epochs=1, eval_freq=2, eval_iter=1, progress=False)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) == (name not in trainable), name


def test_classify_truncates_long_text_and_refuses_empty_text(tokenizer):
    model = prepare_for_classification(tiny_model(), "full").eval()
    long_text = "win cash now " * 200  # 600 tokens, longer than the context of 128
    first_ids = tokenizer.encode(long_text)[:20]
    assert classify(long_text, model, tokenizer, "cpu", max_length=20) == classify(
        tokenizer.decode(first_ids), model, tokenizer, "cpu", max_length=20)
    assert classify("hello", model, tokenizer, "cpu", max_length=20) in ("spam", "not spam")
    with pytest.raises(ValueError, match="empty message"):
        classify("  ", model, tokenizer, "cpu", max_length=20)
    with pytest.raises(ValueError, match="exceeds the model's context length"):
        classify("hello", model, tokenizer, "cpu", max_length=129)


def test_unknown_method_is_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(ValueError, match="choose one of last-block, full, lora"):
        prepare_for_classification(tiny_model(), "everything")
    assert cli.main(["finetune", "--method", "everything", "--random-init", "--data-dir", str(tmp_path / "d")]) == 1
    assert "unknown fine-tuning method 'everything'" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_load_classifier_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="classifier.json not found.*gptlora finetune"):
        load_classifier(tmp_path)


def test_finetune_and_classify_end_to_end_from_random_init(tokenizer, capsys, tiny_spam_run):
    """A 2-layer, 64-wide GPT from random weights, all parameters trained 3 epochs on the real split
    (the run is the shared ``tiny_spam_run`` fixture of conftest.py)."""
    run, data_dir, printed = tiny_spam_run.run, tiny_spam_run.data_dir, tiny_spam_run.stdout
    assert tiny_spam_run.status == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["accuracy"]["test"] >= 0.90
    assert f"test accuracy: {metrics['accuracy']['test']:.2%}" in printed
    assert len(metrics["history"]["train_accs"]) == 3
    for png in ("loss.png", "accuracy.png"):
        assert (run / png).read_bytes().startswith(b"\x89PNG")
    assert not [name for name in os.listdir(run) if "tmp" in name]

    loaded, info = load_classifier(run)
    _, _, test_loader = create_dataloaders(data_dir, tokenizer)
    assert calc_accuracy_loader(test_loader, loaded, "cpu") == metrics["accuracy"]["test"]
    assert info["max_length"] == 120 and info["method"] == "full"

    text = "85233 FREE>Ringtone!Reply REAL"  # the first test message
    assert cli.main(["classify", "--run", str(run), text, "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == classify(text, loaded, tokenizer, "cpu", 120)
