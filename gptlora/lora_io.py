"""LoRA adapters on disk: our small adapter files, and the export to Hugging Face ``peft``.

An adapter directory holds ``adapter_model.safetensors`` (the ``A``/``B`` matrices
and the weights of ``modules_to_save``, nothing of the base) and
``adapter_config.json`` (ranks, alphas, scaling rule, targets, a description of the
base and a SHA-256 fingerprint of its weights). The same two file names are what
``peft`` uses, so ``export_peft`` writes them in peft's own format instead.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .atomic import replace_atomically, write_json
from .lora import (LinearWithLoRA, ModuleToSave, active_adapter, adapter_names, check_adapter_name, inject_adapter,
                   linear_layer_names, lora_layers, lora_wrappers, mark_trainable, saved_modules, set_adapter)
from .hf_layout import BLOCK_RENAMES, QKV, TOP_RENAMES
from .model import GPTConfig
from .quantization import QuantizedLinear
from .tensor_hash import tensors_sha256

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT = "gptlora-lora-adapter"
# Version 2: the base fingerprint is tensor_hash.tensors_sha256 (version 1 hashed another byte layout).
VERSION = 2


class BaseMismatchError(ValueError):
    """An adapter was loaded onto base weights other than those it was trained on.

    ``mismatch`` says which adapter and which fingerprints, ``remedy`` what to do; a caller
    that knows a better remedy for its users (the command line) keeps ``mismatch`` and replaces it.
    """

    def __init__(self, mismatch: str, remedy: str):
        super().__init__(f"{mismatch}; {remedy}")
        self.mismatch, self.remedy = mismatch, remedy

    def __reduce__(self):  # pickles (for torch.distributed) with both parts
        return type(self), (self.mismatch, self.remedy)


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    with replace_atomically(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


# ----------------------------------------------------------------------------- the base model

def base_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict under its original names: LoRA and module copies left out.

    ``W_query.linear.weight`` reads ``W_query.weight`` again (the unmerged weight even
    while an adapter is merged), ``out_head.original.weight`` reads ``out_head.weight``.
    """
    wrappers = lora_wrappers(model)
    state = {}
    for key, tensor in model.state_dict().items():
        owner = next((name for name in wrappers if key.startswith(name + ".")), None)
        if owner is None:
            state[key] = tensor
            continue
        part, _, param = key[len(owner) + 1:].partition(".")
        wrapper = wrappers[owner]
        if part in ("linear", "original"):
            if isinstance(wrapper, LinearWithLoRA) and param == "weight":
                tensor = wrapper.base_weight().detach()
            state[f"{owner}.{param}"] = tensor
    return state


def base_fingerprint(model: torch.nn.Module) -> str:
    """``"sha256:<hex>"`` over the names, dtypes, shapes and bytes of the base weights.

    Two bases agree only if every weight is bitwise equal, so an adapter is never
    silently applied to other weights (another checkpoint, another random head).
    """
    return "sha256:" + tensors_sha256(base_state_dict(model))


def describe_base(model: torch.nn.Module) -> dict:
    """A short description for humans: class, config (if the model has one) and parameter count (a
    quantized layer counts the weights it stands for, ``out * in``, not its codes and scales)."""
    state = base_state_dict(model)
    unique = {t.data_ptr(): t.numel() for t in state.values()}  # a tied head is counted once
    weights = 0
    for layer in (m for m in model.modules() if isinstance(m, QuantizedLinear)):
        held = [unique.pop(b.data_ptr(), None) is not None for b in layer.buffers()]  # its codes and scales out
        weights += layer.in_features * layer.out_features if any(held) else 0
    config = getattr(model, "cfg", None)
    return {"class": type(model).__name__, "config": config.to_dict() if hasattr(config, "to_dict") else None,
            "parameters": sum(unique.values()) + weights}


# ----------------------------------------------------------------------------- our adapter files

def adapter_config(model: torch.nn.Module, adapter_name: str) -> dict:
    """The ``adapter_config.json`` contents for adapter ``adapter_name`` of ``model``."""
    layers = {n: layer.lora[adapter_name] for n, layer in lora_layers(model).items() if adapter_name in layer.lora}
    saves = [n for n, module in saved_modules(model).items() if adapter_name in module.copies]
    if not layers and not saves:
        raise ValueError(f"no adapter named {adapter_name!r}; this model has {adapter_names(model) or 'none'}")
    rules = {(lora.scaling_rule, lora.dropout_p) for lora in layers.values()}
    if len(rules) > 1:
        raise ValueError(f"adapter {adapter_name!r} mixes scaling rules or dropouts {sorted(rules)}; "
                         "one adapter file holds one of each")
    scaling, dropout = rules.pop() if rules else ("alpha/rank", 0.0)
    rank = Counter(lora.rank for lora in layers.values()).most_common(1)[0][0] if layers else None
    alpha = Counter(lora.alpha for lora in layers.values()).most_common(1)[0][0] if layers else None
    return {
        "format": FORMAT, "version": VERSION, "adapter_name": adapter_name,
        "rank": rank, "alpha": alpha, "scaling": scaling, "dropout": dropout,
        "target_modules": list(layers),
        "rank_pattern": {n: lora.rank for n, lora in layers.items() if lora.rank != rank},
        "alpha_pattern": {n: lora.alpha for n, lora in layers.items() if lora.alpha != alpha},
        "modules_to_save": saves,
        "base_model": describe_base(model),
        "base_fingerprint": base_fingerprint(model),
    }


def adapter_tensors(model: torch.nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """What the adapter file stores: ``<layer>.A`` ``[in, r]``, ``<layer>.B`` ``[r, out]``, module copies."""
    tensors = {}
    for name, layer in lora_layers(model).items():
        if adapter_name in layer.lora:
            tensors[f"{name}.A"] = layer.lora[adapter_name].A
            tensors[f"{name}.B"] = layer.lora[adapter_name].B
    for name, module in saved_modules(model).items():
        if adapter_name in module.copies:
            tensors.update({f"{name}.{k}": v for k, v in module.copies[adapter_name].state_dict().items()})
    return {k: v.detach().contiguous().clone() for k, v in tensors.items()}


def save_adapter(model: torch.nn.Module, path, adapter_name: str | None = None, verbose: bool = True) -> dict:
    """Write adapter ``adapter_name`` (default: the active one) to directory ``path``.

    Returns ``{"path", "parameters", "bytes"}`` (bytes of both files) and prints them
    unless ``verbose=False``.
    """
    adapter_name = adapter_name or active_adapter(model)
    info = write_adapter_files(path, adapter_tensors(model, adapter_name), adapter_config(model, adapter_name), FORMAT)
    if verbose:
        print(f"saved adapter {adapter_name!r} to {path}: {info['parameters']:,} parameters, {info['bytes']:,} bytes")
    return info


def write_adapter_files(path, tensors: dict[str, torch.Tensor], config: dict, file_format: str) -> dict:
    """Write the two files of an adapter directory (each atomically); ``{"path", "parameters", "bytes"}``."""
    path = Path(path)
    _write_safetensors(path / ADAPTER_WEIGHTS, tensors, {"format": file_format})
    write_json(config, path / ADAPTER_CONFIG)
    return {"path": str(path), "parameters": sum(t.numel() for t in tensors.values()),
            "bytes": sum((path / f).stat().st_size for f in (ADAPTER_WEIGHTS, ADAPTER_CONFIG))}


def check_base_fingerprint(model: torch.nn.Module, config: dict, path, what: str = "adapter") -> None:
    """``BaseMismatchError`` unless ``model``'s base weights are the ones ``config`` was trained on."""
    fingerprint = base_fingerprint(model)
    if fingerprint != config["base_fingerprint"]:
        raise BaseMismatchError(f"the {what} in {path} was trained on other base weights (fingerprint "
                                f"{config['base_fingerprint'][:19]}..., this model {fingerprint[:19]}...; "
                                f"trained on {config['base_model']})",
                                "load the same base (checkpoint and head), or pass check_fingerprint=False if the "
                                "difference is intended")


def read_adapter_config(path) -> dict:
    """The config of the adapter directory ``path``, checked to be ours."""
    file = Path(path) / ADAPTER_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {path}; expected a directory written by save_adapter")
    config = json.loads(file.read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{file} is not a gptlora adapter (format {config.get('format')!r}, expected {FORMAT!r}); "
                         "a peft adapter loads with peft.PeftModel.from_pretrained")
    if config.get("version") != VERSION:
        raise ValueError(f"{file} is adapter format version {config.get('version')!r}; this gptlora reads version "
                         f"{VERSION} (its base fingerprint is computed differently): save the adapter again "
                         "with this version, or use the gptlora version that wrote it")
    return config


def load_adapter(model: torch.nn.Module, path, adapter_name: str | None = None,
                 check_fingerprint: bool = True, trainable: bool = False) -> str:
    """Add the adapter saved in ``path`` to ``model`` under ``adapter_name`` and make it active.

    ``model`` is the base (with or without other adapters; it is never reloaded). The
    layer shapes and the base fingerprint must match what the adapter was trained on;
    ``check_fingerprint=False`` skips the latter when a different base is intended.
    The adapter's parameters are frozen unless ``trainable=True``. Returns its name.
    """
    config = read_adapter_config(path)
    adapter_name = adapter_name or config["adapter_name"]
    check_adapter_name(adapter_name)
    if adapter_name in adapter_names(model):
        raise ValueError(f"this model already has an adapter named {adapter_name!r}; pass another adapter_name")
    tensors = load_file(str(Path(path) / ADAPTER_WEIGHTS))
    _check_shapes(model, config, tensors)
    if check_fingerprint:
        check_base_fingerprint(model, config, path)
    targets = {name: (config["rank_pattern"].get(name, config["rank"]), config["alpha_pattern"].get(name, config["alpha"]))
               for name in config["target_modules"]}
    inject_adapter(model, adapter_name, targets, config["modules_to_save"], config["dropout"], config["scaling"])
    layers, modules = lora_layers(model), saved_modules(model)
    with torch.no_grad():
        for name in targets:
            layers[name].lora[adapter_name].A.copy_(tensors[f"{name}.A"])
            layers[name].lora[adapter_name].B.copy_(tensors[f"{name}.B"])
    for name in config["modules_to_save"]:
        prefix = name + "."
        modules[name].copies[adapter_name].load_state_dict(
            {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    set_adapter(model, adapter_name)
    if trainable:
        mark_trainable(model, adapter_name)
    else:
        model.requires_grad_(False)
    return adapter_name


def _check_shapes(model: torch.nn.Module, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Raise a clear error if the adapter's layers or shapes do not fit ``model``."""
    linears = set(linear_layer_names(model))
    for name in config["target_modules"]:
        if name not in linears:
            raise ValueError(f"the adapter targets layer {name!r}, which this model lacks; it was trained for "
                             f"{config['base_model']}")
        layer = model.get_submodule(name)
        rank = config["rank_pattern"].get(name, config["rank"])
        expected = {f"{name}.A": (layer.in_features, rank), f"{name}.B": (rank, layer.out_features)}
        for key, shape in expected.items():
            found = tuple(tensors[key].shape) if key in tensors else "nothing"
            if found != shape:
                raise ValueError(f"adapter tensor {key}: expected shape {shape} for this model, found {found}; "
                                 f"the adapter was trained for {config['base_model']}")
    for name in config["modules_to_save"]:
        module = model.get_submodule(name)
        module = module.original if isinstance(module, ModuleToSave) else module
        for key, tensor in module.state_dict().items():
            found = tensors.get(f"{name}.{key}")
            if found is None or found.shape != tensor.shape:
                raise ValueError(f"adapter tensor {name}.{key}: expected shape {tuple(tensor.shape)}, found "
                                 f"{'nothing' if found is None else tuple(found.shape)}")


# ----------------------------------------------------------------------------- export to Hugging Face peft

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


def _fuse_qkv(loras: list, width: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One LoRA on the fused ``c_attn`` from separate query/key/value LoRAs (any of them None).

    Exact: stacking the A's gives rank r_q + r_k + r_v, and a block-diagonal B sends
    each part only to its own third of the output. A part whose scaling differs from
    the first one's has the ratio folded into its B block (1.0 when they agree).
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
    return lora_a, lora_b, scaling


def _effective_head(model, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output head's weight ``[C, D]`` (adapter merged in) and bias ``[C]`` or None."""
    head = model.out_head
    if isinstance(head, ModuleToSave):
        head = head.copies[adapter_name] if adapter_name in head.copies else head.original
    if isinstance(head, LinearWithLoRA):
        weight = head.base_weight().detach()
        if adapter_name in head.lora:
            weight = weight + head.lora[adapter_name].delta_weight().detach()
        bias = head.linear.bias
    else:
        weight, bias = head.weight.detach(), head.bias
    return weight, None if bias is None else bias.detach()


def _fold_head_bias(weight: torch.Tensor, bias: torch.Tensor, ln_shift: torch.Tensor) -> torch.Tensor:
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
    head_weight, head_bias = _effective_head(model, adapter_name)
    classifier = head_weight.shape[0] != cfg.vocab_size
    head = "score" if classifier else "lm_head"

    factors = {}  # peft module name -> (lora_A [r, in], lora_B [out, r], scaling)
    for i in range(cfg.n_layers):
        qkv = [layers.get(f"trf_blocks.{i}.{part}") for part in QKV]
        if any(lora is not None for lora in qkv):
            factors[f"transformer.h.{i}.attn.c_attn"] = _fuse_qkv(qkv, cfg.emb_dim)
    for name, lora in layers.items():
        mapped = _hf_param(name + ".weight", head)
        if mapped is not None and not (classifier and name == "out_head"):
            factors[mapped[0].removesuffix(".weight")] = (*_lora_factors(lora), lora.scaling)

    saved_params = {}  # Hugging Face parameter name -> tensor, for modules_to_save
    for name, module in saves.items():
        if classifier and name == "out_head":
            continue  # exported below as "score", from _effective_head
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
        saved_params["transformer.ln_f.bias"] = _fold_head_bias(head_weight, head_bias, shift)

    use_rslora = next(iter(layers.values())).scaling_rule == "alpha/sqrt(rank)"
    ranks = {m: a.shape[0] for m, (a, _, _) in factors.items()}
    alphas = {m: _peft_alpha(s, ranks[m], use_rslora) for m, (_, _, s) in factors.items()}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA", "task_type": "SEQ_CLS" if classifier else "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank, "lora_alpha": alpha, "use_rslora": use_rslora,
        "lora_dropout": next(iter(layers.values())).dropout_p,
        "target_modules": list(factors), "fan_in_fan_out": True, "bias": "none",
        "rank_pattern": {m: r for m, r in ranks.items() if r != rank},
        "alpha_pattern": {m: a for m, a in alphas.items() if a != alpha},
        "modules_to_save": sorted({p.rsplit(".", 1)[0] for p in saved_params}) or None,
        "init_lora_weights": True, "inference_mode": True,
    }
    tensors = {}
    for module, (lora_a, lora_b, _) in factors.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = lora_a
        tensors[f"base_model.model.{module}.lora_B.weight"] = lora_b
    tensors.update({f"base_model.model.{k}": v for k, v in saved_params.items()})
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    out_dir = Path(out_dir)
    _write_safetensors(out_dir / ADAPTER_WEIGHTS, tensors, {"format": "pt"})  # transformers wants "format"
    write_json(config, out_dir / ADAPTER_CONFIG)
    return out_dir


def _peft_alpha(scaling: float, rank: int, use_rslora: bool) -> float:
    """peft's ``lora_alpha`` giving ``scaling`` at ``rank``: peft scales by alpha/r (alpha/sqrt(r) with rsLoRA)."""
    alpha = scaling * (math.sqrt(rank) if use_rslora else rank)
    return int(round(alpha)) if math.isclose(alpha, round(alpha), rel_tol=0, abs_tol=1e-9) else alpha
