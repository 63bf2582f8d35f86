"""DPO (the book's dpo-from-scratch.ipynb, Rafailov et al. 2023): log-probabilities, the loss, rewards, references.

The book's ``compute_dpo_loss`` and ``compute_logprobs`` are written out below as references; ``trl``'s
sigmoid loss is the other (a test-only dependency, like ``peft``).
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from gptlora.lora import apply_lora, lora_disabled
from gptlora.model import GPTConfig, GPTModel
from gptlora.preference import (dpo_batch, dpo_loss, dpo_scores, frozen_copy, pair_logprobs, reference_of,
                                sequence_logprobs)
from gptlora.preference_data import PreferenceDataset, collate_preferences, preference_loaders

from test_preference_data import BOOK_EXAMPLES, DATA_FILE, data  # noqa: F401 (a fixture)
from test_prefix_cache import one_thread  # noqa: F401 (a fixture)

TINY = GPTConfig(vocab_size=50257, context_length=128, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0,
                 qkv_bias=False)


def book_compute_dpo_loss(model_chosen_logprobs, model_rejected_logprobs, reference_chosen_logprobs,
                          reference_rejected_logprobs, beta=0.1):
    """The book's ``compute_dpo_loss`` (dpo-from-scratch.ipynb), its statements as written there."""
    model_logratios = model_chosen_logprobs - model_rejected_logprobs
    reference_logratios = reference_chosen_logprobs - reference_rejected_logprobs
    logits = model_logratios - reference_logratios
    losses = -F.logsigmoid(beta * logits)
    chosen_rewards = (model_chosen_logprobs - reference_chosen_logprobs).detach()
    rejected_rewards = (model_rejected_logprobs - reference_rejected_logprobs).detach()
    return losses.mean(), chosen_rewards.mean(), rejected_rewards.mean()


def book_compute_logprobs(logits, labels, selection_mask=None):
    """The book's ``compute_logprobs`` (dpo-from-scratch.ipynb)."""
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1, :]
    log_probs = F.log_softmax(logits, dim=-1)
    selected_log_probs = torch.gather(input=log_probs, dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)
    if selection_mask is not None:
        mask = selection_mask[:, 1:].clone()
        selected_log_probs = selected_log_probs * mask
        return selected_log_probs.sum(-1) / mask.sum(-1)
    return selected_log_probs.mean(-1)


@pytest.fixture(scope="module")
def book_batch(tokenizer):
    return collate_preferences([PreferenceDataset(BOOK_EXAMPLES, tokenizer)[i] for i in range(2)])


def tiny_model(seed=123):
    torch.manual_seed(seed)
    return GPTModel(TINY).eval()


def test_sequence_logprobs_equal_the_books_compute_logprobs_and_sum_when_asked(book_batch):
    torch.manual_seed(0)
    logits = torch.randn(2, book_batch["chosen"].shape[1], 50257)
    for key in ("chosen", "rejected"):
        ids, mask = book_batch[key], book_batch[f"{key}_mask"]
        mean = sequence_logprobs(logits, ids, mask)
        torch.testing.assert_close(mean, book_compute_logprobs(logits, ids, mask), rtol=0, atol=1e-6)
        total = sequence_logprobs(logits, ids, mask, average=False)
        torch.testing.assert_close(total, mean * mask[:, 1:].sum(-1), rtol=1e-6, atol=1e-4)
        # by hand: the log-softmax of each counted token, predicted one position earlier
        log_probs = F.log_softmax(logits, dim=-1)
        by_hand = [sum(log_probs[row, t - 1, ids[row, t]].item() for t in range(1, ids.shape[1]) if mask[row, t])
                   for row in range(2)]
        torch.testing.assert_close(total, torch.tensor(by_hand), rtol=1e-6, atol=1e-4)


def test_padding_and_the_prompt_do_not_change_the_answers_log_probability(book_batch):
    """Averaging over padding or counting the prompt (the two typical mistakes) would change it."""
    model = tiny_model()
    with torch.no_grad():
        batched = sequence_logprobs(model(book_batch["chosen"]), book_batch["chosen"], book_batch["chosen_mask"])
        length = int(book_batch["chosen_mask"][1].nonzero().max()) + 1  # row 1 without its padding
        ids, mask = book_batch["chosen"][1:, :length], book_batch["chosen_mask"][1:, :length]
        alone = sequence_logprobs(model(ids), ids, mask)
    torch.testing.assert_close(batched[1:], alone, rtol=0, atol=1e-5)
    with torch.no_grad():
        unmasked = sequence_logprobs(model(ids), ids, torch.ones_like(mask))
    assert abs(unmasked.item() - alone.item()) > 1e-3


def test_at_step_0_the_loss_is_ln_2_as_the_book_prints_and_the_margins_are_0(book_batch):
    policy = tiny_model()
    reference = frozen_copy(policy)
    with torch.no_grad():
        result = dpo_batch(policy, book_batch, beta=0.1, reference=reference)
    assert result.loss.item() == 0.6931471824645996  # the book's printed loss: ln 2 in float32
    assert result.loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert result.margins.tolist() == [0.0, 0.0]
    loader = [book_batch, book_batch]
    scores = dpo_scores(loader, policy, beta=0.1, reference=reference)
    assert scores["loss"] == 0.6931471824645996 and scores["margin"] == 0.0


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_the_loss_equals_the_books_compute_dpo_loss_and_trls_sigmoid_loss(beta):
    torch.manual_seed(1)
    logps = [torch.randn(16) * 5 - 30 for _ in range(4)]
    ours = dpo_loss(*logps, beta=beta)
    book_loss, book_chosen, book_rejected = book_compute_dpo_loss(*logps, beta=beta)
    torch.testing.assert_close(ours.loss, book_loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.chosen_rewards.mean(), book_chosen, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.rejected_rewards.mean(), book_rejected, rtol=0, atol=1e-6)
    trl_losses, trl_chosen, trl_rejected = trl_sigmoid_loss(*logps, beta)
    torch.testing.assert_close(ours.loss, trl_losses.mean(), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.chosen_rewards * beta, trl_chosen, rtol=0, atol=1e-6)  # trl's rewards: beta x
    torch.testing.assert_close(ours.rejected_rewards * beta, trl_rejected, rtol=0, atol=1e-6)


# trl 1.16's sigmoid DPO loss (``DPOTrainer._compute_loss``, f_divergence_type "reverse_kl", loss_type
# "sigmoid"): it lives inside the trainer's forward pass, which cannot run without a Hugging Face model and a
# dataset, so its statements are reimplemented here; test_trl_computes_the_sigmoid_loss_as_reimplemented checks
# that the installed trl still has them, word for word.
TRL_LINES = ("chosen_logratios = chosen_logps - ref_chosen_logps",
             "rejected_logratios = rejected_logps - ref_rejected_logps",
             "delta_score = chosen_scores - rejected_scores",
             "per_sequence_loss = -F.logsigmoid(self.beta * delta_score)",
             "loss += per_sequence_loss.mean() * loss_weight")


def trl_sigmoid_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """The loss of TRL_LINES (loss weight 1), and trl's logged rewards ``beta * logratios``."""
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    delta_score = chosen_logratios - rejected_logratios  # reverse_kl: the scores are the log-ratios
    per_sequence_loss = -F.logsigmoid(beta * delta_score)
    return per_sequence_loss, beta * chosen_logratios, beta * rejected_logratios


def test_trl_computes_the_sigmoid_loss_as_reimplemented():
    """Read from the installed trl's source file, not imported (importing trl imports transformers: 20 s)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("trl")
    if spec is None:
        pytest.skip("trl (a test-only reference in the dev extra) is not installed")
    source = (Path(spec.origin).parent / "trainer" / "dpo_trainer.py").read_text(encoding="utf-8")
    assert all(line in source for line in TRL_LINES), [line for line in TRL_LINES if line not in source]


def test_beta_must_be_positive():
    logps = [torch.zeros(2)] * 4
    for beta in (0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="beta must be positive"):
            dpo_loss(*logps, beta=beta)


@pytest.mark.parametrize("use_dora", [False, True])
def test_the_reference_under_disabled_adapters_equals_a_frozen_copy(book_batch, use_dora):
    base = tiny_model()
    copy_before = frozen_copy(base)
    policy = apply_lora(copy.deepcopy(base), rank=4, alpha=8, use_dora=use_dora, verbose=False)
    with torch.no_grad():  # trained adapters: B is no longer 0
        for name, parameter in policy.named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    policy.train()
    with reference_of(policy) as reference, torch.no_grad():
        assert reference is policy and not policy.training
        disabled = pair_logprobs(reference, book_batch)
    assert policy.training  # its mode and adapters are back
    with torch.no_grad():
        frozen = pair_logprobs(copy_before, book_batch)
        adapted = pair_logprobs(policy, book_batch)
    for a, b, c in zip(disabled, frozen, adapted):
        assert torch.equal(a, b)
        assert not torch.allclose(a, c)  # the adapters do change the policy
    result = dpo_batch(policy, book_batch)  # reference None: the adapters switched off, gradients to them only
    result.loss.backward()
    assert all(p.grad is not None for p in policy.parameters() if p.requires_grad)
    with lora_disabled(policy):
        pass
    with pytest.raises(ValueError, match="no LoRA adapters"):
        dpo_batch(base, book_batch)


@pytest.mark.slow
def test_dpo_on_a_few_records_raises_the_held_out_margin_and_drops_the_loss_below_ln_2(data, tokenizer, one_thread):
    """The offline run of docs/preference-tuning.md: a tiny random GPT with LoRA (rank 8, alpha 16, every
    linear layer), 20 records of the book's data (16 to train, 4 held out), AdamW lr 1e-2, 2 epochs of 2
    steps. Measured: held-out margin 0 -> 0.0061 -> 0.0167, loss 0.6931 -> 0.6928 -> 0.6923."""
    from gptlora.training import trainable_adamw

    records = data[:20]
    train, held_out, _ = preference_loaders(records[:16], records[16:], [], tokenizer, batch_size=8)
    policy = apply_lora(tiny_model(), rank=8, alpha=16, verbose=False)
    before = dpo_scores(held_out, policy, beta=0.1)
    optimizer = trainable_adamw(policy, lr=1e-2, weight_decay=0.01)
    torch.manual_seed(123)
    margins = []
    for _ in range(2):
        policy.train()
        for batch in train:
            optimizer.zero_grad()
            dpo_batch(policy, batch, beta=0.1).loss.backward()
            optimizer.step()
        margins.append(dpo_scores(held_out, policy, beta=0.1)["margin"])
    after = dpo_scores(held_out, policy, beta=0.1)
    assert before["loss"] == 0.6931471824645996 and before["margin"] == 0.0
    assert 0 < margins[0] < margins[1]  # the held-out margin rises, epoch after epoch
    assert after["loss"] < math.log(2)
