"""Prompt tuning and prefix tuning: the maths, padding, files with a base fingerprint, and the export to peft."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_lora import TINY, ids, tiny_gpt
from test_lora_io import classifier_base, hf_reference
from torch import nn

from gptlora.classifier import classification_logits
from gptlora.formats.lora_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, BaseMismatchError
from gptlora.model import GPTConfig, GPTModel, count_parameters
from gptlora.prompt_tuning import (PrefixTunedGPT, PromptTunedGPT, activations_as_prefix, apply_prefix_tuning,
                                   apply_prompt_tuning, check_virtual_tokens, init_token_ids)
from gptlora.formats.prompt_tuning_io import export_prompt_peft, load_prompt, save_prompt


def tuned(method, base=None, n=3, hidden=None, head=False, seed=5):
    """A tiny model with a prompt (or prefix) of ``n`` virtual tokens, all of it perturbed away from its start."""
    base = base if base is not None else (classifier_base() if head else tiny_gpt())
    saves = ["out_head"] if head else None
    if method == "prompt-tuning":
        model = apply_prompt_tuning(base, n, modules_to_save=saves)
    else:
        model = apply_prefix_tuning(base, n, hidden=hidden, modules_to_save=saves)
    return perturbed(model, seed)


def perturbed(model, seed=5):
    """``model`` in eval mode, every trainable number moved away from its start, as training would."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


# peft warns that GPT-2 with inputs_embeds and no pad token reads the last position: that is what we compare.
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("method, hidden", [("prompt-tuning", None), ("prefix-tuning", None), ("prefix-tuning", 16)])
@pytest.mark.parametrize("task", ["lm", "classifier"])
def test_export_to_peft_reproduces_our_logits(tmp_path, method, hidden, task):
    peft = pytest.importorskip("peft")
    x = ids(tokens=6)
    x[x == TINY.vocab_size - 1] = 0  # keep the pad id out: the classifier then pools the last token
    classifier = task == "classifier"
    hf_model = hf_reference(tiny_gpt(), classifier, tmp_path / "base")  # score comes with the export
    model = tuned(method, hidden=hidden, head=classifier)
    export_prompt_peft(model, tmp_path / "peft", base_model_name_or_path=str(tmp_path / "base"))
    peft_model = peft.PeftModel.from_pretrained(hf_model, str(tmp_path / "peft")).eval()
    config = json.loads((tmp_path / "peft" / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == {"prompt-tuning": "PROMPT_TUNING", "prefix-tuning": "PREFIX_TUNING"}[method]
    with torch.no_grad():
        if classifier and method == "prefix-tuning":
            # peft 0.21's PeftModelForSequenceClassification looks for a `past_key_values` argument, which
            # transformers 5 renamed `cache`: it refuses to run. The same steps by hand: peft's own prefix
            # (get_prompt, from the loaded file) as the cache of peft's wrapped model.
            prefix = peft_model.get_prompt(batch_size=x.shape[0])
            theirs = peft_model.base_model(input_ids=x, cache=prefix).logits
        else:
            theirs = peft_model(input_ids=x).logits
        ours = model(x)
    if classifier:
        ours = ours[:, -1, :]
    elif method == "prompt-tuning":  # peft returns the virtual positions' logits first
        theirs = theirs[:, model.num_virtual_tokens:]
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["prompt-tuning", "prefix-tuning"])
def test_a_prompt_made_of_real_tokens_equals_writing_them_in_front(method):
    """Started from a text's embeddings (prompt) or from the keys and values the model computes for it
    (prefix), the virtual tokens are exactly that text in front of the input: the positions are right."""
    base, text = tiny_gpt(), [5, 17, 42, 8]
    x = ids(tokens=6)
    with torch.no_grad():
        expected = base(torch.cat([torch.tensor([text] * x.shape[0]), x], dim=1))[:, len(text):]
        if method == "prompt-tuning":
            model = apply_prompt_tuning(base, len(text), init_ids=text)
        else:
            model = apply_prefix_tuning(base, len(text), init_ids=text)
            assert torch.equal(model.prompt.embedding, activations_as_prefix(base, text))
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)
    assert model(x).shape == (x.shape[0], x.shape[1], TINY.vocab_size)


@pytest.mark.parametrize("method, hidden", [("prompt-tuning", None), ("prefix-tuning", None), ("prefix-tuning", 16)])
def test_only_the_prompt_and_the_saved_head_train(method, hidden):
    model = tuned(method, hidden=hidden, head=True, n=4)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    expected_prompt = {"prompt-tuning": {"prompt.weight"},
                       "prefix-tuning": {"prompt.embedding"} | ({f"prompt.transform.{i}.{w}" for i in (0, 2)
                                                                 for w in ("weight", "bias")} if hidden else set())}
    assert trainable == expected_prompt[method] | {"base.out_head.copies.default.weight",
                                                   "base.out_head.copies.default.bias"}
    n, d, layers = 4, TINY.emb_dim, TINY.n_layers
    prompt_count = {"prompt-tuning": n * d, "prefix-tuning": n * layers * 2 * d if not hidden else
                    n * d + (d * 16 + 16) + (16 * layers * 2 * d + layers * 2 * d)}[method]
    assert count_parameters(model, trainable_only=True) == prompt_count + d * 2 + 2
    x = torch.randint(0, TINY.vocab_size, (2, 5))
    model.train()
    classification_logits(model(x)).sum().backward()  # gradients reach the prompt through the frozen model
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.base.parameters() if not p.requires_grad)


@pytest.mark.parametrize("method", ["prompt-tuning", "prefix-tuning"])
def test_a_message_gives_the_same_class_whatever_the_padding(method):
    """With dynamic padding the class is read at the last real token, which the virtual tokens in front
    do not move: more padding after a message changes nothing. With the book's fixed padding, a message
    in a batch gets exactly what it gets alone (same length, same last position)."""
    model = tuned(method, head=True, n=3)
    message = torch.tensor([11, 23, 35, 47])
    pad = TINY.vocab_size - 1
    readings = []
    for padded_to in (4, 7, 12):
        row = torch.cat([message, torch.full((padded_to - 4,), pad)]).unsqueeze(0)
        readings.append(classification_logits(model(row), torch.tensor([4])))
    for reading in readings[1:]:
        torch.testing.assert_close(reading, readings[0], atol=1e-6, rtol=0)
    batch = torch.stack([torch.cat([message, torch.full((8,), pad)]), torch.randint(0, pad, (12,))])
    alone = classification_logits(model(batch[:1]))
    torch.testing.assert_close(classification_logits(model(batch))[:1], alone, atol=1e-6, rtol=0)


def test_bad_numbers_of_virtual_tokens_and_init_texts_are_explained(tokenizer):
    base = tiny_gpt()
    with pytest.raises(ValueError, match="positive integer"):
        apply_prompt_tuning(base, 0)
    with pytest.raises(ValueError, match=r"14 virtual tokens \+ 3 tokens of input exceed the context length 16; "
                                         r"use at most 13"):
        check_virtual_tokens(14, TINY.context_length, longest_input=3)
    with pytest.raises(ValueError, match=r"16 virtual tokens \+ 1 token of input exceed the context length 16"):
        apply_prefix_tuning(base, 16)
    with pytest.raises(ValueError, match="prefix MLP's hidden width must be a positive integer"):
        apply_prefix_tuning(base, 4, hidden=0)
    for model in (apply_prompt_tuning(tiny_gpt(), 10), apply_prefix_tuning(tiny_gpt(), 10)):
        with pytest.raises(ValueError, match=r"input of 7 tokens does not fit after the 10 virtual tokens in the "
                                             r"context length 16; keep only the last 6 tokens, e.g. ids\[:, -6:\]"):
            model(torch.zeros(1, 7, dtype=torch.long))  # 10 virtual + 7 real tokens
    with pytest.raises(ValueError, match="init text is empty"):
        init_token_ids("", tokenizer, 5)
    with pytest.warns(UserWarning, match="the init text has 12 tokens; only its first 4"):
        assert init_token_ids("Classify if the message is spam or not spam.\n", tokenizer, 4) == \
            tokenizer.encode("Classify if the")
    assert init_token_ids("spam or not", tokenizer, 7) == (tokenizer.encode("spam or not") * 3)[:7]


@pytest.mark.parametrize("method, hidden", [("prompt-tuning", None), ("prefix-tuning", 16)])
def test_files_round_trip_onto_a_fresh_base_and_refuse_another(tmp_path, method, hidden):
    model = tuned(method, hidden=hidden, head=True, n=3)
    x = ids(tokens=5)
    info = save_prompt(model, tmp_path / "prompt", init_text="spam?", verbose=False)
    stored = load_file(str(tmp_path / "prompt" / ADAPTER_WEIGHTS))
    assert {"out_head.weight", "out_head.bias"} <= set(stored)
    assert not any(key.startswith(("trf_blocks", "tok_emb", "pos_emb")) for key in stored)  # nothing of the base
    assert info["parameters"] == sum(t.numel() for t in stored.values())
    config = json.loads((tmp_path / "prompt" / ADAPTER_CONFIG).read_text())
    assert (config["method"], config["num_virtual_tokens"], config["init_text"]) == (method, 3, "spam?")

    fresh = classifier_base()
    state = torch.random.get_rng_state()
    loaded = load_prompt(fresh, tmp_path / "prompt")
    assert torch.equal(torch.random.get_rng_state(), state)  # loading draws nothing from the caller's generator
    assert isinstance(loaded, PromptTunedGPT if method == "prompt-tuning" else PrefixTunedGPT)
    assert torch.equal(loaded(x), model(x))
    assert not any(p.requires_grad for p in loaded.parameters())

    other = classifier_base(seed=3)
    with pytest.raises(BaseMismatchError, match="other base weights"):
        load_prompt(other, tmp_path / "prompt")
    wider = GPTModel(GPTConfig(**{**TINY.to_dict(), "emb_dim": 48}))
    wider.out_head = nn.Linear(48, 2)
    with pytest.raises(ValueError, match=r"made for a model with \{'emb_dim': 32.*this one has \{'emb_dim': 48"):
        load_prompt(wider, tmp_path / "prompt")
    assert type(other.out_head) is nn.Linear and type(wider.out_head) is nn.Linear  # nothing changed
    with pytest.raises(ValueError, match="not a gptlora prompt"):
        (tmp_path / "lora").mkdir()
        (tmp_path / "lora" / ADAPTER_CONFIG).write_text(json.dumps({"format": "gptlora-lora-adapter"}))
        load_prompt(classifier_base(), tmp_path / "lora")


def test_prompt_tuning_for_language_modelling_lowers_the_loss():
    """A soft prompt alone, trained on one sentence's next tokens, makes the frozen model predict it better."""
    torch.manual_seed(0)
    model = apply_prompt_tuning(tiny_gpt(), 8)
    text = torch.randint(0, TINY.vocab_size, (1, 7))
    frozen = {k: v.clone() for k, v in model.base.state_dict().items()}

    def loss():
        logits = model(text[:, :-1])
        return nn.functional.cross_entropy(logits.flatten(0, 1), text[:, 1:].flatten())

    optimizer = torch.optim.AdamW([model.prompt.weight], lr=0.1)
    before = loss().item()
    for _ in range(60):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < 0.9 * before  # measured: 16.97 -> 13.92 (a random 2-layer base is hard to steer)
    assert all(torch.equal(v, frozen[k]) for k, v in model.base.state_dict().items())


def test_documented_gpt2_small_counts_with_the_head():
    """20 virtual tokens on gpt2-small, the 2-class head training too (counted on the meta device)."""
    from gptlora.recipes.method_comparison import trainable_on_meta

    head = 768 * 2 + 2
    assert trainable_on_meta("prompt-tuning") == 20 * 768 + head == 16_898
    assert trainable_on_meta("prefix-tuning") == 20 * 12 * 2 * 768 + head == 370_178
    assert trainable_on_meta("lora") == 2_666_528


@pytest.mark.parametrize("method", ["prompt-tuning", "prefix-tuning"])
def test_a_tuned_model_generates_within_the_room_its_virtual_tokens_leave(method):
    from gptlora.generation import generate

    model = tuned(method, n=4)
    assert model.cfg.context_length == TINY.context_length - 4
    out = generate(model, torch.tensor([[1, 2, 3]]), 15, use_cache=False)  # the 12-token window slides
    assert out.shape == (1, 18) and torch.equal(out[:, :3], torch.tensor([[1, 2, 3]]))
    with pytest.raises(NotImplementedError, match="use generate\\(..., use_cache=False\\)"):
        generate(model, torch.tensor([[1, 2, 3]]), 2)
