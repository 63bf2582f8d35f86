"""LoRA adapters exported to Hugging Face ``peft``, for ``transformers``' GPT-2.

``export_peft`` writes a ``GPTModel``'s adapter as peft's own ``adapter_model.safetensors``
and ``adapter_config.json``, so ``peft.PeftModel.from_pretrained`` reproduces our logits
(tested in ``tests/test_lora_io.py``). Our own adapter files live in ``lora_io.py``; the
prompt and prefix export (``prompt_tuning_io.py``) reuses the head helpers here.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import torch

from ..infra.atomic import write_json
from .hf_layout import BLOCK_RENAMES, QKV, TOP_RENAMES
from ..lora import LinearWithLoRA, ModuleToSave, active_adapter, adapter_names, lora_layers, saved_modules
from .lora_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, write_safetensors, base_state_dict
from ..model import GPTConfig
from ..quantization import QuantizedLinear


def _hf_param(our_name: str, head: str) -> tuple[str, bool] | None:
    """Hugging Face's name for one of our GPTModel parameters, and whether it is a transposed Conv1D weight.

    None for query/key/value, which Hugging Face fuses into ``c_attn``.
    """
    if our_name.startswith("out_head."):
        return head + our_name[len("out_head"):], False
    if our_name in TOP_RENAMES:
        return "transformer." + TOP_RENAMES[our_name], False
    block, _, rest = our_name.partition(".")[2].partition(".")
    if our_name.startswith("trf_blocks.") and rest in BLOCK_RENAMES:
        hf_name, transposed = BLOCK_RENAMES[rest]
        return f"transformer.h.{block}.{hf_name}", transposed
    return None


def _lora_factors(lora) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's ``lora_A.weight`` ``[r, in]`` and ``lora_B.weight`` ``[out, r]``: our A and B transposed."""
    return lora.A.detach().T, lora.B.detach().T


def _base_weight(model, name: str) -> torch.Tensor:
    """The base weight ``[out, in]`` of linear layer ``name``, wrapped or not (unmerged)."""
    layer = model.get_submodule(name)
    return (layer.base_weight() if isinstance(layer, LinearWithLoRA) else layer.weight).detach()


def _fuse_qkv(loras: list, width: int, base_weights: list) -> tuple:
    """One LoRA on the fused ``c_attn`` from separate query/key/value LoRAs (any of them None).

    Exact: stacking the A's gives rank r_q + r_k + r_v, and a block-diagonal B sends
    each part only to its own third of the output. A part whose scaling differs from
    the first one's has the ratio folded into its B block (1.0 when they agree).
    DoRA's norm is one per output unit, so each third keeps its own magnitude; a part
    without an adapter gets its base weight's row norms (``m / ||W|| = 1``: unchanged).
    Returns ``(lora_A [sum r, D], lora_B [3D, sum r], scaling, magnitude [3D] or None)``.
    """
    present = [(slot, lora) for slot, lora in enumerate(loras) if lora is not None]
    scaling = present[0][1].scaling
    lora_a = torch.cat([_lora_factors(lora)[0] for _, lora in present])  # [sum r, D]
    lora_b = lora_a.new_zeros(3 * width, lora_a.shape[0])  # [3D, sum r]
    column = 0
    for slot, lora in present:
        block = _lora_factors(lora)[1]
        lora_b[slot * width:(slot + 1) * width, column:column + lora.rank] = block * (lora.scaling / scaling)
        column += lora.rank
    magnitude = None
    if present[0][1].use_dora:
        magnitude = torch.cat([lora.magnitude.detach() if lora is not None else torch.linalg.norm(weight, dim=1)
                               for lora, weight in zip(loras, base_weights)])
    return lora_a, lora_b, scaling, magnitude


def effective_head(model, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output head's weight ``[C, D]`` (adapter merged in) and bias ``[C]`` or None."""
    head = model.out_head
    if isinstance(head, ModuleToSave):
        head = head.copies[adapter_name] if adapter_name in head.copies else head.original
    if isinstance(head, LinearWithLoRA):
        weight = head.base_weight().detach()
        if adapter_name in head.lora:
            with torch.no_grad():
                weight = head.lora[adapter_name].adapted_weight(weight)
        bias = head.linear.bias
    else:
        weight, bias = head.weight.detach(), head.bias
    return weight, None if bias is None else bias.detach()


def fold_head_bias(weight: torch.Tensor, bias: torch.Tensor, ln_shift: torch.Tensor) -> torch.Tensor:
    """A final-LayerNorm shift ``beta'`` with ``W beta' = W beta + b``: the head's bias moved into ln_f.

    The head sees only ``ln_f``'s output, so adding ``delta`` (``W delta = b``, the
    least-squares solution) to its shift reproduces a bias-free head plus ``b``.
    Possible exactly when ``b`` lies in the column space of ``W`` (a ``[2, 768]`` head: always).
    """
    delta = torch.linalg.lstsq(weight.double(), bias.double().unsqueeze(1)).solution.squeeze(1)
    residual = float((weight.double() @ delta - bias.double()).abs().max())
    if residual > 1e-6 * max(1.0, float(bias.abs().max())):
        raise ValueError("the head's bias cannot be exported: Hugging Face's GPT-2 heads have no bias and this "
                         f"bias is not reachable through the final LayerNorm (residual {residual:.2e})")
    return (ln_shift.double() + delta).to(ln_shift.dtype)


def export_peft(model, out_dir, adapter_name: str | None = None, base_model_name_or_path: str = "gpt2") -> Path:
    """Write adapter ``adapter_name`` of a ``GPTModel`` as a peft LoRA for Hugging Face GPT-2.

    ``peft.PeftModel.from_pretrained(hf_model, out_dir)`` then reproduces our logits,
    where ``hf_model`` is the transformers GPT-2 holding the same base weights: a
    ``GPT2LMHeadModel`` for a language-model head, a ``GPT2ForSequenceClassification``
    (``num_labels`` = our head's outputs) for a classification head.

    How it maps: q/k/v LoRAs become one LoRA on ``c_attn`` (rank r_q + r_k + r_v,
    exact, see ``_fuse_qkv``); every peft module gets the ``lora_alpha`` that gives our
    scaling (``scaling * r``, or ``scaling * sqrt(r)`` with rsLoRA), so different ranks
    go to ``rank_pattern``/``alpha_pattern``. A classification head is exported whole
    (as ``modules_to_save: score``, LoRA merged in); its bias, which ``score`` lacks, is
    folded into ``transformer.ln_f``'s shift (also saved). Cannot be exported: a
    language-model head with a bias, and modules_to_save holding q/k/v (a whole
    block), which peft could only save as part of ``c_attn``.
    """
    cfg = getattr(model, "cfg", None)
    if not isinstance(cfg, GPTConfig):
        raise TypeError(f"export_peft maps a GPTModel's layers to Hugging Face GPT-2; found {type(model).__name__}")
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise ValueError("this adapter was trained on a quantized base (QLoRA); peft would apply it to the "
                         "full-precision checkpoint, whose logits differ. Keep it in gptlora's format "
                         "(save_adapter), or train on a full-precision base to export")
    adapter_name = adapter_name or active_adapter(model)
    layers = {n: layer.lora[adapter_name] for n, layer in lora_layers(model).items() if adapter_name in layer.lora}
    saves = {n: module.copies[adapter_name] for n, module in saved_modules(model).items()
             if adapter_name in module.copies}
    if not layers:
        raise ValueError(f"adapter {adapter_name!r} has no LoRA layer to export; adapters: {adapter_names(model)}")
    head_weight, head_bias = effective_head(model, adapter_name)
    classifier = head_weight.shape[0] != cfg.vocab_size
    head = "score" if classifier else "lm_head"

    if len({lora.use_dora for lora in layers.values()}) > 1:
        raise ValueError(f"adapter {adapter_name!r} mixes LoRA and DoRA layers; peft's use_dora holds for a whole "
                         "adapter: export LoRA and DoRA as two adapters")
    use_dora = next(iter(layers.values())).use_dora
    factors = {}  # peft module name -> (lora_A [r, in], lora_B [out, r], scaling, DoRA magnitude [out] or None)
    for i in range(cfg.n_layers):
        qkv = [layers.get(f"trf_blocks.{i}.{part}") for part in QKV]
        if any(lora is not None for lora in qkv):
            weights = [_base_weight(model, f"trf_blocks.{i}.{part}") for part in QKV]
            factors[f"transformer.h.{i}.attn.c_attn"] = _fuse_qkv(qkv, cfg.emb_dim, weights)
    for name, lora in layers.items():
        mapped = _hf_param(name + ".weight", head)
        if mapped is not None and not (classifier and name == "out_head"):
            magnitude = lora.magnitude.detach() if use_dora else None
            factors[mapped[0].removesuffix(".weight")] = (*_lora_factors(lora), lora.scaling, magnitude)

    saved_params = {}  # Hugging Face parameter name -> tensor, for modules_to_save
    for name, module in saves.items():
        if classifier and name == "out_head":
            continue  # exported below as "score", from effective_head
        for key, tensor in module.state_dict().items():
            mapped = _hf_param(f"{name}.{key}", head)
            if mapped is None:
                raise ValueError(f"modules_to_save {name!r} holds {key!r}, which Hugging Face fuses into c_attn; "
                                 "it cannot be exported to peft (save_adapter keeps it)")
            saved_params[mapped[0]] = tensor.T if mapped[1] else tensor
    if classifier:
        saved_params["score.weight"] = head_weight
    elif head_bias is not None:
        raise ValueError("the output head has a bias, which GPT2LMHeadModel's lm_head lacks: it cannot be exported")
    if classifier and head_bias is not None:
        base = base_state_dict(model)
        saved_params.setdefault("transformer.ln_f.weight", base["final_norm.scale"])
        shift = saved_params.get("transformer.ln_f.bias", base["final_norm.shift"])
        saved_params["transformer.ln_f.bias"] = fold_head_bias(head_weight, head_bias, shift)

    use_rslora = next(iter(layers.values())).scaling_rule == "alpha/sqrt(rank)"
    ranks = {m: a.shape[0] for m, (a, _, _, _) in factors.items()}
    alphas = {m: _peft_alpha(s, ranks[m], use_rslora) for m, (_, _, s, _) in factors.items()}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA", "task_type": "SEQ_CLS" if classifier else "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank, "lora_alpha": alpha, "use_rslora": use_rslora, "use_dora": use_dora,
        "lora_dropout": next(iter(layers.values())).dropout_p,
        "target_modules": list(factors), "fan_in_fan_out": True, "bias": "none",
        "rank_pattern": {m: r for m, r in ranks.items() if r != rank},
        "alpha_pattern": {m: a for m, a in alphas.items() if a != alpha},
        "modules_to_save": sorted({p.rsplit(".", 1)[0] for p in saved_params}) or None,
        "init_lora_weights": True, "inference_mode": True,
    }
    tensors = {}
    for module, (lora_a, lora_b, _, magnitude) in factors.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = lora_a
        tensors[f"base_model.model.{module}.lora_B.weight"] = lora_b
        if magnitude is not None:  # peft's name for DoRA's m, saved without the adapter name
            tensors[f"base_model.model.{module}.lora_magnitude_vector"] = magnitude
    tensors.update({f"base_model.model.{k}": v for k, v in saved_params.items()})
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    out_dir = Path(out_dir)
    write_safetensors(out_dir / ADAPTER_WEIGHTS, tensors, {"format": "pt"})  # transformers wants "format"
    write_json(config, out_dir / ADAPTER_CONFIG)
    return out_dir


def _peft_alpha(scaling: float, rank: int, use_rslora: bool) -> float:
    """peft's ``lora_alpha`` giving ``scaling`` at ``rank``: peft scales by alpha/r (alpha/sqrt(r) with rsLoRA)."""
    alpha = scaling * (math.sqrt(rank) if use_rslora else rank)
    return int(round(alpha)) if math.isclose(alpha, round(alpha), rel_tol=0, abs_tol=1e-9) else alpha
