"""GPTModel: documented parameter counts, the book's untrained output, and parity with transformers."""

import pytest
import torch

from gptlora.generation import generate, text_to_token_ids
from gptlora.formats.hf_layout import config_from_hf, hf_to_gptlora
from gptlora.model import GPTConfig, GPTModel, MultiHeadAttention, count_parameters


def test_presets_and_aliases():
    assert GPTConfig.from_preset("124M") == GPTConfig.from_preset("gpt2-small")
    xl = GPTConfig.from_preset("1558M", drop_rate=0.0)
    assert (xl.emb_dim, xl.n_layers, xl.n_heads, xl.drop_rate) == (1600, 48, 25, 0.0)
    assert GPTConfig.from_preset("gpt2-medium").emb_dim == 1024
    assert GPTConfig.from_preset("gpt2-large").n_layers == 36


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="gpt2-small.*gpt2-xl.*1558M"):
        GPTConfig.from_preset("gpt3")


def test_book_parameter_counts():
    """Book ch. 4: 163,009,536 parameters; 124,412,160 without the output head."""
    model = GPTModel(GPTConfig.from_preset("gpt2-small", qkv_bias=False))
    total = count_parameters(model)
    assert total == 163_009_536
    assert total - model.out_head.weight.numel() == 124_412_160


def test_classifier_parameter_count():
    """Book ch. 6: qkv_bias=True and a Linear(768, 2) head -> 124,441,346 parameters."""
    model = GPTModel(GPTConfig.from_preset("gpt2-small", qkv_bias=True))
    model.out_head = torch.nn.Linear(768, 2)
    assert count_parameters(model) == 124_441_346


def test_tied_head_is_the_embedding_tensor():
    model = GPTModel(GPTConfig.from_preset("gpt2-small", qkv_bias=True))
    model.tie_weights()
    assert model.out_head.weight is model.tok_emb.weight
    assert count_parameters(model) == 124_439_808


def test_untrained_generation_matches_the_book(tokenizer):
    """Book ch. 4: seed 123, untrained gpt2-small, greedy, 'Hello, I am' + 6 tokens."""
    torch.manual_seed(123)
    model = GPTModel(GPTConfig.from_preset("gpt2-small", drop_rate=0.1, qkv_bias=False)).eval()
    ids = text_to_token_ids("Hello, I am", tokenizer)
    assert ids.tolist() == [[15496, 11, 314, 716]]
    out = generate(model, ids, max_new_tokens=6)
    assert out.tolist() == [[15496, 11, 314, 716, 27018, 24086, 47843, 30961, 42348, 7267]]


def test_fused_attention_equals_readable_formulation():
    torch.manual_seed(0)
    att = MultiHeadAttention(d_in=32, d_out=32, context_length=16, dropout=0.0, num_heads=4, qkv_bias=True).eval()
    x = torch.randn(2, 16, 32)
    torch.testing.assert_close(att(x), att.attention_reference(x), atol=1e-6, rtol=0)


def test_output_shape_and_causality():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=2)).eval()
    ids = torch.randint(0, 50, (3, 8))
    logits = model(ids)
    assert logits.shape == (3, 8, 50)
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 50  # a later token must not change earlier logits
    torch.testing.assert_close(model(changed)[:, :-1], logits[:, :-1], atol=0, rtol=0)


def test_clear_errors_for_bad_input():
    model = GPTModel(GPTConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=1))
    with pytest.raises(ValueError, match="longer than the context length 8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"must lie in \[0, 49\], found ids from 0 to 50"):
        model(torch.tensor([[0, 50]]))
    with pytest.raises(ValueError, match=r"\[batch, tokens\]"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible by n_heads"):
        GPTConfig(emb_dim=10, n_heads=3)


# Small configs plus the full 124M shape; parity with the reference implementation.
HF_SHAPES = [
    dict(n_embd=32, n_layer=1, n_head=2, n_positions=16, vocab_size=97),
    dict(n_embd=64, n_layer=3, n_head=4, n_positions=64, vocab_size=300),
    dict(n_embd=48, n_layer=2, n_head=3, n_positions=32, vocab_size=1000),
    dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257),
]


def copy_from_transformers(hf_model) -> GPTModel:
    """Our model holding the weights of a transformers GPT2LMHeadModel."""
    hf_state = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items()}
    cfg = config_from_hf(hf_model.config.to_dict())
    model = GPTModel(cfg)
    model.tie_weights()
    missing, unexpected = model.load_state_dict(hf_to_gptlora(hf_state, cfg), strict=False)
    assert missing == ["out_head.weight"] and unexpected == []  # the head is the tied embedding
    return model.eval()


@pytest.mark.parametrize("shape", HF_SHAPES, ids=lambda s: f"d{s['n_embd']}-l{s['n_layer']}")
def test_logits_and_greedy_tokens_match_transformers(shape):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**shape, bos_token_id=0, eos_token_id=0)).eval()
    ours = copy_from_transformers(hf)
    ids = torch.randint(0, shape["vocab_size"], (2, min(40, shape["n_positions"])))
    with torch.no_grad():
        expected = hf(ids).logits
        torch.testing.assert_close(ours(ids), expected, atol=1e-4, rtol=0)
    prompt = ids[:1, :5]
    expected_tokens = hf.generate(prompt, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(prompt),
                                  pad_token_id=0, eos_token_id=None)
    assert generate(ours, prompt, max_new_tokens=8).tolist() == expected_tokens.tolist()
