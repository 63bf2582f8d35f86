"""NF4 and int8 from scratch: the bits against bitsandbytes' CPU implementation, the layers, quantize_base
under LoRA, the merge policy and the bad-input errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gptlora.lora import apply_lora, lora_layers, merge_lora
from gptlora.formats.lora_io import base_fingerprint, describe_base, load_adapter, save_adapter
from gptlora.model import GPTConfig, GPTModel
from gptlora.qlora import dequantize_base, quantize_base, quantized_layers, weight_bytes
from gptlora.quantization import (NF4_LEVELS, Int8Linear, NF4Linear, dequantize_int8, dequantize_nf4,
                                  dynamic_tree_levels, fused_int8_kernel_available, nf4_absmax,
                                  normal_float_levels, pack_4bit, quantize_int8, quantize_nf4, unpack_4bit)

bnb = pytest.importorskip("bitsandbytes.functional")  # test-only reference, like transformers and peft


def weights_to_check() -> dict[str, torch.Tensor]:
    """Random and structured weights: an odd element count, all-zero blocks, exact levels, ties, extremes."""
    generator = torch.Generator().manual_seed(14)
    zeros_in_blocks = torch.randn(48, 128, generator=generator)
    zeros_in_blocks[3] = 0  # two whole blocks of zeros
    levels_times_scale = (NF4_LEVELS.repeat(64) * 0.37).view(32, 32)  # every value exactly on a level
    midpoints = ((NF4_LEVELS[:-1] + NF4_LEVELS[1:]) / 2).repeat(8)  # ties between two levels
    ties = torch.cat([midpoints, torch.ones(8)]).view(8, 16)
    return {
        "random 256x192": torch.randn(256, 192, generator=generator),
        "odd 37x29": torch.randn(37, 29, generator=generator) * 3,  # 1073 elements: a partial last block
        "zero blocks": zeros_in_blocks,
        "odd, zero tail": torch.cat([torch.randn(128, generator=generator), torch.zeros(21)]),
        "on the levels": levels_times_scale,
        "ties": ties,
        "heavy tails": torch.distributions.StudentT(2.0).sample((64, 96)),
        "bfloat16": torch.randn(64, 64, generator=generator).bfloat16(),
    }


def bnb_dequantize(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' dequantization of its NF4 ``packed``/``state``.

    Its CPU kernel (measured in bitsandbytes 0.50.2) scales some blocks by the wrong absmax when the last
    dimension is even but not a multiple of the block size (an [8, 16] weight whose rows have different
    scales decodes differently from bitsandbytes' own pure-PyTorch kernel); for those shapes we compare
    with the latter, which is also what bitsandbytes itself runs for an odd last dimension.
    """
    if state.shape[-1] % state.blocksize == 0:
        return bnb.dequantize_4bit(packed, state)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    absmax = bnb.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
    reference = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)  # skip torch.compile
    return reference(packed.view(-1), absmax, _get_4bit_code("nf4", packed.device),
                                    state.blocksize, state.shape, state.dtype)


@pytest.mark.parametrize("name", list(weights_to_check()))
def test_nf4_equals_bitsandbytes_bit_for_bit(name):
    weight = weights_to_check()[name]
    packed, state = bnb.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    ours = quantize_nf4(weight, blocksize=64)
    assert torch.equal(ours["packed"], packed.view(-1))  # codes, padding and nibble order
    assert torch.equal(ours["absmax"], state.absmax)
    dequantized = dequantize_nf4(ours, weight.shape, 64, weight.dtype)
    expected = bnb_dequantize(packed, state)
    assert dequantized.dtype == expected.dtype and torch.equal(dequantized, expected)


@pytest.mark.parametrize("name", ["random 256x192", "odd 37x29", "zero blocks"])
def test_double_quantization_against_bitsandbytes(name):
    """The scales' mean, their 8-bit blocks' absmax and the dynamic code are bitsandbytes' bit for bit. Its
    CPU kernel finds the 8-bit code with an approximate search (BinSearch's "Direct2") that sometimes
    returns the second-nearest level; ours is the nearest, so a code may differ by one step there, and
    only where ours is strictly nearer. Decoding bitsandbytes' own state gives its weights bit for bit."""
    weight = weights_to_check()[name]
    packed, state = bnb.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = quantize_nf4(weight, blocksize=64, double_quant=True)
    assert torch.equal(ours["packed"], packed.view(-1))
    assert torch.equal(ours["absmax_offset"], state.offset)
    assert torch.equal(ours["absmax_absmax"], state.state2.absmax)
    assert torch.equal(dynamic_tree_levels(), state.state2.code)
    theirs = state.absmax
    differ = ours["absmax_codes"] != theirs
    assert differ.float().mean() < 0.02
    levels = dynamic_tree_levels()
    plain = quantize_nf4(weight, blocksize=64)["absmax"]
    block_scale = ours["absmax_absmax"].repeat_interleave(256)[:plain.numel()]
    target = ((plain - ours["absmax_offset"]) / block_scale)[differ]
    ours_distance = (levels[ours["absmax_codes"][differ].long()] - target).abs()
    their_distance = (levels[theirs[differ].long()] - target).abs()
    assert torch.all(ours_distance < their_distance)
    assert torch.all((ours["absmax_codes"][differ].int() - theirs[differ].int()).abs() == 1)
    their_state = {"packed": packed.view(-1), "absmax_codes": theirs, "absmax_absmax": state.state2.absmax,
                   "absmax_offset": state.offset}
    assert torch.equal(dequantize_nf4(their_state, weight.shape), bnb_dequantize(packed, state))
    # ours decodes to the plain scales within half the dynamic code's largest step (times its block scale)
    bound = float(ours["absmax_absmax"].max() * levels.diff().max() / 2) * (1 + 1e-5)
    assert (nf4_absmax(ours) - plain).abs().max() <= bound


def test_levels_derive_from_the_normal_distribution():
    assert torch.allclose(normal_float_levels(), NF4_LEVELS.double(), atol=2e-7)
    assert NF4_LEVELS[7] == 0 and NF4_LEVELS.min() == -1 and NF4_LEVELS.max() == 1
    assert torch.equal(dynamic_tree_levels(), bnb.create_dynamic_map())


def test_packing_order_and_round_trip():
    codes = torch.tensor([1, 2, 15, 0, 9], dtype=torch.uint8)
    packed = pack_4bit(codes)
    assert packed.tolist() == [0x12, 0xF0, 0x97]  # first code in the high nibble; odd tail padded with 7
    assert torch.equal(unpack_4bit(packed, 5), codes)


def test_int8_per_channel():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 40, generator=generator) * torch.linspace(0.01, 10, 16).unsqueeze(1)
    weight[5] = 0
    codes, scales = quantize_int8(weight)
    assert codes.dtype == torch.int8 and codes.abs().max() == 127 and scales.shape == (16,)
    error = (dequantize_int8(codes, scales) - weight).abs()
    assert torch.all(error <= scales.unsqueeze(1) / 2 + 1e-7)  # at most half a step per row
    assert torch.all(dequantize_int8(codes, scales)[5] == 0)


@pytest.mark.parametrize("make", [lambda lin: NF4Linear.from_linear(lin), lambda lin: NF4Linear.from_linear(lin, 32, True),
                                  lambda lin: Int8Linear.from_linear(lin)], ids=["nf4", "nf4-double", "int8"])
def test_quantized_layer_equals_a_linear_layer_with_the_dequantized_weight(make):
    torch.manual_seed(1)
    linear = nn.Linear(128, 48)
    layer = make(linear)
    plain = layer.to_linear()
    assert torch.equal(plain.weight, layer.dequantized_weight()) and torch.equal(plain.bias, linear.bias)
    x = torch.randn(3, 5, 128, requires_grad=True)
    out = layer(x)
    assert torch.equal(out, plain(x))
    out.square().sum().backward()  # the gradient reaches the input through the recomputed weight
    x_grad, x.grad = x.grad, None
    plain(x).square().sum().backward()
    assert torch.allclose(x_grad, x.grad, atol=1e-6)
    assert not any(p.requires_grad for p in layer.parameters())


@pytest.mark.skipif(not fused_int8_kernel_available(), reason="this PyTorch has no fused int8-weight CPU kernel")
def test_fused_int8_kernel_is_close_to_the_dequantized_product():
    torch.manual_seed(2)
    layer = Int8Linear.from_linear(nn.Linear(256, 64), fused=True)
    x = torch.randn(4, 256)
    with torch.no_grad():
        fused = layer(x)
    exact = layer.to_linear()(x)
    assert fused.dtype == torch.float32 and layer.uses_fused_kernel(x)
    assert (fused - exact).abs().max() < 0.02 * exact.abs().max()  # bfloat16 activations: ~3 digits


@pytest.mark.parametrize("in_features", [8, 24, 40, 72, 100, 32, 768])
def test_fused_int8_at_any_width_matches_the_dequantized_product(in_features):
    """The kernel reads rows 16 values at a time: at other widths it gave garbage (1e30, nan) or crashed, so
    those dequantize instead; widths that are multiples of 16 still run fused."""
    torch.manual_seed(4)
    layer = Int8Linear.from_linear(nn.Linear(in_features, 37), fused=True)
    x = torch.randn(3, 5, in_features)
    with torch.no_grad():
        out = layer(x)
    exact = layer.to_linear()(x)
    assert out.shape == exact.shape and torch.isfinite(out).all()
    assert (out - exact).abs().max() <= 0.02 * exact.abs().max()
    assert layer.uses_fused_kernel(x) == (in_features % 16 == 0 and fused_int8_kernel_available())


@pytest.mark.skipif(not fused_int8_kernel_available(), reason="this PyTorch has no fused int8-weight CPU kernel")
def test_fused_int8_takes_a_bfloat16_view_that_starts_mid_allocation():
    """The kernel's aligned loads crashed on a bfloat16 input starting 2 bytes into its allocation."""
    torch.manual_seed(5)
    layer = Int8Linear.from_linear(nn.Linear(32, 8), fused=True).to(torch.bfloat16)
    x = torch.randn(1, 33).bfloat16()[:, 1:]
    with torch.no_grad():
        out = layer(x)
    exact = x.float() @ layer.dequantized_weight(torch.float32).T + layer.bias.float()
    assert (out.float() - exact).abs().max() <= 0.02 * exact.abs().max()


def tiny_gpt() -> GPTModel:
    torch.manual_seed(3)
    return GPTModel(GPTConfig(vocab_size=97, context_length=16, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0,
                              qkv_bias=True))


def test_quantize_base_then_lora_trains_the_adapters_only(tmp_path):
    model = tiny_gpt()
    ids = torch.randint(0, 97, (2, 8))
    quantize_base(model, "nf4", double_quant=True)
    assert set(quantized_layers(model)) == {n for n, m in tiny_gpt().named_modules()
                                            if isinstance(m, nn.Linear) and n != "out_head"}
    assert isinstance(model.out_head, nn.Linear)  # the head stays in full precision by default
    apply_lora(model, rank=4, alpha=8, verbose=False)
    assert all(isinstance(layer.linear, (NF4Linear, nn.Linear)) for layer in lora_layers(model).values())
    assert all("lora" in name for name, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = base_fingerprint(model)
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
        optimizer.step()
    assert base_fingerprint(model) == before  # the quantized base never moves
    assert any(float(layer.lora["default"].B.detach().abs().max()) > 0 for layer in lora_layers(model).values())

    # the adapter reloads onto the same quantized base, and is refused on the full-precision one
    save_adapter(model, tmp_path / "adapter", verbose=False)
    fresh = quantize_base(tiny_gpt(), "nf4", double_quant=True)
    load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(fresh(ids), model(ids))
    with pytest.raises(ValueError, match="other base weights"):
        load_adapter(tiny_gpt(), tmp_path / "adapter")


def test_merging_into_a_quantized_base_is_refused_and_a_full_precision_copy_merges():
    model = apply_lora(quantize_base(tiny_gpt(), "nf4"), rank=4, alpha=8, verbose=False)
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora["default"].B, std=0.05)
    ids = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        adapted = model(ids)
    with pytest.raises(ValueError, match="dequantize_base"):
        merge_lora(model)
    assert not any(layer.merged for layer in lora_layers(model).values())  # refused before any change
    merged = merge_lora(dequantize_base(copy.deepcopy(model)), unload=True)
    assert not quantized_layers(merged) and not lora_layers(merged)
    with torch.no_grad():
        assert torch.allclose(merged(ids), adapted, atol=1e-5)


@pytest.mark.parametrize("emb_dim", [64, 72])  # 72: not a multiple of the fused kernel's 16
def test_fused_int8_gpt_matches_the_dequantized_one(emb_dim):
    torch.manual_seed(6)
    cfg = GPTConfig(vocab_size=97, context_length=16, emb_dim=emb_dim, n_heads=4, n_layers=2, drop_rate=0.0,
                    qkv_bias=True)
    model = GPTModel(cfg).eval()
    fused = quantize_base(copy.deepcopy(model), "int8", include_head=True, fused_int8=True)
    plain = quantize_base(model, "int8", include_head=True)
    ids = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        expected = plain(ids)
        assert (fused(ids) - expected).abs().max() <= 0.02 * expected.abs().max()


def test_int8_base_and_memory():
    model, reference = tiny_gpt(), tiny_gpt()
    quantize_base(model, "int8", include_head=True)
    assert isinstance(model.out_head, Int8Linear)
    linear_weights = sum(m.weight.numel() for m in reference.modules() if isinstance(m, nn.Linear))
    # each linear weight: 4 bytes -> 1 byte, plus one float32 scale per output row
    rows = sum(m.out_features for m in reference.modules() if isinstance(m, nn.Linear))
    assert weight_bytes(reference) - weight_bytes(model) == 3 * linear_weights - 4 * rows
    ids = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        assert (model(ids) - reference(ids)).abs().max() < 0.05


def as_is(model):
    return model


@pytest.mark.parametrize("setup, call, message", [
    (as_is, lambda m: quantize_base(m, "nf5"), "unknown quantization 'nf5'; choose one of nf4, int8"),
    (as_is, lambda m: quantize_base(m, "nf4", blocksize=48), "blocksize 48 must divide the input width"),
    (as_is, lambda m: quantize_base(m, "nf4", blocksize=1), "blocksize must be an integer of at least 2"),
    (as_is, lambda m: quantize_base(m, "nf4", target_modules=["W_nothing"]),
     r"target_modules \['W_nothing'\] matched nothing"),
    (as_is, lambda m: quantize_base(m, "int8", double_quant=True, blocksize=7),
     r"^blocksize=7 and double_quant=True are options of nf4 quantization, not int8: leave them out"),
    (as_is, lambda m: quantize_base(m, "int8", blocksize=64), r"^blocksize=64 is an option of nf4 quantization"),
    (as_is, lambda m: quantize_base(m, "nf4", fused_int8=True),
     r"^fused_int8=True is an option of int8 quantization, not nf4: leave it out, or quantize with 'int8'"),
    (lambda m: quantize_base(m, "int8"), lambda m: quantize_base(m, "nf4"), "already quantized"),
    (lambda m: apply_lora(m, 2, 2, verbose=False), lambda m: quantize_base(m, "nf4"),
     "quantize the base first, then apply_lora"),
    (lambda m: quantize_base(m, "int8", include_head=True),
     lambda m: apply_lora(m, 2, 2, modules_to_save=["out_head"], verbose=False),
     "modules_to_save 'out_head' holds a quantized layer, which cannot train"),
])
def test_bad_input_is_one_clear_error_and_leaves_the_model_unchanged(setup, call, message):
    model = setup(tiny_gpt())
    before = base_fingerprint(model), [(name, type(m)) for name, m in model.named_modules()]
    with pytest.raises(ValueError, match=message):
        call(model)
    assert (base_fingerprint(model), [(name, type(m)) for name, m in model.named_modules()]) == before


@pytest.mark.parametrize("method, options", [("nf4", {}), ("nf4", {"double_quant": True}), ("int8", {})])
def test_a_cast_keeps_the_codes_and_scales_and_moves_the_layer_dtype(method, options):
    """model.bfloat16() used to round the float32 scales (the weights changed) while the layer still said
    float32, so LoRA added float32 adapters to a bfloat16 model."""
    model = quantize_base(tiny_gpt(), method, **options)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    weights = {name: layer.dequantized_weight() for name, layer in quantized_layers(model).items()}
    model.to(torch.bfloat16)
    assert all(b.dtype == buffers[name].dtype and torch.equal(b, buffers[name]) for name, b in model.named_buffers())
    for name, layer in quantized_layers(model).items():
        assert layer.dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
        assert torch.equal(layer.dequantized_weight(), weights[name].bfloat16())
    layers = quantized_layers(model)
    apply_lora(model, rank=2, alpha=2, verbose=False)  # wraps those same layer objects
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}
    with torch.no_grad():
        assert model(torch.randint(0, 97, (1, 8))).dtype == torch.bfloat16
    model.float()  # and back: the weights are exactly the original ones
    assert all(torch.equal(layer.dequantized_weight(), weights[name]) for name, layer in layers.items())


def test_gptlora_never_imports_bitsandbytes():
    import subprocess
    import sys

    code = ("import sys, gptlora.qlora, gptlora.recipes.finetune, gptlora.cli.app; "
            "assert 'bitsandbytes' not in sys.modules, 'gptlora imported bitsandbytes'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("method, options", [("nf4", {"double_quant": True}), ("int8", {"include_head": True})])
def test_a_quantized_base_is_described_by_the_weights_it_stands_for(method, options):
    """describe_base counted the packed bytes and scales of a quantized layer as its "parameters"."""
    model = apply_lora(quantize_base(tiny_gpt(), method, **options), rank=2, alpha=2, verbose=False)
    assert describe_base(model)["parameters"] == describe_base(tiny_gpt())["parameters"]
