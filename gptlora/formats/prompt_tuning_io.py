"""Soft prompts and prefixes on disk, and their export to Hugging Face ``peft``.

A prompt directory has the two files of a LoRA adapter directory (``lora_io``):
``adapter_model.safetensors`` holds the prompt alone (``prompt.weight`` ``[n, D]``, the
prefix ``prefix.embedding`` and its MLP, or P-tuning's ``encoder.*``) and the modules trained in full (a new
classification head), nothing of the base; ``adapter_config.json`` holds the method,
the number of virtual tokens, the widths, and the base's description and fingerprint,
so a prompt is never applied to another base or another width.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..lora import saved_modules
from .lora_io import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, base_fingerprint, base_state_dict, check_base_fingerprint,
                      describe_base, write_adapter_files)
from .lora_peft_export import effective_head, fold_head_bias
from ..model import GPTModel
from ..p_tuning import PTunedGPT, apply_p_tuning
from ..prompt_tuning import PrefixTunedGPT, VirtualTokenModel, apply_prefix_tuning, apply_prompt_tuning

FORMAT = "gptlora-prompt"
VERSION = 1
# Our tensor-name prefix for each method's encoder, and peft's name for the method.
ENCODER_PREFIX = {"prompt-tuning": "prompt", "prefix-tuning": "prefix", "p-tuning": "encoder"}
PEFT_TYPES = {"prompt-tuning": "PROMPT_TUNING", "prefix-tuning": "PREFIX_TUNING", "p-tuning": "P_TUNING"}


def prompt_config(model: VirtualTokenModel, init_text: str | None = None) -> dict:
    """The ``adapter_config.json`` contents of ``model``'s prompt."""
    cfg = model.base.cfg
    return {
        "format": FORMAT, "version": VERSION, "method": model.method,
        "num_virtual_tokens": model.num_virtual_tokens, "emb_dim": cfg.emb_dim, "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads, "hidden": getattr(model.prompt, "hidden", None), "init_text": init_text,
        "encoder": getattr(model.prompt, "encoder_type", None),
        "modules_to_save": list(saved_modules(model.base)),
        "base_model": describe_base(model.base), "base_fingerprint": base_fingerprint(model.base),
    }


def prompt_tensors(model: VirtualTokenModel) -> dict[str, torch.Tensor]:
    """What the file stores: the encoder's tensors under ``prompt.``/``prefix.``, and module copies."""
    prefix = ENCODER_PREFIX[model.method]
    tensors = {f"{prefix}.{key}": value for key, value in model.prompt.state_dict().items()}
    for name, module in saved_modules(model.base).items():
        tensors.update({f"{name}.{k}": v for k, v in module.copies["default"].state_dict().items()})
    return {k: v.detach().contiguous().clone() for k, v in tensors.items()}


def save_prompt(model: VirtualTokenModel, path, init_text: str | None = None, verbose: bool = True) -> dict:
    """Write ``model``'s prompt (or prefix) and trained modules to directory ``path``.

    Returns ``{"path", "parameters", "bytes"}`` (bytes of both files), printed unless ``verbose=False``.
    """
    if not isinstance(model, VirtualTokenModel):
        raise TypeError(f"save_prompt saves a prompt- or prefix-tuned model, found {type(model).__name__}; "
                        "LoRA adapters are saved with lora_io.save_adapter")
    info = write_adapter_files(path, prompt_tensors(model), prompt_config(model, init_text), FORMAT)
    if verbose:
        print(f"saved {model.method} prompt to {path}: {info['parameters']:,} parameters, {info['bytes']:,} bytes")
    return info


def read_prompt_config(path) -> dict:
    """The config of the prompt directory ``path``, checked to be ours."""
    file = Path(path) / ADAPTER_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {path}; expected a directory written by save_prompt")
    config = json.loads(file.read_text())
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        raise ValueError(f"{file} is not a gptlora prompt of version {VERSION} (format {config.get('format')!r}, "
                         f"version {config.get('version')!r}); LoRA adapters load with lora_io.load_adapter")
    return config


def load_prompt(base: GPTModel, path, check_fingerprint: bool = True) -> VirtualTokenModel:
    """``base`` (frozen) wrapped with the prompt saved in ``path``, in eval mode; nothing trains.

    Everything is checked before ``base`` changes: the method, the width, layers and
    heads the prompt was made for, and the base fingerprint (``BaseMismatchError``).
    """
    config = read_prompt_config(path)
    cfg = base.cfg
    found = dict(emb_dim=cfg.emb_dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads)
    wanted = {key: config[key] for key in found}
    if config["method"] in ("prompt-tuning", "p-tuning"):  # a soft prompt depends on the width alone
        found, wanted = {"emb_dim": found["emb_dim"]}, {"emb_dim": wanted["emb_dim"]}
    if found != wanted:
        raise ValueError(f"the prompt in {path} was made for a model with {wanted}, this one has {found}; "
                         f"it was trained on {config['base_model']}")
    if check_fingerprint:
        check_base_fingerprint(base, config, path, what="prompt")
    tensors = load_file(str(Path(path) / ADAPTER_WEIGHTS))
    n, saves = config["num_virtual_tokens"], config["modules_to_save"]
    with torch.random.fork_rng(devices=[]):  # the placeholders' random start must not move the caller's seed
        if config["method"] == "prompt-tuning":
            model = apply_prompt_tuning(base, n, init_ids=[0] * n, modules_to_save=saves)
        elif config["method"] == "p-tuning":
            model = apply_p_tuning(base, n, config["encoder"], config["hidden"], modules_to_save=saves)
        else:
            model = apply_prefix_tuning(base, n, hidden=config["hidden"], modules_to_save=saves)
    prefix = ENCODER_PREFIX[config["method"]] + "."
    model.prompt.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    for name, module in saved_modules(base).items():
        module.copies["default"].load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items()
                                                  if k.startswith(name + ".")})
    model.requires_grad_(False)
    return model.eval()


# ----------------------------------------------------------------------------- export to Hugging Face peft

def export_prompt_peft(model: VirtualTokenModel, out_dir, base_model_name_or_path: str = "gpt2") -> Path:
    """Write ``model``'s prompt as a peft ``PromptTuningConfig`` / ``PrefixTuningConfig`` / ``PromptEncoderConfig``
    adapter.

    ``peft.PeftModel.from_pretrained(hf_model, out_dir)`` then gives our logits, where
    ``hf_model`` is the transformers GPT-2 holding the same base weights: a
    ``GPT2LMHeadModel`` (peft's logits then include the ``n`` virtual positions first
    for prompt tuning: ours are its ``[:, n:]``) or a ``GPT2ForSequenceClassification``
    for a classification head, which is exported as ``score`` with its bias folded
    into ``ln_f``'s shift (as the LoRA export does). A prefix is exported as the keys
    and values themselves (``prefix_projection=False``): the MLP, if any, is applied
    first, exactly as peft does when it saves a trained prefix. P-tuning, likewise, is
    exported as its encoder's output (what peft saves and, in inference mode, reads).

    Caveats of the classifier export (a warning says the second one):

    - ``GPT2ForSequenceClassification`` fed ``inputs_embeds`` (what peft's prompt
      tuning does) cannot find the padding and reads the *last position*. That equals
      ours for a message without padding, or for a run padded the book's way (read at
      the last position too); a dynamic-padding run reads each message at its last real
      token, so give peft the message unpadded.
    - A prefix-tuned classifier cannot run in peft's ``PeftModelForSequenceClassification``
      with the installed versions (peft passes ``past_key_values``, which transformers 5
      names ``cache``). The files are right: the tests feed peft's own prefix
      (``peft_model.get_prompt``) as the cache of peft's wrapped model and get our logits,
      and a language-model prefix runs in ``PeftModelForCausalLM`` unchanged.
    """
    if not isinstance(model, VirtualTokenModel):
        raise TypeError(f"export_prompt_peft exports a prompt- or prefix-tuned model, found {type(model).__name__}")
    base, cfg = model.base, model.base.cfg
    head_weight, head_bias = effective_head(base, "default")
    classifier = head_weight.shape[0] != cfg.vocab_size
    if not classifier and head_bias is not None:
        raise ValueError("the output head has a bias, which GPT2LMHeadModel's lm_head lacks: it cannot be exported")
    with torch.no_grad():
        embeddings = model.prompt.flat() if isinstance(model, PrefixTunedGPT) else model.prompt.vectors()
    tensors = {"prompt_embeddings": embeddings}
    config = {
        "peft_type": PEFT_TYPES[model.method], "task_type": "SEQ_CLS" if classifier else "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path, "num_virtual_tokens": model.num_virtual_tokens,
        "token_dim": cfg.emb_dim, "num_transformer_submodules": 1, "num_attention_heads": cfg.n_heads,
        "num_layers": cfg.n_layers, "inference_mode": True, "modules_to_save": None,
    }
    if isinstance(model, PrefixTunedGPT):
        config.update(prefix_projection=False, encoder_hidden_size=cfg.emb_dim)
    elif isinstance(model, PTunedGPT):
        config.update(encoder_reparameterization_type=model.prompt.encoder_type.upper(),
                      encoder_hidden_size=model.prompt.hidden, encoder_num_layers=model.prompt.num_layers,
                      encoder_dropout=0.0)
    else:
        config.update(prompt_tuning_init="RANDOM")
    if classifier:
        tensors["base_model.score.weight"] = head_weight
        config["modules_to_save"] = ["score"]
        if head_bias is not None:
            shift = base_state_dict(base)["final_norm.shift"]
            tensors["base_model.transformer.ln_f.weight"] = base_state_dict(base)["final_norm.scale"]
            tensors["base_model.transformer.ln_f.bias"] = fold_head_bias(head_weight, head_bias, shift)
            config["modules_to_save"].append("transformer.ln_f")
    if classifier and isinstance(model, PrefixTunedGPT):
        warnings.warn("a prefix-tuned classifier's export may not run in peft's PeftModelForSequenceClassification "
                      "(with transformers 5 it fails on past_key_values); see export_prompt_peft for a way round",
                      stacklevel=2)
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    write_adapter_files(out_dir, tensors, config, "pt")  # transformers wants the "pt" format
    return Path(out_dir)
