"""Pretrained GPT-2: loading Hugging Face checkpoints, exporting back, download by name, the CLI.

Every checkpoint here is written by the test itself (a small random transformers
GPT-2), so nothing is downloaded; the real-weights tests at the end run only when
GPTLORA_GPT2_DIR points at the real gpt2-small files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_download import LoopbackServer

from gptlora.infra import download
from gptlora import pretrained
from gptlora.cli.app import main
from gptlora.infra.download import OfflineError
from gptlora.generation import generate_text
from gptlora.formats.hf_layout import config_from_hf, config_to_hf, gptlora_to_hf, hf_shapes
from gptlora.model import GPTConfig, GPTModel, count_parameters
from gptlora.pretrained import BASE_URL_ENV, HUB_MIRRORS, hub_urls, load_pretrained, save_hf

transformers = pytest.importorskip("transformers")

# Full GPT-2 vocabulary (so the CLI can encode real text), everything else tiny.
SHAPE = dict(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=50257)


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**SHAPE)).eval()


@pytest.fixture(scope="module")
def token_ids():
    torch.manual_seed(1)
    return torch.randint(0, SHAPE["vocab_size"], (2, 20))


@pytest.fixture(scope="module")
def pretrained_dir(hf_model, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("save_pretrained")
    hf_model.save_pretrained(directory)
    return directory


def write_checkpoint(directory: Path, hf_model, layout: str = "hub", edit=None) -> Path:
    """Write ``hf_model`` as ``config.json`` + ``model.safetensors`` in one of the layouts found in the wild.

    ``hub``: the Hub's files (no ``transformer.`` prefix, causal-mask buffers, no head);
    ``prefixed``: ``transformer.`` prefix plus an explicit ``lm_head.weight``.
    ``edit`` may change the state dict before it is written.
    """
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.clone().contiguous() for k, v in hf_model.state_dict().items()}
    if layout == "hub":
        state = {k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"}
        n = SHAPE["n_positions"]
        for i in range(SHAPE["n_layer"]):
            state[f"h.{i}.attn.bias"] = torch.ones(n, n, dtype=torch.bool).tril().view(1, 1, n, n)
            state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    if edit is not None:
        edit(state)
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(hf_model.config.to_json_string())
    return directory


def assert_same_logits(ours: GPTModel, reference, ids):
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), reference(ids).logits, atol=1e-4, rtol=0)


def test_save_pretrained_checkpoint_loads_tied_in_eval_mode(pretrained_dir, hf_model, token_ids):
    model = load_pretrained(pretrained_dir)
    assert not model.training
    assert model.out_head.weight is model.tok_emb.weight  # tied by identity, not a copy
    assert count_parameters(model) == sum(p.numel() for p in hf_model.parameters())
    assert all(p.requires_grad and p.device.type == "cpu" for p in model.parameters())
    assert_same_logits(model, hf_model, token_ids)


@pytest.mark.parametrize("layout", ["hub", "prefixed"])
def test_hub_and_prefixed_layouts_load_with_equal_logits(layout, hf_model, token_ids, tmp_path):
    model = load_pretrained(write_checkpoint(tmp_path, hf_model, layout))
    assert model.out_head.weight is model.tok_emb.weight
    assert_same_logits(model, hf_model, token_ids)
    model.trf_blocks[0].att.W_query.weight.data.add_(1.0)  # parameters are ordinary writable memory
    model.tok_emb.weight.data.mul_(2.0)
    assert load_pretrained(tmp_path).tok_emb.weight.equal(hf_model.transformer.wte.weight)  # file untouched


def test_save_hf_is_read_by_transformers_with_equal_logits(pretrained_dir, hf_model, token_ids, tmp_path):
    out = save_hf(load_pretrained(pretrained_dir), tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert_same_logits(load_pretrained(out), reloaded, token_ids)
    assert_same_logits(load_pretrained(out), hf_model, token_ids)


def test_untied_head_round_trips_through_transformers(token_ids, tmp_path):
    torch.manual_seed(2)
    cfg = GPTConfig(vocab_size=50257, context_length=128, emb_dim=64, n_heads=4, n_layers=2, qkv_bias=True)
    model = GPTModel(cfg).eval()  # the book's untied head
    out = save_hf(model, tmp_path)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        expected = model(token_ids)
        torch.testing.assert_close(reloaded(token_ids).logits, expected, atol=1e-4, rtol=0)
        ours = load_pretrained(out)
        assert ours.out_head.weight is not ours.tok_emb.weight
        torch.testing.assert_close(ours(token_ids), expected, atol=1e-4, rtol=0)


def test_hf_shapes_match_the_export_and_transformers_without_tensor_work(hf_model):
    cfg = config_from_hf(hf_model.config.to_dict())
    with torch.device("meta"):
        skeleton = GPTModel(cfg)  # what load_pretrained asks for the expected shapes
    exported = {name: tuple(tensor.shape) for name, tensor in gptlora_to_hf(GPTModel(cfg)).items()}
    assert list(hf_shapes(skeleton).items()) == list(exported.items())  # same names, same order, same shapes
    assert exported == {name: tuple(tensor.shape) for name, tensor in hf_model.state_dict().items()}


def test_loading_skips_random_init_and_then_restores_it(pretrained_dir, monkeypatch):
    initialisers = {name: getattr(torch.nn.init, name) for name in ("normal_", "uniform_", "kaiming_uniform_")}
    seen_while_building = []

    def failing_build(cfg):
        seen_while_building.append({name: getattr(torch.nn.init, name) for name in initialisers})
        raise RuntimeError("build failed")

    load_pretrained(pretrained_dir)
    monkeypatch.setattr(pretrained, "GPTModel", failing_build)
    with pytest.raises(RuntimeError, match="build failed"):
        load_pretrained(pretrained_dir)
    assert all(seen_while_building[0][name] is not function for name, function in initialisers.items())
    assert {name: getattr(torch.nn.init, name) for name in initialisers} == initialisers  # restored after an error
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 64)
    torch.manual_seed(0)
    assert layer.weight.equal(torch.nn.Linear(64, 64).weight) and layer.weight.std() > 0.05  # seeded, random again


def test_save_hf_refuses_a_classifier_head(tmp_path):
    model = GPTModel(GPTConfig(vocab_size=100, context_length=8, emb_dim=16, n_heads=2, n_layers=1, qkv_bias=True))
    model.out_head = torch.nn.Linear(16, 2)
    with pytest.raises(ValueError, match=r"head is Linear\(16, 100, bias=False\); this model's head is Linear"):
        save_hf(model, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_truncated_or_malformed_file_says_to_download_again(damage, hf_model, tmp_path):
    path = write_checkpoint(tmp_path, hf_model) / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"<html>502 Bad Gateway</html>")
    with pytest.raises(ValueError, match=r"not a readable safetensors file .* truncated or corrupt\. Delete it"):
        load_pretrained(tmp_path)


def test_transposed_weight_is_named_with_both_shapes(hf_model, tmp_path):
    def transpose_fc(state):
        state["h.1.mlp.c_fc.weight"] = state["h.1.mlp.c_fc.weight"].t().contiguous()

    write_checkpoint(tmp_path, hf_model, edit=transpose_fc)
    expected = r"h\.1\.mlp\.c_fc\.weight: expected shape \[64, 256\], found \[256, 64\] \(transposed\?"
    with pytest.raises(ValueError, match=expected):
        load_pretrained(tmp_path)


def test_missing_and_unexpected_tensors_are_listed(hf_model, tmp_path):
    def damage(state):
        del state["h.1.ln_2.bias"]
        state["h.0.adapter.weight"] = torch.zeros(3)

    write_checkpoint(tmp_path, hf_model, edit=damage)
    with pytest.raises(ValueError) as error:
        load_pretrained(tmp_path)
    message = str(error.value)
    assert "missing (1):\n    h.1.ln_2.bias" in message and "unexpected (1):\n    h.0.adapter.weight" in message
    assert "attn.bias" not in message  # the mask buffers are recognised, not reported


def test_config_of_another_shape_lists_what_does_not_fit(hf_model, tmp_path):
    write_checkpoint(tmp_path, hf_model)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
    # The first line is the report (what, how many, the first of them, what to ask); the lists follow.
    with pytest.raises(ValueError, match=r"(?s)n_layers=3.*: 12 missing \(first: h\.2\.ln_1\.weight\); are config\.json "
                                         r"and model\.safetensors from the same GPT-2 checkpoint\?\n  missing \(12\):\n"
                                         r"    h\.2\.ln_1\.weight.*\n    \.\.\. and 2 more$"):
        load_pretrained(tmp_path)


def test_unknown_name_and_missing_files_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="'gpt3' is neither a directory nor a GPT-2 name: .*gpt2-small"):
        load_pretrained("gpt3")
    with pytest.raises(FileNotFoundError, match="config.json not found .*gptlora download gpt2-small"):
        load_pretrained("gpt2-medium", models_dir=tmp_path, download=False)


def test_hub_urls_follow_argument_then_environment_then_mirrors(monkeypatch):
    monkeypatch.delenv(BASE_URL_ENV, raising=False)
    assert hub_urls("124M", "config.json") == [
        f"{base}/openai-community/gpt2/resolve/main/config.json" for base in HUB_MIRRORS]
    monkeypatch.setenv(BASE_URL_ENV, "http://a/, http://b,")
    assert hub_urls("gpt2-xl", "model.safetensors") == [
        "http://a/openai-community/gpt2-xl/resolve/main/model.safetensors",
        "http://b/openai-community/gpt2-xl/resolve/main/model.safetensors"]  # the trailing comma adds no third, empty server
    assert hub_urls("gpt2-large", "config.json", base_url="http://c") == [
        "http://c/openai-community/gpt2-large/resolve/main/config.json"]


@pytest.fixture
def fake_hub(hf_model, tmp_path):
    """A loopback server laid out like the Hub: config.json served directly, the weights via a CDN redirect."""
    source = write_checkpoint(tmp_path / "source", hf_model)
    repo = "/openai-community/gpt2/resolve/main"
    files = {f"{repo}/config.json": (source / "config.json").read_bytes(),
             "/cdn/model.safetensors": (source / "model.safetensors").read_bytes()}
    with LoopbackServer(files) as server:
        server.redirects[f"{repo}/model.safetensors"] = "/cdn/model.safetensors"
        yield server


def test_load_by_name_downloads_once_then_works_offline(fake_hub, hf_model, token_ids, tmp_path, monkeypatch):
    monkeypatch.setenv(BASE_URL_ENV, fake_hub.url)
    monkeypatch.delenv(download.OFFLINE_ENV, raising=False)
    model = load_pretrained("124M", models_dir=tmp_path / "weights")
    assert sorted(p.name for p in (tmp_path / "weights" / "gpt2-small").iterdir()) == [
        "config.json", "model.safetensors"]
    assert_same_logits(model, hf_model, token_ids)
    requests = len(fake_hub.requests)
    monkeypatch.setenv(download.OFFLINE_ENV, "1")
    assert_same_logits(load_pretrained("gpt2-small", models_dir=tmp_path / "weights"), hf_model, token_ids)
    assert len(fake_hub.requests) == requests  # verified files on disk: no network
    with pytest.raises(OfflineError, match=r"(?s)weights/gpt2-medium.*config\.json.*model\.safetensors"):
        load_pretrained("gpt2-medium", models_dir=tmp_path / "weights")


def test_cli_download_then_generate_from_the_directory(fake_hub, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(download.OFFLINE_ENV, raising=False)
    models = str(tmp_path / "models")
    assert main(["download", "gpt2-small", "--models-dir", models, "--base-url", fake_hub.url]) == 0
    directory = capsys.readouterr().out.strip()
    assert directory == str(Path(models) / "gpt2-small")
    assert main(["generate", "--model", directory, "--prompt", "Every effort moves you", "--max-new-tokens", "4"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("Every effort moves you") and len(text.rstrip("\n")) > len("Every effort moves you")
    assert main(["download", "gpt2-small", "--models-dir", models, "--base-url", fake_hub.url + "/nothing"]) == 0
    assert main(["download", "gpt2-large", "--models-dir", models, "--base-url", fake_hub.url]) == 1
    assert "HTTP 404" in capsys.readouterr().err


def test_cli_generate_random_init_needs_no_weights(capsys, tmp_path):
    assert main(["generate", "--model", "gpt2-small", "--random-init", "--models-dir", str(tmp_path),
                 "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith("Every effort moves you")
    assert list(tmp_path.iterdir()) == []


def test_cli_generate_random_init_takes_the_shape_of_a_directory(capsys, tmp_path):
    cfg = GPTConfig(vocab_size=50257, context_length=32, emb_dim=32, n_heads=2, n_layers=1, qkv_bias=True)
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(cfg)))  # config only: no weights needed
    assert main(["generate", "--model", str(tmp_path), "--random-init", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith("Every effort moves you")
    torch.manual_seed(0)
    assert pretrained.pretrained_or_random(tmp_path, random_init=True).cfg.emb_dim == 32
    (tmp_path / "config.json").unlink()
    assert main(["generate", "--model", str(tmp_path), "--random-init"]) == 1
    assert "config.json not found; random weights take their shape" in capsys.readouterr().err


# ---------------------------------------------------------------- the real GPT-2 weights

@pytest.fixture(scope="module")
def gpt2_small(gpt2_small_dir):
    return load_pretrained(gpt2_small_dir, download=False)


@pytest.mark.real_weights
@pytest.mark.parametrize("prompt, max_new_tokens, top_k, expected", [
    ("Every effort moves you", 15, None,
     "Every effort moves you forward.\n\nThe first step is to understand the importance of your work"),
    ("Every effort moves", 30, 1,
     "Every effort moves forward, but it's not enough.\n\n\"I'm not going to sit here and say, "
     "'I'm not going to do this,'"),
], ids=["greedy-15", "top1-30"])
def test_documented_generations_of_gpt2_small(gpt2_small, tokenizer, prompt, max_new_tokens, top_k, expected):
    assert generate_text(gpt2_small, prompt, tokenizer, max_new_tokens, top_k=top_k) == expected
