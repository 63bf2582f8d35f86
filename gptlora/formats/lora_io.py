"""LoRA adapters on disk: our small adapter files (the export to ``peft``: ``lora_peft_export.py``).

An adapter directory holds ``adapter_model.safetensors`` (the ``A``/``B`` matrices, DoRA's
magnitudes, and the weights of ``modules_to_save``, nothing of the base) and
``adapter_config.json`` (ranks, alphas, scaling rule, targets, a description of the
base and a SHA-256 fingerprint of its weights). The same two file names are what
``peft`` uses, so ``lora_peft_export.export_peft`` writes them in peft's own format instead.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..infra.atomic import replace_atomically, write_json
from ..lora import (LinearWithLoRA, ModuleToSave, active_adapter, adapter_names, check_adapter_name, inject_adapter,
                    linear_layer_names, lora_layers, lora_wrappers, mark_trainable, saved_modules, set_adapter)
from ..quantization import QuantizedLinear
from ..infra.tensor_hash import tensors_sha256

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


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write ``tensors`` with ``metadata`` to ``path`` atomically (temporary file, then rename)."""
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
    rules = {(lora.scaling_rule, lora.dropout_p, lora.use_dora) for lora in layers.values()}
    if len(rules) > 1:
        raise ValueError(f"adapter {adapter_name!r} mixes scaling rules, dropouts or LoRA with DoRA "
                         f"{sorted(rules)}; one adapter file holds one of each")
    scaling, dropout, use_dora = rules.pop() if rules else ("alpha/rank", 0.0, False)
    rank = Counter(lora.rank for lora in layers.values()).most_common(1)[0][0] if layers else None
    alpha = Counter(lora.alpha for lora in layers.values()).most_common(1)[0][0] if layers else None
    return {
        "format": FORMAT, "version": VERSION, "adapter_name": adapter_name,
        "rank": rank, "alpha": alpha, "scaling": scaling, "dropout": dropout, "use_dora": use_dora,
        "target_modules": list(layers),
        "rank_pattern": {n: lora.rank for n, lora in layers.items() if lora.rank != rank},
        "alpha_pattern": {n: lora.alpha for n, lora in layers.items() if lora.alpha != alpha},
        "modules_to_save": saves,
        "base_model": describe_base(model),
        "base_fingerprint": base_fingerprint(model),
    }


def adapter_tensors(model: torch.nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """What the adapter file stores: ``<layer>.A`` ``[in, r]``, ``<layer>.B`` ``[r, out]``, for DoRA
    ``<layer>.magnitude`` ``[out]``, and the module copies."""
    tensors = {}
    for name, layer in lora_layers(model).items():
        if adapter_name in layer.lora:
            tensors.update({f"{name}.{part}": t for part, t in layer_parameters(layer.lora[adapter_name]).items()})
    for name, module in saved_modules(model).items():
        if adapter_name in module.copies:
            tensors.update({f"{name}.{k}": v for k, v in module.copies[adapter_name].state_dict().items()})
    return {k: v.detach().contiguous().clone() for k, v in tensors.items()}


def layer_parameters(lora) -> dict[str, torch.Tensor]:
    """One adapter's tensors by their name in the file: ``A``, ``B``, and ``magnitude`` for DoRA."""
    return {"A": lora.A, "B": lora.B, **({"magnitude": lora.magnitude} if lora.use_dora else {})}


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
    write_safetensors(path / ADAPTER_WEIGHTS, tensors, {"format": file_format})
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
    inject_adapter(model, adapter_name, targets, config["modules_to_save"], config["dropout"], config["scaling"],
                   config.get("use_dora", False))  # files written before DoRA have no "use_dora"
    layers, modules = lora_layers(model), saved_modules(model)
    with torch.no_grad():
        for name in targets:
            for part, tensor in layer_parameters(layers[name].lora[adapter_name]).items():
                tensor.copy_(tensors[f"{name}.{part}"])
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
        if config.get("use_dora", False):
            expected[f"{name}.magnitude"] = (layer.out_features,)
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
