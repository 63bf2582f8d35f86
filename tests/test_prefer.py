"""`gptlora prefer` (DPO after `instruct`) on tiny models and a slice of the book's preference data."""

import json
import os
import re

import pytest
import torch

from gptlora.model import GPTConfig
from gptlora.preference_data import read_preference_file

from test_preference_data import DATA_FILE
from test_prefix_cache import one_thread  # noqa: F401 (a fixture)

TINY = GPTConfig(vocab_size=50257, context_length=160, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0,
                 qkv_bias=False)
# As the book, step 0 is measured after the first optimizer step (its run prints 0.692, 0.693, 0.014, 0.006).
STEP_0 = re.compile(r"^Ep 1 \(Step 000000\): Train loss 0\.69\d, Val loss 0\.69\d, Train reward margins -?\d\.\d{3}, "
                    r"Val reward margins -?\d\.\d{3}$", re.MULTILINE)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """The first 10 records of the book's preference data (8 train, 1 validation, 1 test), as a --data file."""
    if not DATA_FILE.is_file():
        pytest.skip(f"the preference data is not at {DATA_FILE}; see ../shared/README.md")
    path = tmp_path_factory.mktemp("data") / "small.json"
    path.write_text(json.dumps(read_preference_file(DATA_FILE)[:10]))
    return path


@pytest.fixture(scope="module")
def tiny_shape(tmp_path_factory):
    from gptlora.formats.hf_layout import config_to_hf

    directory = tmp_path_factory.mktemp("tiny-shape")
    (directory / "config.json").write_text(json.dumps(config_to_hf(TINY)))
    return directory


def prefer_args(data, model, out, *extra):
    return ["prefer", "--data", str(data), "--model", str(model), "--epochs", "1", "--batch-size", "2",
            "--eval-freq", "3", "--eval-iter", "1", "--lr", "1e-3", "--response-tokens", "4", "--device", "cpu",
            "--out", str(out), *extra]


def test_a_lora_dpo_run_prints_the_books_lines_writes_before_and_after_and_generate_answers(
        run_cli, small_data, tiny_shape, tmp_path, one_thread):
    run = tmp_path / "run"
    status, out = run_cli(prefer_args(small_data, tiny_shape, run, "--random-init", "--method", "lora", "--rank", "4",
                                      "--alpha", "8"))
    assert status == 0, out
    assert STEP_0.search(out) and "Ep 1 (Step 000003): Train loss " in out
    assert "before: test split (1 records)" in out and "after:  test split (1 records)" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["history"]["global_step"] == 3 and len(metrics["history"]["val_losses"]) == 2
    assert metrics["method"] == "lora" and metrics["beta"] == 0.1 and metrics["logprobs"] == "mean"
    rows = json.loads((run / "test-responses.json").read_text())
    assert len(rows) == 1 and all({"response_before", "model_response", "chosen", "rejected", "output"} <= set(row)
                                  for row in rows)
    assert (run / "reward-margins.png").is_file() and (run / "model.safetensors").is_file()
    status, scored = run_cli(["score", str(run / "test-responses.json")])
    assert status == 0 and "test split (1 records)" in scored
    status, answer = run_cli(["generate", "--model", str(run), "--instruction", "Say hello.", "--max-new-tokens", "3"])
    assert status == 0


@pytest.mark.slow
def test_full_dpo_from_a_lora_instruct_run_resumes_to_the_same_end(run_cli, small_data, tiny_shape, tmp_path,
                                                                   one_thread):
    """The start model is an `instruct` run (LoRA, merged on loading); full DPO keeps a frozen copy."""
    records = tmp_path / "instructions.json"
    records.write_text(json.dumps([{k: r[k] for k in ("instruction", "input", "output")}
                                   for r in read_preference_file(small_data)]))
    status, out = run_cli(["instruct", "--data", str(records), "--model", str(tiny_shape), "--random-init",
                           "--method", "lora", "--rank", "2", "--alpha", "4", "--epochs", "1", "--batch-size", "8",
                           "--eval-freq", "10", "--eval-iter", "1", "--response-tokens", "0", "--device", "cpu",
                           "--out", str(tmp_path / "sft")])
    assert status == 0, out
    sft = tmp_path / "sft"
    options = ("--response-tokens", "0", "--batch-size", "4", "--eval-freq", "1")
    status, out = run_cli([*prefer_args(small_data, sft, tmp_path / "straight", *options), "--epochs", "2"])
    assert status == 0, out
    assert STEP_0.search(out)
    assert run_cli(prefer_args(small_data, sft, tmp_path / "half", *options))[0] == 0
    status, out = run_cli(["prefer", "--resume", str(tmp_path / "half"), "--epochs", "2"])
    assert status == 0, out
    straight, resumed = (json.loads((tmp_path / name / "metrics.json").read_text())["history"]
                         for name in ("straight", "half"))
    assert resumed["val_losses"] == straight["val_losses"] and resumed["epochs_done"] == 2
    assert resumed["val_chosen_rewards"] == straight["val_chosen_rewards"]


def test_prefer_takes_the_training_commands_precision_and_checkpointing(run_cli, small_data, tiny_shape, tmp_path,
                                                                       one_thread):
    """`prefer` shares the training options of issue 24: a bf16 run with checkpointed blocks records the
    precision it used in metrics.json, and its losses stay near the float32 run's."""
    runs = {}
    for name, extra in (("fp32", []), ("bf16", ["--precision", "bf16", "--gradient-checkpointing"])):
        status, out = run_cli(prefer_args(small_data, tiny_shape, tmp_path / name, "--random-init", "--method", "lora",
                                          "--rank", "4", "--response-tokens", "0", *extra))
        assert status == 0, out
        runs[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert "precision_used" not in runs["fp32"]
    assert runs["bf16"]["precision_used"] == "bf16" and runs["bf16"]["gradient_checkpointing"] is True
    fp32, bf16 = (runs[name]["history"]["train_losses"] for name in ("fp32", "bf16"))
    assert len(fp32) == len(bf16) > 0 and max(abs(a - b) for a, b in zip(fp32, bf16)) < 0.05


def test_preference_settings_are_checked_when_made():
    from gptlora.recipes.settings import PreferenceSettings

    assert PreferenceSettings().beta == 0.1 and PreferenceSettings().lr == 5e-6
    for bad, message in [(dict(beta=0), "beta"), (dict(beta=-1), "beta"), (dict(method="prefix-tuning"), "method"),
                         (dict(logprobs="max"), "logprobs"), (dict(method="full", method_options={"rank": 2}),
                                                              "takes no options")]:
        with pytest.raises(ValueError, match=message):
            PreferenceSettings(**bad)


@pytest.mark.skipif(not os.environ.get("GPTLORA_REAL_WEIGHTS"),
                    reason="opt-in (GPTLORA_REAL_WEIGHTS=1): the book's DPO run starts from its gpt2-medium chapter-7 "
                           "model (gpt2-medium355M-sft.pth, 1.4 GB, trained by `gptlora instruct`), which these "
                           "machines neither have nor can download, and takes hours on a CPU")
def test_the_books_dpo_run_from_its_chapter_7_model(run_cli, tmp_path):  # pragma: no cover (opt-in)
    """With ``GPTLORA_REAL_WEIGHTS=1`` and ``GPTLORA_SFT_RUN`` (an `instruct` run of gpt2-medium on the book's
    data): the book's run (beta 0.1, lr 5e-6, 1 epoch). Its printed first line: train loss 0.692, val loss
    0.693 and margins 0.014 / 0.006 after step 0; the validation margin rises past 0.8 by step 50."""
    run = tmp_path / "dpo"
    status, out = run_cli(["prefer", "--model", os.environ["GPTLORA_SFT_RUN"], "--response-tokens", "0",
                           "--out", str(run)])
    assert status == 0, out
    history = json.loads((run / "metrics.json").read_text())["history"]
    margins = [c - r for c, r in zip(history["val_chosen_rewards"], history["val_rejected_rewards"])]
    assert history["val_losses"][0] == pytest.approx(0.693, abs=5e-4) and margins[10] > 0.5
    assert torch.tensor(history["val_losses"][-1]) < history["val_losses"][0]
