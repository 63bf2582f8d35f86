"""Instruction fine-tuning of the real gpt2-small with LoRA: the answers a random-weight base cannot give.
Needs GPTLORA_GPT2_DIR (see the README) and skips without it. One epoch over the book's 935 training
records (tens of minutes on 2 CPU cores, a minute on a GPU); prints book-style responses for the first
test records, with their offline scores."""

import pytest
import torch

from conftest import SHARED

DATA_FILE = SHARED / "data" / "instruction-data" / "instruction-data.json"


@pytest.mark.real_weights
@pytest.mark.slow
def test_lora_instruction_tuning_on_real_gpt2_small_answers_and_lowers_the_loss(gpt2_small_dir, tmp_path):
    from gptlora.instruction_data import format_input, read_instruction_file
    from gptlora.recipes.instruct_run import instruct_finetune
    from gptlora.recipes.pretrain_run import base_source

    if not DATA_FILE.is_file():
        pytest.skip(f"the chapter-7 instruction data is not at {DATA_FILE}")
    data = read_instruction_file(DATA_FILE)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    metrics = instruct_finetune(data, tmp_path / "run", base_source(str(gpt2_small_dir), random_init=False),
                                method="lora", lr=5e-4, epochs=1, response_tokens=64, device=device,
                                progress=False)
    import json

    responses = json.loads((tmp_path / "run" / "test-responses.json").read_text())
    for entry in responses[:3]:
        print(format_input(entry))
        print(f"\nCorrect response:\n>> {entry['output']}\n\nModel response:\n>> {entry['model_response']}")
        print("-" * 40)
    scores = metrics["test_scores"]
    print(f"val loss {metrics['history']['val_losses'][0]:.3f} -> {metrics['val_loss']:.3f}; test exact match "
          f"{scores['exact_match']:.1%}, token F1 {scores['token_f1']:.3f}")
    assert metrics["val_loss"] < metrics["history"]["val_losses"][0]
    assert scores["token_f1"] > 0.1  # pretrained English: answers share words with the references
