"""``generate --compile`` (``static_generation``): the fixed-shape step gives eager generation's tokens,
eagerly and compiled (on the CPU torch.compile builds C++ kernels: the compiled test is slow; CUDA graphs:
tests/test_cuda.py)."""

from __future__ import annotations

import json

import pytest
import torch

from gptlora.formats.hf_layout import config_to_hf
from gptlora.generation import generate
from gptlora.infra.speed import compile_unavailable
from gptlora.model import GPTConfig, GPTModel
from gptlora.static_generation import CompiledGenerator

from test_prefix_cache import one_thread  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = GPTConfig(vocab_size=97, context_length=24, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0, qkv_bias=True)


def tiny_model():
    torch.manual_seed(123)
    return GPTModel(TINY).eval()


def test_the_fixed_shape_step_gives_the_eager_greedy_tokens_and_logits():
    model = tiny_model()
    prompt = torch.tensor([[5, 17, 42], [8, 1, 90]])
    eager = generate(model, prompt, 12)
    static = CompiledGenerator(model, 15, batch_size=2, compile=False)
    assert torch.equal(static.generate(prompt, 12), eager)
    # Run again on the same generator: the cache is overwritten position by position, nothing left over.
    assert torch.equal(static.generate(prompt[:, :2], 13), generate(model, prompt[:, :2], 13))


def test_the_generator_refuses_what_does_not_fit():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"must fit the context length 24; ask for fewer tokens"):
        CompiledGenerator(model, 25, compile=False)
    with pytest.raises(ValueError, match="3 prompt tokens and 10 new ones do not fit the 12 positions"):
        CompiledGenerator(model, 12, compile=False).generate(torch.tensor([[1, 2, 3]]), 10)


@pytest.mark.slow
def test_the_compiled_step_gives_the_eager_greedy_tokens():
    reason = compile_unavailable("cpu")
    if reason:
        pytest.skip(f"torch.compile cannot run here: {reason}")
    model = tiny_model()
    prompt = torch.tensor([[5, 17, 42]])
    assert torch.equal(CompiledGenerator(model, 15).generate(prompt, 12), generate(model, prompt, 12))


def test_generate_compile_on_the_command_line_prints_the_eager_text(run_cli, monkeypatch, capsys, tmp_path):
    """Where torch.compile cannot run, one line says so and the same step runs eagerly (compiling gpt2-small's
    step on a CPU takes minutes: the compiled step itself is the slow test above)."""
    import gptlora.infra.speed

    tiny = tmp_path / "tiny"  # a GPT-2 config of 2 small layers: --random-init draws its weights
    tiny.mkdir()
    (tiny / "config.json").write_text(json.dumps(config_to_hf(GPTConfig(**{**TINY.to_dict(), "vocab_size": 50257}))))
    argv = ["generate", "--model", str(tiny), "--random-init", "--max-new-tokens", "5", "--device", "cpu"]
    code, eager = run_cli(argv)
    assert code == 0
    monkeypatch.setattr(gptlora.infra.speed, "compile_unavailable", lambda device: "RuntimeError: no compiler")
    code, compiled = run_cli([*argv, "--compile"])
    assert code == 0 and compiled == eager
    assert ("--compile: torch.compile cannot run here (RuntimeError: no compiler); generating without it"
            in capsys.readouterr().err)
