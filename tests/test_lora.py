"""LoRA layers, injection, freezing, merging, disabling, and the helpers for understanding LoRA."""

import math

import pytest
import torch
from torch import nn

from gptlora.lora import (LinearWithLoRA, LoRALayer, ModuleToSave, amplification_factor, apply_lora,
                          disable_lora, enable_lora, linear_layer_names, lora_disabled, lora_layers,
                          low_rank_approximation, merge_lora, trainable_summary, unload_lora, unmerge_lora)
from gptlora.model import GPTConfig, GPTModel, count_parameters

TINY = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0, qkv_bias=True)


class MLP(nn.Module):
    """The small model of common LoRA tutorials: two linear layers in a Sequential."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x):
        return self.seq(x)


def tiny_gpt(seed=0, tied=True) -> GPTModel:
    torch.manual_seed(seed)
    model = GPTModel(TINY)
    if tied:
        model.tie_weights()
    return model.eval()


def randomize_adapters(model, seed=1, std=0.2):
    """Give every adapter a non-zero B (and new A), as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for lora in layer.lora.values():
                lora.A.copy_(torch.randn(lora.A.shape, generator=gen) * std)
                lora.B.copy_(torch.randn(lora.B.shape, generator=gen) * std)


def ids(batch=2, tokens=7, seed=5):
    return torch.randint(0, TINY.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the layer

@pytest.mark.parametrize("rule, expected", [("alpha/rank", 2.0), ("alpha", 8.0), ("alpha/sqrt(rank)", 4.0)])
def test_scaling_rules(rule, expected):
    lora = LoRALayer(6, 5, rank=4, alpha=8, scaling=rule)
    assert lora.scaling == expected
    with torch.no_grad():
        lora.B.normal_()
    x = torch.randn(3, 6)
    torch.testing.assert_close(lora(x), expected * x @ lora.A @ lora.B)
    torch.testing.assert_close(lora.delta_weight(), expected * (lora.A @ lora.B).T)


def test_layer_shapes_initialisation_and_bad_input():
    lora = LoRALayer(10, 3, rank=4, alpha=4)
    assert lora.A.shape == (10, 4) and lora.B.shape == (4, 3)
    assert torch.count_nonzero(lora.B) == 0 and torch.count_nonzero(lora.A) == 40
    # Kaiming-uniform with a=sqrt(5) on a [in, rank] tensor: bound 1/sqrt(fan_in), fan_in = rank.
    assert lora.A.abs().max() <= 1 / math.sqrt(4)
    with pytest.raises(ValueError, match="alpha/rank, alpha, alpha/sqrt"):
        LoRALayer(10, 3, rank=4, alpha=4, scaling="alpha*rank")
    with pytest.raises(ValueError, match="positive integer"):
        LoRALayer(10, 3, rank=0, alpha=4)


@pytest.mark.parametrize("options, message", [
    (dict(rank=0), "rank must be a positive integer.*found 0"),
    (dict(rank=-2), "rank must be a positive integer.*found -2"),
    (dict(dropout=1.0), r"dropout must be a probability in \[0, 1\).*found 1.0"),
    (dict(alpha=float("nan")), "alpha must be a finite number"),
    (dict(rank_pattern={"seq.2": 0}), "rank must be a positive integer.*found 0"),
])
def test_bad_settings_fail_before_the_model_changes(options, message):
    model = MLP()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        apply_lora(model, **{"rank": 2, "alpha": 2, **options}, verbose=False)
    assert not lora_layers(model) and type(model.seq[0]) is nn.Linear and type(model.seq[2]) is nn.Linear
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    assert list(before) == list(model.state_dict()) and all(p.requires_grad for p in model.parameters())


def test_linear_with_lora_as_in_the_book():
    linear = nn.Linear(6, 5)
    wrapped = LinearWithLoRA(linear, rank=2, alpha=4)
    with torch.no_grad():
        wrapped.lora["default"].B.normal_()
    x = torch.randn(4, 6)
    torch.testing.assert_close(wrapped(x), linear(x) + 2.0 * x @ wrapped.lora["default"].A @ wrapped.lora["default"].B)
    assert set(wrapped.state_dict()) == {"linear.weight", "linear.bias", "lora.default.A", "lora.default.B"}
    assert (wrapped.in_features, wrapped.out_features) == (6, 5)


# ----------------------------------------------------------------------------- injection

def test_mlp_targets_by_list_suffix_regex_and_none():
    for targets in (["seq.0", "seq.2"], ["0", "2"], None, r"seq\.\d"):
        model = apply_lora(MLP(), rank=2, alpha=2, target_modules=targets, verbose=False)
        assert set(lora_layers(model)) == {"seq.0", "seq.2"}, targets
        assert isinstance(model.seq[0].linear, nn.Linear)
    only_last = apply_lora(MLP(), rank=2, alpha=2, target_modules=r"seq\.2", verbose=False)
    assert set(lora_layers(only_last)) == {"seq.2"} and type(only_last.seq[0]) is nn.Linear
    excluded = apply_lora(MLP(), rank=2, alpha=2, exclude_modules=["seq.0"], verbose=False)
    assert set(lora_layers(excluded)) == {"seq.2"}


def test_unknown_target_lists_the_linear_layers():
    # No numbered blocks here: the names are the layers, and nothing speaks of "every block".
    with pytest.raises(ValueError, match=r"\['seq.1'\] matched nothing; the 2 candidates are seq.0, seq.2: give one "
                                         r"of these names$"):
        apply_lora(MLP(), rank=2, alpha=2, target_modules=["seq.0", "seq.1"], verbose=False)
    with pytest.raises(ValueError, match="candidates are seq.0, seq.2: give one of these names$"):
        apply_lora(MLP(), rank=2, alpha=2, target_modules="attn.*", verbose=False)


def test_unknown_target_in_a_gpt_names_the_kinds_of_layer_not_every_layer():
    model = GPTModel(GPTConfig(vocab_size=50, context_length=8, emb_dim=8, n_heads=2, n_layers=12, qkv_bias=True))
    with pytest.raises(ValueError) as error:
        apply_lora(model, rank=2, alpha=2, target_modules=["W_q"], verbose=False)
    message = str(error.value)
    assert ("the 73 candidates end in att.W_query, att.W_key, att.W_value, att.out_proj, ff.layers.0, ff.layers.2, "
            "out_head:") in message
    assert "'trf_blocks.0.att.W_query' for one block" in message and "trf_blocks.11" not in message
    assert "in every block (e.g. 'W_query')" in message


def test_reapplying_is_an_error_never_a_double_wrap():
    model = apply_lora(MLP(), rank=2, alpha=2, verbose=False)
    with pytest.raises(ValueError, match="already has a LoRA adapter named 'default'"):
        apply_lora(model, rank=2, alpha=2, verbose=False)
    assert type(model.seq[0].linear) is nn.Linear and list(model.seq[0].lora) == ["default"]
    # A second adapter under another name joins the same wrapper: still no nesting.
    apply_lora(model, rank=3, alpha=3, adapter_name="second", verbose=False)
    assert type(model.seq[0].linear) is nn.Linear and list(model.seq[0].lora) == ["default", "second"]
    assert linear_layer_names(model) == ["seq.0", "seq.2"]


def test_freezing_rank_pattern_and_summary(capsys):
    model = apply_lora(MLP(), rank=2, alpha=2, rank_pattern={"seq.2": 1})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"seq.0.lora.default.A", "seq.0.lora.default.B", "seq.2.lora.default.A", "seq.2.lora.default.B"}
    expected_trainable = 2 * (8 + 16) + 1 * (16 + 4)
    total = (8 * 16 + 16) + (16 * 4 + 4) + expected_trainable
    summary = f"trainable params: {expected_trainable} || all params: {total} || trainable%: " \
              f"{100 * expected_trainable / total:.4f}"
    assert trainable_summary(model) == summary
    assert capsys.readouterr().out.strip() == summary


def test_documented_gpt2_small_classifier_count():
    """gpt2-small, qkv_bias=True, head Linear(768, 2); rank 16, alpha 16 on every linear layer.

    Built on the meta device: counting needs shapes only, so no 124M-parameter allocation.
    """
    with torch.device("meta"):
        model = GPTModel(GPTConfig.from_preset("gpt2-small", qkv_bias=True))
        model.tie_weights()
        model.out_head = nn.Linear(768, 2)
    assert count_parameters(model, trainable_only=True) == 124_441_346
    apply_lora(model, rank=16, alpha=16, verbose=False)
    assert len(lora_layers(model)) == 12 * 6 + 1
    assert count_parameters(model, trainable_only=True) == 2_666_528
    assert model.out_head.lora["default"].A.device.type == "meta"  # adapters follow the layer's device


def test_modules_to_save_train_in_full_and_are_never_targets():
    model = tiny_gpt(tied=False)
    model.out_head = nn.Linear(TINY.emb_dim, 2)
    apply_lora(model, rank=2, alpha=2, modules_to_save=["out_head"], verbose=False)
    assert isinstance(model.out_head, ModuleToSave) and "out_head" not in lora_layers(model)
    assert all(p.requires_grad for p in model.out_head.copies["default"].parameters())
    assert not any(p.requires_grad for p in model.out_head.original.parameters())
    with torch.no_grad():
        model.out_head.copies["default"].weight.add_(1.0)
    x = ids()
    with lora_disabled(model):
        base_head_logits = model(x)
    assert not torch.equal(base_head_logits, model(x))


# ----------------------------------------------------------------------------- training

def test_starts_at_the_base_model_then_b_then_a_learn():
    model = tiny_gpt()
    x, y = ids(), ids(seed=6)
    base_logits = model(x)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, rank=4, alpha=8, verbose=False)
    assert torch.equal(model(x), base_logits)  # B = 0: exactly the base model

    lora = model.trf_blocks[0].att.W_query.lora["default"]
    b_before = lora.B.detach().clone()
    # AdamW with weight decay over *all* parameters, as a careless recipe would: frozen ones must not move.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)

    def step():
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        optimizer.step()

    model.train()
    step()
    assert not torch.equal(lora.B, b_before)
    step()
    assert lora.A.grad is not None and lora.A.grad.abs().sum() > 0
    step()
    unwrapped = unload_lora(model).state_dict()
    assert unwrapped.keys() == base_state.keys()
    for name, tensor in base_state.items():
        assert torch.equal(unwrapped[name], tensor), name


# ----------------------------------------------------------------------------- merge, unmerge, disable

def test_merge_unmerge_and_plain_model():
    model = tiny_gpt(tied=False)
    x = ids()
    base_logits = model(x)
    base_params = count_parameters(model)
    apply_lora(model, rank=4, alpha=8, verbose=False)
    randomize_adapters(model)
    weights = {n: layer.linear.weight for n, layer in lora_layers(model).items()}
    adapted = model(x)
    assert not torch.allclose(adapted, base_logits, atol=1e-2)

    merge_lora(model)
    torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=0)
    unmerge_lora(model)
    for name, layer in lora_layers(model).items():
        assert layer.linear.weight is weights[name]  # the very same tensor: restored bit for bit
    assert torch.equal(model(x), adapted)

    plain = merge_lora(model, unload=True)
    assert not any(isinstance(m, (LinearWithLoRA, LoRALayer)) for m in plain.modules())
    assert count_parameters(plain) == base_params
    torch.testing.assert_close(plain(x), adapted, atol=1e-5, rtol=0)


def test_merging_a_tied_head_leaves_the_embedding_alone():
    model = tiny_gpt(tied=True)
    embedding = model.tok_emb.weight.detach().clone()
    apply_lora(model, rank=4, alpha=8, target_modules=["out_head"], verbose=False)
    randomize_adapters(model)
    merge_lora(model)
    assert torch.equal(model.tok_emb.weight, embedding)
    assert not torch.equal(model.out_head.linear.weight, embedding)
    unmerge_lora(model)
    assert model.out_head.linear.weight is model.tok_emb.weight  # the tie is back


def test_disabled_lora_gives_the_base_logits_exactly():
    model = tiny_gpt()
    x = ids()
    base_logits = model(x)
    apply_lora(model, rank=4, alpha=8, verbose=False)
    randomize_adapters(model)
    adapted = model(x)
    with lora_disabled(model):
        assert torch.equal(model(x), base_logits)
    assert torch.equal(model(x), adapted)
    disable_lora(model)
    assert torch.equal(model(x), base_logits)
    with pytest.raises(RuntimeError, match="unmerge_lora first"):
        enable_lora(model), merge_lora(model), disable_lora(model)
    unmerge_lora(model)
    assert torch.equal(model(x), adapted)


# ----------------------------------------------------------------------------- understanding LoRA

def test_amplification_factor_on_a_worked_example():
    w = torch.eye(4) + 0.5 * torch.outer(torch.eye(4)[0], torch.eye(4)[1])  # w[0, 1] = 0.5
    delta = 3.0 * torch.outer(torch.eye(4)[0], torch.eye(4)[1])  # rank 1: direction e0 e1^T
    # ||delta||_F = 3; w seen through delta's singular vectors is e0^T w e1 = 0.5.
    assert amplification_factor(delta, w) == pytest.approx(6.0)
    assert amplification_factor(w, w, rank=4) == pytest.approx(1.0)  # an update along w itself: no amplification
    with pytest.raises(ValueError, match="one shape"):
        amplification_factor(delta, torch.eye(3))


def test_low_rank_approximation_is_the_truncated_svd():
    matrix = torch.randn(12, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    singular = torch.linalg.svdvals(matrix)
    left, right = low_rank_approximation(matrix, 3)
    assert left.shape == (12, 3) and right.shape == (3, 9)
    error = torch.linalg.norm(matrix - left @ right)
    torch.testing.assert_close(error, singular[3:].square().sum().sqrt())
    full_left, full_right = low_rank_approximation(matrix, 9)
    torch.testing.assert_close(full_left @ full_right, matrix)
    with pytest.raises(ValueError, match=r"rank must lie in \[1, 9\]"):
        low_rank_approximation(matrix, 10)
