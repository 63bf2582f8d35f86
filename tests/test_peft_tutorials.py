"""Two LoRA tutorials' numbers: peft's MLP (checked against peft itself) and LoRA on handwritten digits."""

import pytest
import torch

from gptlora.lora import apply_lora, lora_disabled, lora_layers, merge_lora
from gptlora.formats.lora_io import save_adapter
from gptlora.model import count_parameters
from gptlora.peft_tutorials import (DigitsMLP, TutorialMLP, digits_data, sine_data, train_mlp, wrong_per_class)


def test_the_tutorial_data_has_its_class_counts():
    x, y = sine_data()
    assert x.shape == (1000, 20)
    assert dict(zip(*[t.tolist() for t in y.unique(return_counts=True)])) == {0: 663, 1: 337}
    torch.manual_seed(0)
    assert torch.equal(torch.rand((1000, 20)), x)  # the tutorial's own draw...
    torch.manual_seed(5)
    state = torch.get_rng_state()
    sine_data()
    assert torch.equal(torch.get_rng_state(), state)  # ...without touching the global generator


def copy_adapters_into_peft(ours, theirs):
    """Give peft's LoRA the same numbers as ours (peft: lora_A [r, in] = A^T, lora_B [out, r] = B^T)."""
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            peft_layer = theirs.get_submodule(f"base_model.model.{name}")
            peft_layer.lora_A["default"].weight.copy_(layer.lora["default"].A.T)
            peft_layer.lora_B["default"].weight.copy_(layer.lora["default"].B.T)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("save_last, trainable, total", [(False, 12_660, 455_262), (True, 13_062, 455_664)])
def test_peft_tutorial_counts_outputs_and_merge_match_peft(tmp_path, save_last, trainable, total):
    peft = pytest.importorskip("peft")
    x, y = sine_data()
    torch.manual_seed(0)
    base = TutorialMLP()
    assert count_parameters(base) == 442_602
    reference = TutorialMLP()
    reference.load_state_dict(base.state_dict())
    saves = ["seq.4"] if save_last else None
    model = apply_lora(base, rank=3, alpha=8, target_modules=["seq.0", "seq.2"], modules_to_save=saves, verbose=False)
    theirs = peft.get_peft_model(reference, peft.LoraConfig(r=3, lora_alpha=8, target_modules=["seq.0", "seq.2"],
                                                            modules_to_save=saves))
    assert (count_parameters(model, trainable_only=True), count_parameters(model)) == (trainable, total)
    assert theirs.get_nb_trainable_parameters() == (trainable, total)
    if not save_last:
        assert f"{100 * trainable / total:.4f}" == "2.7808"
    for name, layer in lora_layers(model).items():  # B starts at zero, so the update is exactly zero...
        assert torch.count_nonzero(layer.lora["default"].A @ layer.lora["default"].B) == 0
        peft_layer = theirs.get_submodule(f"base_model.model.{name}")  # ...as peft's lora_B @ lora_A
        assert torch.count_nonzero(peft_layer.lora_B["default"].weight @ peft_layer.lora_A["default"].weight) == 0
        assert torch.count_nonzero(peft_layer.lora_A["default"].weight) > 0  # (A is random, in both)

    train_mlp(model, x[:800], y[:800], epochs=1, lr=2e-3, log_probs=True, max_steps=5)
    copy_adapters_into_peft(model, theirs)
    if save_last:
        with torch.no_grad():
            theirs.get_submodule("base_model.model.seq.4").modules_to_save["default"].load_state_dict(
                model.seq[4].copies["default"].state_dict())
    model.eval(), theirs.eval()
    with torch.no_grad():
        unmerged = model(x)
        torch.testing.assert_close(theirs(x), unmerged, atol=1e-6, rtol=0)
        merged = merge_lora(model, unload=True)
        unloaded = theirs.merge_and_unload()
        torch.testing.assert_close(merged(x), unmerged, atol=1e-5, rtol=0)
        torch.testing.assert_close(unloaded(x), unmerged, atol=1e-5, rtol=0)
    assert count_parameters(merged) == count_parameters(unloaded) == 442_602
    # As peft: the merged layers come out frozen; a module trained in full (seq.4) stays trainable.
    assert count_parameters(merged, trainable_only=True) == count_parameters(unloaded, trainable_only=True) == \
        (402 if save_last else 0)


def test_the_tutorial_adapter_file_holds_its_numbers_alone(tmp_path):
    torch.manual_seed(0)
    model = apply_lora(TutorialMLP(), rank=3, alpha=8, target_modules=["seq.0", "seq.2"], verbose=False)
    info = save_adapter(model, tmp_path / "adapter", verbose=False)
    weights = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert info["parameters"] == 12_660
    assert 12_660 * 4 <= weights < 12_660 * 4 + 1_000  # float32 numbers and a small header: about 51 kB


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_peft_saves_the_tutorial_adapter_as_the_same_numbers(tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    torch.manual_seed(0)
    theirs = peft.get_peft_model(TutorialMLP(), peft.LoraConfig(r=3, lora_alpha=8, target_modules=["seq.0", "seq.2"]))
    theirs.save_pretrained(str(tmp_path / "peft"))
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert sum(t.numel() for t in tensors.values()) == 12_660
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    weights = (tmp_path / "peft" / "adapter_model.safetensors").stat().st_size
    assert 12_660 * 4 <= weights < 12_660 * 4 + 1_000  # as ours: about 51 kB


def test_mnist_shapes_count_on_the_meta_device():
    with torch.device("meta"):
        model = DigitsMLP(in_features=784)
        assert count_parameters(model) == 2_807_010
        apply_lora(model, rank=1, alpha=1, verbose=False)
    assert count_parameters(model, trainable_only=True) == 6_794


@pytest.mark.slow
def test_digits_lora_fixes_the_worst_digit_keeps_the_others_and_leaves_the_base_bitwise_alone():
    pytest.importorskip("sklearn")
    x_train, y_train, x_test, y_test = digits_data()
    assert len(x_train) + len(x_test) == 1_797 and x_train.shape[1] == 64
    torch.manual_seed(0)
    net = DigitsMLP()
    train_mlp(net, x_train, y_train, epochs=1)
    before = wrong_per_class(net, x_test, y_test)
    worst = max(range(10), key=lambda digit: before[digit])
    assert before[worst] > 0
    weights = {name: tensor.clone() for name, tensor in net.state_dict().items()}
    apply_lora(net, rank=1, alpha=1, verbose=False)
    assert count_parameters(net, trainable_only=True) == (64 + 1000) + (1000 + 2000) + (2000 + 10)
    only_worst = y_train == worst
    train_mlp(net, x_train[only_worst], y_train[only_worst], epochs=100, max_steps=30, lr=2e-4)  # as notebook 09
    after = wrong_per_class(net, x_test, y_test)
    print("wrong per digit before", before, "after", after)
    assert after[worst] <= before[worst] // 2  # the worst digit is fixed in good part...
    others_before, others_after = sum(before) - before[worst], sum(after) - after[worst]
    assert others_after <= others_before + 5  # ...without the adapter answering that digit for everything
    with lora_disabled(net):
        assert wrong_per_class(net, x_test, y_test) == before  # adapter off: the pretrained network
    for name, layer in lora_layers(net).items():
        assert torch.equal(layer.linear.weight, weights[f"{name}.weight"])
        assert torch.equal(layer.linear.bias, weights[f"{name}.bias"])
