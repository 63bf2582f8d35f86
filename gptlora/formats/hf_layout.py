"""GPT-2's weights under two sets of names: Hugging Face's layout and ours.

Hugging Face (and OpenAI's original release) store GPT-2 with three quirks a
loader must undo, each of which fails silently if missed:

1. Linear layers are ``Conv1D`` modules whose weight is ``[in, out]``, the
   transpose of ``nn.Linear``'s ``[out, in]``: every one is transposed.
2. Query, key and value are one fused ``c_attn`` (``[D, 3D]``); we keep three
   separate ``nn.Linear`` layers, so it is split in three along the output.
3. The output head is the token embedding (weight tying): we tie the tensors,
   we do not copy them.

This module holds the mapping alone (pure renames and reshapes, no files),
described once in :func:`hf_sources`: :mod:`gptlora.pretrained` reads and writes
checkpoints with it, and :mod:`gptlora.formats.lora_io` names LoRA adapters the way
``peft`` does with its tables.
"""

from __future__ import annotations

import torch

from ..model import GPTConfig, GPTModel

# Per-block names: ours -> (Hugging Face's name inside "h.<i>.", whether it is a Conv1D
# weight to transpose), for the tensors that map one to one. q/k/v are not here: see QKV.
BLOCK_RENAMES = {
    "norm1.scale": ("ln_1.weight", False),
    "norm1.shift": ("ln_1.bias", False),
    "att.out_proj.weight": ("attn.c_proj.weight", True),
    "att.out_proj.bias": ("attn.c_proj.bias", False),
    "norm2.scale": ("ln_2.weight", False),
    "norm2.shift": ("ln_2.bias", False),
    "ff.layers.0.weight": ("mlp.c_fc.weight", True),
    "ff.layers.0.bias": ("mlp.c_fc.bias", False),
    "ff.layers.2.weight": ("mlp.c_proj.weight", True),
    "ff.layers.2.bias": ("mlp.c_proj.bias", False),
}
TOP_RENAMES = {
    "tok_emb.weight": "wte.weight",
    "pos_emb.weight": "wpe.weight",
    "final_norm.scale": "ln_f.weight",
    "final_norm.shift": "ln_f.bias",
}
# Our three per-block layers that Hugging Face fuses into one "attn.c_attn", in its order.
QKV = ("att.W_query", "att.W_key", "att.W_value")


def config_from_hf(hf_config: dict) -> GPTConfig:
    """Our config from a Hugging Face GPT-2 ``config.json`` (as a dict).

    GPT-2 checkpoints always carry query/key/value biases, so ``qkv_bias=True``;
    dropout is 0 because pretrained models are loaded for inference or fine-tuning
    recipes that set their own.
    """
    unsupported = {
        "activation_function": (hf_config.get("activation_function", "gelu_new"), {"gelu_new", "gelu_pytorch_tanh"}),
        "n_inner": (hf_config.get("n_inner"), {None, 4 * hf_config.get("n_embd", 0)}),
        "layer_norm_epsilon": (hf_config.get("layer_norm_epsilon", 1e-5), {1e-5}),
    }
    for field, (found, supported) in unsupported.items():
        if found not in supported:  # GPTModel hard-wires these; loading anyway would give wrong outputs
            raise ValueError(f"config.json has {field}={found!r}; GPTModel supports only {sorted(map(str, supported))}")
    for name in ("vocab_size", "n_positions", "n_embd", "n_head", "n_layer"):
        value = hf_config.get(name)
        if name in hf_config and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"config.json has {name}={value!r}: expected a whole number of at least 1, as a "
                             "Hugging Face GPT2Config writes it")
    try:
        return GPTConfig(
            vocab_size=hf_config["vocab_size"],
            context_length=hf_config["n_positions"],
            emb_dim=hf_config["n_embd"],
            n_heads=hf_config["n_head"],
            n_layers=hf_config["n_layer"],
            drop_rate=0.0,
            qkv_bias=True,
        )
    except KeyError as missing:
        raise ValueError(
            f"config.json lacks the GPT-2 field {missing}; expected n_embd, n_layer, n_head, n_positions "
            "and vocab_size, as a Hugging Face GPT2Config writes them"
        ) from None


def config_to_hf(cfg: GPTConfig, tie_word_embeddings: bool = True, pad_token_id: int | None = None) -> dict:
    """A Hugging Face ``GPT2Config``-compatible dict for ``cfg`` (what ``config.json`` holds).

    ``pad_token_id`` (GPT-2 has none) lets ``GPT2ForSequenceClassification`` classify a padded
    batch: it reads each row at its last token that is not padding, and without one it refuses
    batches of more than one row."""
    padding = {} if pad_token_id is None else {"pad_token_id": pad_token_id}
    return {**padding, 
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_ctx": cfg.context_length,
        "n_embd": cfg.emb_dim,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": cfg.drop_rate,
        "embd_pdrop": cfg.drop_rate,
        "attn_pdrop": cfg.drop_rate,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "tie_word_embeddings": tie_word_embeddings,
    }


def hf_sources(cfg: GPTConfig, tie_word_embeddings: bool = True) -> dict[str, tuple[tuple[str, ...], bool]]:
    """Every tensor of Hugging Face's ``GPT2LMHeadModel`` and what it is made of, in our names.

    Hugging Face name (``transformer.`` prefix, as ``save_pretrained`` writes it) ->
    (our tensors, concatenated along dim 0 to make it; whether the result is then
    transposed). One source for a renamed tensor, three (``QKV``) for a fused ``c_attn``.
    Embeddings first, then block by block, then ``lm_head.weight`` unless the head is
    tied: a tied head is the embedding, which Hugging Face stores once, as ``wte``.
    The one description of the layout: the export, the import and the expected
    shapes all read it.
    """
    if not cfg.qkv_bias:
        raise ValueError("Hugging Face's GPT-2 always has query/key/value biases; this model has qkv_bias=False. "
                         "Build it with qkv_bias=True (zero biases keep its outputs) to use Hugging Face's layout")
    sources = {f"transformer.{hf_name}": ((our_name,), False) for our_name, hf_name in TOP_RENAMES.items()}
    for i in range(cfg.n_layers):
        hf_prefix, our_prefix = f"transformer.h.{i}.", f"trf_blocks.{i}."
        for our_name, (hf_name, transpose) in BLOCK_RENAMES.items():
            sources[hf_prefix + hf_name] = ((our_prefix + our_name,), transpose)
        # c_attn.weight is [D, 3D] = [in, out]: q, k, v weights stacked on their output, then transposed.
        sources[hf_prefix + "attn.c_attn.weight"] = (tuple(f"{our_prefix}{n}.weight" for n in QKV), True)
        sources[hf_prefix + "attn.c_attn.bias"] = (tuple(f"{our_prefix}{n}.bias" for n in QKV), False)
    if not tie_word_embeddings:
        sources["lm_head.weight"] = (("out_head.weight",), False)
    return sources


def hf_to_gptlora(hf_state: dict, cfg: GPTConfig, tie_word_embeddings: bool = True) -> dict:
    """Rename and reshape a Hugging Face GPT-2 state dict (no ``transformer.`` prefix) to ours.

    With ``tie_word_embeddings`` (GPT-2's own setting) the result has no
    ``out_head.weight``: the caller ties the head to ``tok_emb.weight``. Only keys
    present in ``hf_state`` are mapped; the caller accounts for missing and
    unexpected ones.
    """
    ours = {}
    for hf_name, (our_names, transpose) in hf_sources(cfg, tie_word_embeddings).items():
        tensor = hf_state.get(hf_name.removeprefix("transformer."))
        if tensor is None:
            continue
        tensor = tensor.t() if transpose else tensor
        parts = split_fused(tensor, hf_name) if len(our_names) > 1 else (tensor,)
        ours.update(zip(our_names, parts))
    return ours


def split_fused(tensor: torch.Tensor, key: str) -> tuple[torch.Tensor, ...]:
    """Split a fused q/k/v tensor ``[3D, ...]`` into three ``[D, ...]`` parts."""
    if tensor.shape[0] % 3 != 0:
        raise ValueError(f"{key}: expected a fused query/key/value tensor whose size is a multiple of 3, "
                         f"found shape {list(tensor.shape)}")
    return tensor.chunk(3, dim=0)


def gptlora_to_hf(model: GPTModel) -> dict:
    """Our model's weights in Hugging Face's ``GPT2LMHeadModel`` layout (``transformer.`` prefix).

    Conv1D weights are transposed back and q/k/v fused into ``c_attn``; a tied head
    is left to ``wte``. Tensors are made contiguous copies, as safetensors requires.
    """
    state, hf = model.state_dict(), {}
    for hf_name, (our_names, transpose) in hf_sources(model.cfg, model.weights_tied).items():
        tensor = torch.cat([state[name] for name in our_names])
        hf[hf_name] = (tensor.t() if transpose else tensor).detach().contiguous()
    return hf  # torch.cat copied every tensor already: nothing here shares the model's storage


def hf_shapes(model: GPTModel) -> dict[str, tuple[int, ...]]:
    """The shape of each tensor :func:`gptlora_to_hf` would return for ``model``, without computing one.

    Shape arithmetic only, so it suits a model built on the ``meta`` device: a
    ``torch.cat`` there would run PyTorch's Python meta kernels, whose first use
    imports its compiler stack (about 2 s in a fresh process).
    """
    ours = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    shapes = {}
    for hf_name, (our_names, transpose) in hf_sources(model.cfg, model.weights_tied).items():
        shape = (sum(ours[name][0] for name in our_names), *ours[our_names[0]][1:])
        shapes[hf_name] = shape[::-1] if transpose else shape
    return shapes
