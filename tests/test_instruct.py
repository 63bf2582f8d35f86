"""`gptlora instruct` and `generate --instruction` on tiny models and a slice of the book's chapter-7 data."""

import json

import pytest
import torch

from gptlora.instruction_data import read_instruction_file
from gptlora.model import GPTConfig

from conftest import SHARED
from test_distributed import group_of_one  # noqa: F401 (a fixture)
from test_prefix_cache import one_thread  # noqa: F401 (a fixture)

DATA_FILE = SHARED / "data" / "instruction-data" / "instruction-data.json"
TINY = GPTConfig(vocab_size=50257, context_length=96, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0,
                 qkv_bias=False)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """The first 40 records of the book's data (34 train, 2 validation, 4 test), as a --data file."""
    if not DATA_FILE.is_file():
        pytest.skip(f"the chapter-7 instruction data is not at {DATA_FILE}; see ../shared/README.md")
    path = tmp_path_factory.mktemp("data") / "small.json"
    path.write_text(json.dumps(read_instruction_file(DATA_FILE)[:40]))
    return path


@pytest.fixture(scope="module")
def tiny_shape(tmp_path_factory):
    from gptlora.formats.hf_layout import config_to_hf

    directory = tmp_path_factory.mktemp("tiny-shape")
    (directory / "config.json").write_text(json.dumps(config_to_hf(TINY)))
    return directory


def instruct_args(data, model, out, *extra):
    return ["instruct", "--data", str(data), "--model", str(model), "--epochs", "1", "--batch-size", "4",
            "--eval-freq", "4", "--eval-iter", "1", "--lr", "1e-3", "--response-tokens", "6", "--device", "cpu",
            "--out", str(out), *extra]


def test_instruct_writes_a_run_its_test_responses_and_generate_answers(run_cli, small_data, tiny_shape, tmp_path,
                                                                       one_thread, capsys):
    from gptlora.generation import get_tokenizer
    from gptlora.recipes.instruct_run import respond
    from gptlora.recipes.pretrain_run import load_language_model

    run = tmp_path / "run"
    status, out = run_cli(instruct_args(small_data, tiny_shape, run, "--random-init", "--mask-prompt"))
    assert status == 0, out
    assert out.splitlines()[0].startswith("Ep 1 (Step 000000): Train loss ")
    assert {"language_model.json", "model.safetensors", "metrics.json", "test-responses.json"} <= {
        p.name for p in run.iterdir()}
    model, info = load_language_model(run)
    assert info["instruction"] == dict(mask_prompt=True, max_length=96, data=str(small_data),
                                       split=dict(train=34, validation=2, test=4))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["history"]["global_step"] == 34 // 4 - 1 and metrics["val_loss"] > 0
    records = read_instruction_file(small_data)
    responses = json.loads((run / "test-responses.json").read_text())
    assert [{k: r[k] for k in ("instruction", "input", "output")} for r in responses] == records[34:38]
    tokenizer = get_tokenizer()
    assert [r["model_response"] for r in responses] == [respond(model, r, tokenizer, 6) for r in records[34:38]]
    from gptlora.instruction_scoring import score_responses

    assert metrics["test_scores"] == score_responses(responses)  # offline scores; no judge unless --judge-url

    status, answer = run_cli(["generate", "--model", str(run), "--instruction", records[50 % 40]["instruction"],
                              "--input", records[50 % 40]["input"], "--max-new-tokens", "6"])
    assert status == 0
    assert answer.strip() == respond(model, records[10], tokenizer, 6)
    assert "Below is an instruction" not in answer and "### Response" not in answer  # only the response


def test_a_lora_instruct_run_resumes_to_the_same_end(run_cli, small_data, tmp_path, one_thread):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = tmp_path / "gpt2-tiny"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=96, vocab_size=50257)).save_pretrained(base)
    lora = ("--method", "lora", "--rank", "4", "--alpha", "8", "--response-tokens", "0")
    status, out = run_cli([*instruct_args(small_data, base, tmp_path / "straight", *lora), "--epochs", "2"])
    assert status == 0, out
    assert (tmp_path / "straight" / "adapter").is_dir() and not (tmp_path / "straight" / "model.safetensors").exists()
    assert run_cli(instruct_args(small_data, base, tmp_path / "half", *lora))[0] == 0
    status, out = run_cli(["instruct", "--resume", str(tmp_path / "half"), "--epochs", "2"])
    assert status == 0, out
    straight, resumed = (json.loads((tmp_path / name / "metrics.json").read_text())["history"]
                         for name in ("straight", "half"))
    assert resumed["val_losses"] == straight["val_losses"] and resumed["epochs_done"] == 2
    status, answer = run_cli(["generate", "--model", str(tmp_path / "half"), "--instruction", "Say hello.",
                              "--max-new-tokens", "3"])
    assert status == 0


def test_instruct_settings_are_checked_when_made():
    from gptlora.recipes.settings import InstructSettings

    assert InstructSettings(method="lora").method_options["rank"] == 16  # LoRA's defaults, completed
    for bad, message in [(dict(method="prompt-tuning"), "unknown instruction fine-tuning method"),
                         (dict(method="full", method_options={"rank": 4}), "takes no options"),
                         (dict(epochs=0), "epochs: expected a whole number of at least 1, found 0"),
                         (dict(max_length=1), "max_length: expected a whole number of at least 2, found 1"),
                         (dict(lr=0.0), "lr: expected a finite number above 0, found 0.0"),
                         (dict(response_tokens=-1), "response_tokens: expected a whole number of at least 0"),
                         (dict(decay="linear"), "decay: expected one of none, cosine")]:
        with pytest.raises(ValueError, match=message):
            InstructSettings(**bad)


def test_two_processes_instruct_and_rank_0_answers(small_data, tmp_path, group_of_one):  # noqa: F811
    """Under torchrun each process takes half of every batch; rank 0 reports and answers the test split.
    (Each process averages over its own unmasked targets, so the numbers are close to, not equal to, one
    process's: the halves hold different numbers of response tokens.)"""
    from transformers import GPT2Config, GPT2LMHeadModel
    from test_distributed import run_under_torchrun

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=96, vocab_size=50257, resid_pdrop=0,
                               embd_pdrop=0, attn_pdrop=0)).save_pretrained(tmp_path / "base")
    output = run_under_torchrun(2, instruct_args(small_data, tmp_path / "base", tmp_path / "two", "--method", "lora",
                                                 "--rank", "4", "--response-tokens", "3", "--eval-freq", "2"))
    assert output.count("trainable parameters") == 1  # rank 0 reports, rank 1 is silent
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["history"]["global_step"] == 34 // 4 - 1 and metrics["test_scores"]["records"] == 4
    assert len(json.loads((tmp_path / "two" / "test-responses.json").read_text())) == 4


def test_instruct_seeds_again_right_before_training_as_the_book_s_chapter_7(small_data, tmp_path, monkeypatch):
    """The book loads GPT-2, then calls torch.manual_seed(123) right before train_model_simple: the first
    epoch's shuffle must not depend on the numbers that building and loading the model drew."""
    from gptlora.recipes import pretrain_run
    from gptlora.recipes.instruct_run import instruct_finetune
    from gptlora.recipes.run_dir import base_source

    states = []

    def capture(*args, **kwargs):
        states.append(torch.get_rng_state())
        raise KeyboardInterrupt  # stop here: only the generator's state at the loop's start matters

    monkeypatch.setattr(pretrain_run, "train_language_model", capture)
    from gptlora.formats.hf_layout import config_to_hf

    directory = tmp_path / "tiny"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config_to_hf(TINY)))
    with pytest.raises(KeyboardInterrupt):
        instruct_finetune(read_instruction_file(small_data), tmp_path / "run",
                          base_source(str(directory), random_init=True, seed=123), method="lora", seed=123,
                          response_tokens=0, progress=False, verbose=False)
    torch.manual_seed(123)
    assert torch.equal(states[0], torch.get_rng_state())
