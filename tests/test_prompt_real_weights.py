"""Prompt and prefix tuning of the spam classifier on the real gpt2-small: the accuracies the tiny
random-weight GPT of notebook 09 cannot say anything about. Needs GPTLORA_GPT2_DIR (see docs/pretrained-weights.md)
and skips without it; one epoch per method on the full splits (tens of minutes on 2 CPU cores)."""

import pytest
import torch


@pytest.mark.real_weights
@pytest.mark.slow
@pytest.mark.parametrize("method", ["prompt-tuning", "prefix-tuning"])
def test_prompt_methods_on_real_weights_beat_the_untrained_classifier(method, gpt2_small_dir, spam_data_dir,
                                                                      tokenizer, tmp_path):
    from gptlora.classifier import calc_accuracy_loader, prepare_for_classification
    from gptlora.recipes.finetune import finetune_spam
    from gptlora.pretrained import load_pretrained
    from gptlora.spam import create_dataloaders

    # Before training: the fresh head and the prompt as it starts (the default init text), on the test split.
    torch.manual_seed(123)
    test_loader = create_dataloaders(spam_data_dir, tokenizer, batch_size=8)[2]
    torch.manual_seed(123)
    untrained = prepare_for_classification(load_pretrained(gpt2_small_dir, download=False), method).eval()
    before = calc_accuracy_loader(test_loader, untrained, "cpu")

    metrics = finetune_spam(load_pretrained(gpt2_small_dir, download=False), tokenizer, spam_data_dir,
                            tmp_path / "run", method, epochs=1, seed=123, progress=False)
    accuracy = metrics["accuracy"]
    print(f"{method} on gpt2-small, 1 epoch (lr {metrics['lr']:g}, 20 virtual tokens): test accuracy "
          f"{before:.2%} before, after: train {accuracy['train']:.2%}, validation {accuracy['validation']:.2%}, "
          f"test {accuracy['test']:.2%}")
    assert accuracy["test"] > before
