"""LoRA (Hu et al., 2021): low-rank adapters injected into the linear layers of any model.

``apply_lora(model, rank, alpha)`` swaps the chosen ``nn.Linear`` children for
``LinearWithLoRA`` wrappers and freezes everything else; the model definition stays
untouched. The maths (``LoRALayer``, ``LinearWithLoRA``) lives in ``lora_layer.py`` and
is re-exported here; saving and loading live in ``formats/lora_io.py``, the export to Hugging
Face ``peft`` in ``formats/lora_peft_export.py``.

Several adapters can live side by side: every wrapper keeps a dict of named
``LoRALayer``s and uses the *active* one, so switching adapters never reloads the base.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator

from torch import nn

from .lora_layer import (BASE, SCALINGS, LinearWithLoRA, LoRALayer, ModuleToSave, amplification_factor,
                         check_dora_base, check_lora_hyperparameters, lora_scaling, low_rank_approximation)
from .model import count_parameters
from .quantization import QuantizedLinear

__all__ = [
    "SCALINGS", "LoRALayer", "LinearWithLoRA", "ModuleToSave", "lora_scaling", "check_lora_hyperparameters",
    "amplification_factor", "lora_wrappers",
    "low_rank_approximation", "apply_lora", "inject_adapter", "linear_layer_names", "lora_layers",
    "saved_modules", "select_names", "adapter_parameters", "mark_trainable", "trainable_summary",
    "adapter_names", "set_adapter", "active_adapter", "disable_lora", "enable_lora", "lora_disabled",
    "merge_lora", "unmerge_lora", "unload_lora", "BASE", "set_row_adapters",
]

# ----------------------------------------------------------------------------- finding layers

def _walk(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` that does not look inside our wrappers (their insides are not targets)."""
    for name, child in module.named_children():
        full = prefix + name
        yield full, child
        if not isinstance(child, (LinearWithLoRA, ModuleToSave)):
            yield from _walk(child, full + ".")


def linear_layer_names(model: nn.Module) -> list[str]:
    """Names of the layers LoRA can target: every ``nn.Linear`` (or quantized one), wrapped or not."""
    return [name for name, m in _walk(model) if isinstance(m, (nn.Linear, QuantizedLinear, LinearWithLoRA))]


def lora_wrappers(model: nn.Module) -> dict[str, LinearWithLoRA | ModuleToSave]:
    """Every LoRA wrapper in ``model`` (``LinearWithLoRA`` and ``ModuleToSave``), by name."""
    return {name: m for name, m in _walk(model) if isinstance(m, (LinearWithLoRA, ModuleToSave))}


def lora_layers(model: nn.Module) -> dict[str, LinearWithLoRA]:
    """Every ``LinearWithLoRA`` in ``model``, by name."""
    return {name: m for name, m in _walk(model) if isinstance(m, LinearWithLoRA)}


def saved_modules(model: nn.Module) -> dict[str, ModuleToSave]:
    """Every ``ModuleToSave`` in ``model``, by name."""
    return {name: m for name, m in _walk(model) if isinstance(m, ModuleToSave)}


def _matches(name: str, pattern: str) -> bool:
    """A list entry matches a full name or a dotted suffix: "W_query" matches "trf_blocks.0.att.W_query"."""
    return name == pattern or name.endswith("." + pattern)


def select_names(names: list[str], selector, what: str) -> list[str]:
    """The ``names`` chosen by ``selector``: None (all), a list of full names or suffixes, or a regex.

    Every list entry, and a regex, must choose at least one name, else a ValueError
    lists the names that were available.
    """
    if selector is None:
        return list(names)
    if isinstance(selector, str):
        chosen = [n for n in names if re.fullmatch(selector, n)]
        unmatched = [selector] if not chosen else []
    else:
        selector = list(selector)
        chosen = [n for n in names if any(_matches(n, p) for p in selector)]
        unmatched = [p for p in selector if not any(_matches(n, p) for n in names)]
    if unmatched:
        raise ValueError(f"{what} {unmatched} matched nothing; {_names_in_short(names)}")
    return chosen


def _names_in_short(names: list[str]) -> str:
    """The names as their distinct suffixes after the block number (``att.W_query``, ...), and how to pick
    one block: 73 full names of gpt2-small say less than its 7 kinds of layer."""
    if not names:
        return "this model has none"
    suffixes, example, block_suffix = [], None, None
    for name in names:
        parts = name.split(".")
        numbered = next((i for i, part in enumerate(parts[:-1]) if part.isdigit()), None)
        suffix = ".".join(parts[numbered + 1:]) if numbered is not None else name
        if numbered is not None and example is None:
            example, block_suffix = name, suffix
        if suffix not in suffixes:
            suffixes.append(suffix)
    if example is None:  # no numbered blocks (a plain Sequential, a small MLP): the names are the layers
        return f"the {len(names)} candidates are {', '.join(names)}: give one of these names"
    return (f"the {len(names)} candidates end in {', '.join(suffixes)}: give one of these suffixes for that layer "
            f"in every block (e.g. {block_suffix.rsplit('.', 1)[-1]!r}), or a full name such as {example!r} for "
            "one block only")


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the submodule called ``name`` (dotted, e.g. ``trf_blocks.0.att.W_query``)."""
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child_name, new)


# ----------------------------------------------------------------------------- injection

def apply_lora(model: nn.Module, rank: int, alpha: float, target_modules=None, exclude_modules=None,
               modules_to_save=None, dropout: float = 0.0, scaling: str = "alpha/rank",
               adapter_name: str = "default", rank_pattern: dict | None = None,
               alpha_pattern: dict | None = None, use_dora: bool = False, verbose: bool = True) -> nn.Module:
    """Add LoRA adapter ``adapter_name`` to ``model`` in place, freeze the rest, and return ``model``.

    ``target_modules``: None (every ``nn.Linear``), a list of full names or dotted
    suffixes (``["W_query", "W_value"]``), or a regular expression matched against
    full names. ``exclude_modules`` removes layers the same way. ``modules_to_save``
    names modules trained in full and saved with the adapter (e.g. a new head); they
    are never LoRA targets. ``rank_pattern``/``alpha_pattern`` map names or suffixes to
    another rank/alpha for those layers. ``use_dora=True`` makes the adapter DoRA (weight-decomposed:
    a trainable magnitude per output unit besides ``A`` and ``B``, see ``lora_layer``). Afterwards
    only this adapter's ``A``, ``B`` (and magnitudes) and module copies are trainable, and it is the
    active adapter. Prints
    ``trainable_summary`` unless ``verbose=False``.

    Applying an adapter name a layer already has is an error (never a double wrap);
    another ``adapter_name`` adds a second adapter to the same wrappers.
    """
    check_lora_hyperparameters(rank, alpha, dropout, scaling)  # before the slower name matching
    save_names = select_names([n for n, _ in _walk(model)], modules_to_save, "modules_to_save") \
        if modules_to_save is not None else []
    candidates = [n for n in linear_layer_names(model)
                  if not any(n == s or n.startswith(s + ".") for s in save_names)]
    targets = select_names(candidates, target_modules, "target_modules")
    if exclude_modules is not None:
        excluded = set(select_names(candidates, exclude_modules, "exclude_modules"))
        targets = [n for n in targets if n not in excluded]
    if not targets:
        raise ValueError("no linear layer is left to adapt after exclude_modules and modules_to_save")
    ranks = _per_layer(targets, rank, rank_pattern, "rank_pattern")
    alphas = _per_layer(targets, alpha, alpha_pattern, "alpha_pattern")
    inject_adapter(model, adapter_name, {t: (ranks[t], alphas[t]) for t in targets}, save_names, dropout, scaling,
                   use_dora)
    set_adapter(model, adapter_name)
    mark_trainable(model, adapter_name)
    if verbose:
        print(trainable_summary(model))
    return model


def _per_layer(targets: list[str], default, pattern: dict | None, what: str) -> dict:
    values = dict.fromkeys(targets, default)
    for key, value in (pattern or {}).items():
        for name in select_names(targets, [key], what):
            values[name] = value
    return values


def check_adapter_name(adapter_name: str) -> None:
    """Refuse ``"__base__"``: in ``model(ids, adapter_names=...)`` it names the rows that use no adapter."""
    if adapter_name == BASE:
        raise ValueError(f"{BASE!r} cannot name an adapter: in adapter_names it marks the rows that run through "
                         "the base alone; choose another adapter_name")


def inject_adapter(model: nn.Module, adapter_name: str, targets: dict[str, tuple[int, float]],
                   modules_to_save: Iterable[str] = (), dropout: float = 0.0, scaling: str = "alpha/rank",
                   use_dora: bool = False) -> None:
    """Wrap (or extend) the layers ``targets`` ({full name: (rank, alpha)}) with a fresh (LoRA or DoRA) adapter.

    Checks every layer and every (rank, alpha) before changing any, so a failure leaves
    ``model`` as it was.
    """
    check_adapter_name(adapter_name)
    modules = dict(_walk(model))
    for rank, alpha in targets.values():
        check_lora_hyperparameters(rank, alpha, dropout, scaling)
    for name in targets:
        layer = modules.get(name)
        if not isinstance(layer, (nn.Linear, QuantizedLinear, LinearWithLoRA)):
            raise ValueError(f"{name!r} is not a linear layer of this model; linear layers: "
                             f"{', '.join(linear_layer_names(model))}")
        if isinstance(layer, LinearWithLoRA) and adapter_name in layer.lora:
            raise ValueError(f"{name!r} already has a LoRA adapter named {adapter_name!r}: LoRA is never "
                             "applied twice to one layer. Use another adapter_name to add a second adapter")
        if use_dora:
            check_dora_base(layer.linear if isinstance(layer, LinearWithLoRA) else layer)
    for name in modules_to_save:
        module = modules.get(name)
        inner = module.original if isinstance(module, ModuleToSave) else module
        if inner is None or any(isinstance(m, (LinearWithLoRA, ModuleToSave)) for m in inner.modules()):
            raise ValueError(f"modules_to_save {name!r} must name a module of this model that holds no LoRA "
                             f"layer, found {type(inner).__name__ if inner is not None else 'nothing'}")
        if isinstance(module, ModuleToSave) and adapter_name in module.copies:
            raise ValueError(f"{name!r} already holds a copy for adapter {adapter_name!r}")
        if any(isinstance(m, QuantizedLinear) for m in inner.modules()):  # its copy would have nothing to train
            raise ValueError(f"modules_to_save {name!r} holds a quantized layer, which cannot train (its weight is "
                             "frozen codes): keep that module in full precision when quantizing the base "
                             "(exclude_modules, or include_head=False for the head), or adapt it with LoRA instead")
    for name, (rank, alpha) in targets.items():
        layer = modules[name]
        if not isinstance(layer, LinearWithLoRA):
            layer = LinearWithLoRA(layer)
            set_submodule(model, name, layer)
        layer.add_adapter(adapter_name, rank, alpha, dropout, scaling, use_dora)
    for name in modules_to_save:
        module = modules[name]
        if not isinstance(module, ModuleToSave):
            module = ModuleToSave(module)
            set_submodule(model, name, module)
        module.add_adapter(adapter_name)
    _enable_mixed_batches(model)


def adapter_parameters(model: nn.Module, adapter_name: str) -> Iterator[nn.Parameter]:
    """The parameters of adapter ``adapter_name``: its ``A``, ``B`` (DoRA: and magnitudes) and module copies."""
    for layer in lora_layers(model).values():
        if adapter_name in layer.lora:
            yield from layer.lora[adapter_name].parameters()
    for module in saved_modules(model).values():
        if adapter_name in module.copies:
            yield from module.copies[adapter_name].parameters()


def mark_trainable(model: nn.Module, adapter_name: str) -> None:
    """Freeze every parameter except those of adapter ``adapter_name``."""
    model.requires_grad_(False)
    for p in adapter_parameters(model, adapter_name):
        p.requires_grad_(True)


def trainable_summary(model: nn.Module) -> str:
    """``trainable params: X || all params: Y || trainable%: Z`` (shared tensors counted once)."""
    trainable, total = count_parameters(model, trainable_only=True), count_parameters(model)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


# ----------------------------------------------------------------------------- adapters: switch, disable, merge

def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters present anywhere in ``model``, in the order they were added."""
    names = {}
    for layer in lora_layers(model).values():
        names.update(dict.fromkeys(layer.lora))
    for module in saved_modules(model).values():
        names.update(dict.fromkeys(module.copies))
    return list(names)


def _refuse_if_merged(model: nn.Module, action: str) -> None:
    if any(layer.merged for layer in lora_layers(model).values()):
        raise RuntimeError(f"cannot {action} while an adapter is merged into the weights; call unmerge_lora first")


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make ``adapter_name`` the adapter every wrapped layer uses (the base is untouched)."""
    if adapter_name not in adapter_names(model):
        raise ValueError(f"no adapter named {adapter_name!r}; this model has {adapter_names(model) or 'none'}")
    _refuse_if_merged(model, "switch adapters")
    for wrapper in lora_wrappers(model).values():
        wrapper.active_adapter = adapter_name


def active_adapter(model: nn.Module) -> str | None:
    """The name of the adapter in use (None for a model without LoRA)."""
    return next((w.active_adapter for w in lora_wrappers(model).values()), None)


def disable_lora(model: nn.Module) -> None:
    """Run the base model: every wrapper skips its adapter (logits equal the base's exactly)."""
    _refuse_if_merged(model, "disable LoRA")
    for wrapper in lora_wrappers(model).values():
        wrapper.enabled = False


def enable_lora(model: nn.Module) -> None:
    """Undo ``disable_lora``."""
    for wrapper in lora_wrappers(model).values():
        wrapper.enabled = True


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """``with lora_disabled(model): ...`` runs the base model, then re-enables the adapters."""
    disable_lora(model)
    try:
        yield model
    finally:
        enable_lora(model)


def merge_lora(model: nn.Module, unload: bool = False) -> nn.Module:
    """Fold the active adapter into the weights (``W + scaling * (A @ B)^T``) and return ``model``.

    With ``unload=False`` the wrappers stay, so ``unmerge_lora`` can restore the
    base exactly. With ``unload=True`` every wrapper is replaced by a plain layer
    holding the merged weight (and every ``ModuleToSave`` by its active copy): a model
    with no LoRA modules and the base's parameter count, e.g. for fast inference.
    """
    layers = [layer for layer in lora_layers(model).values() if layer.enabled]
    for layer in layers:  # every check before the first change: never half merged
        layer.check_mergeable()
    for layer in layers:
        layer.merge()
    return unload_lora(model, keep_merged=True) if unload else model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Restore the original weights after ``merge_lora(model)`` (bit for bit); returns ``model``."""
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


def unload_lora(model: nn.Module, keep_merged: bool = False) -> nn.Module:
    """Remove every wrapper, in place, and return ``model``.

    By default this gives back the base model (original weights and modules);
    ``keep_merged=True`` keeps merged weights and the active module copies instead.
    """
    for name, wrapper in lora_wrappers(model).items():
        if isinstance(wrapper, LinearWithLoRA):
            if not keep_merged:
                wrapper.unmerge()
            if isinstance(wrapper.linear, nn.Linear):
                wrapper.linear.weight.requires_grad_(False)
            set_submodule(model, name, wrapper.linear)
        else:
            set_submodule(model, name, wrapper.current() if keep_merged else wrapper.original)
    return model


# ----------------------------------------------------------------------------- mixed-adapter batches

def set_row_adapters(model: nn.Module, row_adapters: list[str] | None, batch_size: int | None = None) -> None:
    """Give every wrapper one adapter name per batch row (``BASE`` for none), or clear them with None.

    Checked first, as ``peft`` does: a list of ``batch_size`` names of this model's
    adapters, in eval mode (mixed batches are for serving), no adapter merged.
    """
    if row_adapters is not None:
        known = adapter_names(model)
        if isinstance(row_adapters, str) or not all(isinstance(name, str) for name in row_adapters):
            raise ValueError(f"adapter_names must be a list with one adapter name per row, found {row_adapters!r}")
        if batch_size is not None and len(row_adapters) != batch_size:
            raise ValueError(f"adapter_names has {len(row_adapters)} names for a batch of {batch_size} rows; "
                             "give one name per row")
        unknown = sorted(set(row_adapters) - set(known) - {BASE})
        if unknown:
            raise ValueError(f"adapter_names {unknown} are not adapters of this model; it has {known or 'none'} "
                             f"(and {BASE!r} for the base model)")
        if model.training:
            raise ValueError("adapter_names mixes adapters in one batch for inference only; call model.eval() first")
        _refuse_if_merged(model, "mix adapters in one batch")
    for wrapper in lora_wrappers(model).values():
        wrapper.row_adapters = None if row_adapters is None else list(row_adapters)


def _take_adapter_names(model, args, kwargs):
    """Forward pre-hook: ``model(x, adapter_names=[...])`` sets each row's adapter for this call only."""
    names = kwargs.pop("adapter_names", None)
    if names is not None:
        batch = args[0] if args else next(iter(kwargs.values()), None)
        set_row_adapters(model, names, batch.shape[0] if hasattr(batch, "shape") else None)
        model._rows_routed = True
    return args, kwargs


def _clear_adapter_names(model, args, kwargs, output):
    if getattr(model, "_rows_routed", False):
        set_row_adapters(model, None)
        model._rows_routed = False


def _enable_mixed_batches(model: nn.Module) -> None:
    """Let ``model(x, adapter_names=[...])`` route rows (``peft``'s API), without the model's forward knowing:
    a pre-hook takes the names out of the call and a hook clears them after it, even after an error."""
    if not getattr(model, "_takes_adapter_names", False):
        model.register_forward_pre_hook(_take_adapter_names, with_kwargs=True)
        model.register_forward_hook(_clear_adapter_names, with_kwargs=True, always_call=True)
        model._takes_adapter_names = True


def __getattr__(name: str):
    """``from gptlora.lora import export_peft`` kept working when the export moved to
    ``formats/lora_peft_export.py``: users' scripts import it from here. Looked up on use (PEP 562)
    rather than imported at the top, because that module imports this one."""
    if name == "export_peft":
        from .formats.lora_peft_export import export_peft

        return export_peft
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
