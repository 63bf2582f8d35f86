"""Tokenizer helpers and generate(): greedy, sampling, top-k, end-of-text, KV cache."""

import pytest
import torch

from gptlora.generation import generate, next_token, text_to_token_ids, token_ids_to_text
from gptlora.model import GPTConfig, GPTModel


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return GPTModel(GPTConfig(vocab_size=50257, context_length=16, emb_dim=32, n_heads=4, n_layers=2)).eval()


def test_tokenizer_round_trip(tokenizer):
    ids = text_to_token_ids("Every effort moves you", tokenizer)
    assert ids.tolist() == [[6109, 3626, 6100, 345]]
    assert token_ids_to_text(ids, tokenizer) == "Every effort moves you"


def test_end_of_text_is_allowed(tokenizer):
    assert text_to_token_ids("Hi<|endoftext|>", tokenizer).tolist() == [[17250, 50256]]


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0], [2.0, 0.0, 1.0]])
    assert next_token(logits).tolist() == [[1], [0]]


def test_top_k_only_samples_among_the_k_largest():
    logits = torch.tensor([[5.0, 4.0, 3.0, -1.0, -2.0]]).repeat(500, 1)
    torch.manual_seed(0)
    drawn = next_token(logits, temperature=5.0, top_k=2).flatten()
    assert set(drawn.tolist()) == {0, 1}


def test_bad_sampling_arguments():
    with pytest.raises(ValueError, match="temperature"):
        next_token(torch.zeros(1, 3), temperature=-1)
    with pytest.raises(ValueError, match="top_k"):
        next_token(torch.zeros(1, 3), top_k=0)


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=1.3, top_k=50), dict(temperature=0.7)])
def test_kv_cache_gives_the_same_tokens(tiny_model, sampling):
    prompt = torch.randint(0, 50257, (2, 5), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(42)
    with_cache = generate(tiny_model, prompt, 30, use_cache=True, **sampling)
    torch.manual_seed(42)
    without_cache = generate(tiny_model, prompt, 30, use_cache=False, **sampling)
    assert with_cache.shape == (2, 35)  # 35 > context 16: the window slid many times
    assert with_cache.tolist() == without_cache.tolist()


def test_kv_cache_with_a_smaller_context_size(tiny_model):
    prompt = torch.tensor([[1, 2, 3]])
    a = generate(tiny_model, prompt, 20, context_size=6, use_cache=True)
    b = generate(tiny_model, prompt, 20, context_size=6, use_cache=False)
    assert a.tolist() == b.tolist()


def test_cached_logits_equal_full_forward(tiny_model):
    ids = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = tiny_model(ids)
        cache = tiny_model.new_cache(batch_size=2)
        parts = [tiny_model(ids[:, :7], cache=cache), tiny_model(ids[:, 7:9], cache=cache)]
        parts += [tiny_model(ids[:, i:i + 1], cache=cache) for i in range(9, 12)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(ids, last_only=True), full[:, -1:], atol=1e-6, rtol=0)


def test_empty_prompt_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match=r"at least one token, found shape \[1, 0\].*50256"):
        generate(tiny_model, torch.zeros(1, 0, dtype=torch.long), 3)


def test_stops_at_end_of_text(tiny_model):
    prompt = torch.tensor([[10, 20, 30]])
    free = generate(tiny_model, prompt, 10)
    eos = free[0, 5].item()  # pretend the third generated token ends the text
    stopped = generate(tiny_model, prompt, 10, eos_id=eos)
    first = free[0, 3:].tolist().index(eos)
    assert stopped.tolist() == [free[0, : 3 + first].tolist()]


def test_sampling_is_reproducible_under_a_seed(tiny_model):
    prompt = torch.tensor([[1, 2, 3]])
    torch.manual_seed(7)
    a = generate(tiny_model, prompt, 15, temperature=1.0)
    torch.manual_seed(7)
    b = generate(tiny_model, prompt, 15, temperature=1.0)
    assert a.tolist() == b.tolist()


def test_a_tiny_temperature_samples_like_greedy_instead_of_failing():
    # 3 / 1e-39 overflows float32: softmax would see inf - inf = nan, and torch.multinomial would refuse it.
    torch.manual_seed(0)
    logits = torch.tensor([[1.0, 3.0, 2.0, float("-inf")], [3.0, 3.0, -1.0, 0.0]])
    for _ in range(20):
        first, second = next_token(logits, temperature=1e-39).flatten().tolist()
        assert first == 1 and second in (0, 1)  # the largest logit (either of two equal ones)
    assert next_token(logits, temperature=1e-39, top_k=1).flatten().tolist()[0] == 1


def test_a_tokenizer_that_cannot_be_fetched_is_one_line_saying_what_to_set(monkeypatch, capsys):
    """Offline without TIKTOKEN_CACHE_DIR, tiktoken fails to download its files: the command says what to set
    (it used to report an 'unexpected RuntimeError' and ask for a bug report)."""
    import tiktoken

    from gptlora.cli import app

    def offline(name):
        raise ConnectionError(f"could not reach the server for {name}")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    assert app.main(["generate", "--model", "gpt2-small", "--random-init", "--max-new-tokens", "1"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: could not load tiktoken's 'gpt2' encoding")
    assert "TIKTOKEN_CACHE_DIR" in errors[0] and "unexpected" not in errors[0]
