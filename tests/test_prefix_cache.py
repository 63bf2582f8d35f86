"""Speed options that change how much work is done, not the result: frozen-prefix caching and length bucketing."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from gptlora.cli import app as cli
from gptlora.classifier import prepare_for_classification
from gptlora.infra.distributed import Processes, set_sampler_epoch, shard_loaders
from gptlora.recipes.finetune import finetune_spam
from gptlora.lora import apply_lora
from gptlora.model import GPTConfig, GPTModel
from gptlora.recipes.prefix_cache import cache_frozen_prefix, prefix_hidden_states
from gptlora.spam import LengthBucketBatchSampler, SpamDataset, create_dataloaders, prepare_spam_data

SMALL = GPTConfig(vocab_size=50257, context_length=128, emb_dim=64, n_heads=4, n_layers=3, drop_rate=0.0, qkv_bias=True)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, spam_file):
    return prepare_spam_data(tmp_path_factory.mktemp("spam"), source=spam_file)["train"].parent


@pytest.fixture
def one_thread():
    """One OpenMP thread: the machine's cores are shared, and the numbers do not depend on it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def small_model(cfg=SMALL) -> GPTModel:
    torch.manual_seed(7)
    return GPTModel(cfg)


def run(data_dir, tokenizer, out_dir, **options):
    """The whole recipe from the same small model; returns metrics, the saved weights and the next random draw."""
    metrics = finetune_spam(small_model(), tokenizer, data_dir, out_dir, "last-block", epochs=2, lr=1e-3,
                            eval_freq=40, eval_iter=5, progress=False, **options)
    return metrics, load_file(out_dir / "classifier.safetensors"), torch.rand(3)


@pytest.mark.parametrize("padding", [{}, {"dynamic_padding": True, "bucket_by_length": True}],
                         ids=["book-padding", "dynamic-bucketed"])
def test_cached_prefix_training_equals_plain_training(data_dir, tokenizer, tmp_path, one_thread, padding):
    plain, plain_weights, plain_next = run(data_dir, tokenizer, tmp_path / "plain", **padding)
    cached, cached_weights, cached_next = run(data_dir, tokenizer, tmp_path / "cached", cache_prefix=True, **padding)

    # Same random numbers consumed (shuffles, evaluations over the shuffled train loader): same next draw.
    assert torch.equal(plain_next, cached_next)
    assert cached["accuracy"] == plain["accuracy"]
    for key in ("train_losses", "val_losses", "train_accs", "val_accs"):
        assert len(cached["history"][key]) == len(plain["history"][key]) > 0
        torch.testing.assert_close(torch.tensor(cached["history"][key]), torch.tensor(plain["history"][key]))
    assert cached["history"]["examples_seen"] == plain["history"]["examples_seen"]
    assert cached_weights.keys() == plain_weights.keys()
    # Except the key bias: its gradient is zero in exact arithmetic (adding q.b to every score of a row
    # leaves the softmax unchanged), so what AdamW sees there is rounding noise, which it scales up to
    # lr-sized steps. With dynamic padding the prefix runs at other padded widths than in the plain loop,
    # so that noise differs; every tensor that gets a real gradient agrees to float tolerance.
    compared = [name for name in plain_weights if not name.endswith("att.W_key.bias")]
    assert len(compared) == len(plain_weights) - SMALL.n_layers
    for name in compared:
        torch.testing.assert_close(cached_weights[name], plain_weights[name], msg=lambda m: f"{name}: {m}")
    # The run learned something, so the comparison is not between two untouched models.
    trained = "trf_blocks.2.ff.layers.0.weight"
    assert not torch.equal(plain_weights[trained], small_model().state_dict()[trained])
    assert json.loads((tmp_path / "cached" / "metrics.json").read_text())["cache_prefix"] is True


def test_prefix_with_dropout_trainable_parameters_or_lora_is_refused(data_dir, tokenizer):
    loaders = create_dataloaders(data_dir, tokenizer)

    dropout = prepare_for_classification(small_model(GPTConfig(**{**SMALL.to_dict(), "drop_rate": 0.1})), "last-block")
    with pytest.raises(ValueError, match=r"trf_blocks\.0\.drop_shortcut has dropout p=0.1"):
        cache_frozen_prefix(dropout, loaders)

    full = prepare_for_classification(small_model(), "full")
    with pytest.raises(ValueError, match=r"tok_emb\.weight is trainable"):
        cache_frozen_prefix(full, loaders)

    lora = prepare_for_classification(small_model(), "last-block")
    apply_lora(lora, rank=2, alpha=2, target_modules=r"trf_blocks\.0\.att\.W_query", verbose=False)
    lora.requires_grad_(False)  # even frozen, an adapter in the prefix is refused: it is meant to change
    with pytest.raises(ValueError, match=r"trf_blocks\.0\.att\.W_query holds LoRA adapters"):
        cache_frozen_prefix(lora, loaders)

    with pytest.raises(ValueError, match="prefix_blocks must lie in 1..2"):
        cache_frozen_prefix(prepare_for_classification(small_model(), "last-block"), loaders, prefix_blocks=3)


def test_cli_cache_prefix_refuses_methods_other_than_last_block(data_dir, tmp_path, capsys):
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "config.json").write_text(json.dumps(
        {"vocab_size": 50257, "n_positions": 128, "n_embd": 64, "n_head": 4, "n_layer": 2}))
    code = cli.main(["finetune", "--model", str(tmp_path / "small"), "--random-init", "--method", "full",
                     "--cache-prefix", "--data-dir", str(data_dir), "--out", str(tmp_path / "run")])
    assert code == 1
    assert "cache_prefix works only with method 'last-block'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_an_unknown_method_is_reported_before_the_cache_prefix_rule(data_dir, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="unknown fine-tuning method 'bogus'"):
        finetune_spam(small_model(), tokenizer, data_dir, tmp_path / "run", "bogus", cache_prefix=True)
    assert not (tmp_path / "run").exists()


def test_cached_loaders_of_a_process_share_keep_its_distributed_sampler(small_spam_data_dir, tokenizer):
    """Under torchrun the loaders are cut into shares first, then cached: the cached training loader
    must draw each epoch's order from the same DistributedSampler, which set_sampler_epoch reaches."""
    model = prepare_for_classification(small_model(), "last-block")
    second_of_two = Processes(1, 2, 0, torch.device("cpu"), distributed=True)
    shares = shard_loaders(create_dataloaders(small_spam_data_dir, tokenizer, batch_size=8), second_of_two, seed=5)
    _, cached = cache_frozen_prefix(model, shares)
    assert cached[0].sampler is shares[0].sampler
    assert [len(loader) for loader in cached] == [len(loader) for loader in shares]
    epoch_labels = []
    for epoch in (0, 1):
        set_sampler_epoch(shares[0], epoch)
        set_sampler_epoch(cached[0], epoch)
        for (ids, labels), (states, cached_labels) in zip(shares[0], cached[0], strict=True):
            assert torch.equal(cached_labels, labels)
            torch.testing.assert_close(states, prefix_hidden_states(model, ids, SMALL.n_layers - 1))
        epoch_labels.append(torch.cat([labels for _, labels in cached[0]]).tolist())
    assert epoch_labels[0] != epoch_labels[1]  # a new order in the second epoch


def test_length_buckets_cover_each_message_once_reproducibly_with_little_padding(data_dir, tokenizer):
    lengths = torch.tensor([len(ids) for ids in SpamDataset(data_dir / "train.parquet", tokenizer).encoded_texts])
    sampler = LengthBucketBatchSampler(lengths, batch_size=8, drop_last=True)
    torch.manual_seed(123)
    first, second = list(sampler), list(sampler)
    torch.manual_seed(123)
    assert list(sampler) == first  # the seed reproduces the batches
    assert first != second  # and each epoch draws new ones
    for epoch in (first, second):
        indices = [index for batch in epoch for index in batch]
        assert len(epoch) == len(sampler) == 1045 // 8 and {len(batch) for batch in epoch} == {8}
        assert len(set(indices)) == len(indices) == 1040  # no message twice, 5 dropped as the book drops them
        padded = sum(8 * int(lengths[batch].max()) for batch in epoch)
        assert padded <= 0.30 * len(epoch) * 8 * 120  # of the tokens the book's 120-token rows process

    keep_all = list(LengthBucketBatchSampler(lengths[:20], batch_size=8, drop_last=False, pool_batches=1))
    assert sorted(len(batch) for batch in keep_all) == [4, 8, 8]
    assert sorted(index for batch in keep_all for index in batch) == list(range(20))
    with pytest.raises(ValueError, match="needs dynamic_padding=True"):
        create_dataloaders(data_dir, tokenizer, bucket_by_length=True)
