"""GPT-2 weights: download, load and export in Hugging Face's file layout.

:func:`download_gpt2` fetches a checkpoint (verified and resumable, see
:mod:`gptlora.infra.download`), :func:`load_pretrained` turns one into a ``GPTModel``
with strict accounting of every tensor, and :func:`save_hf` writes a model back in
the layout ``transformers`` reads. The renaming between Hugging Face's names and
ours (and the three quirks it undoes) lives in :mod:`gptlora.formats.hf_layout`. Only
safetensors files are read: never a pickle from the internet.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .infra.atomic import read_json_object, replace_atomically, write_json
from .infra.download import DownloadError, OfflineError, download_file, offline_mode, place_by_hand_hint
from .formats.hf_layout import config_from_hf, config_to_hf, gptlora_to_hf, hf_shapes, hf_to_gptlora
from .model import GPTConfig, GPTModel, canonical_preset

# The Hub repository of each GPT-2 size, and where its files can be fetched from, in order.
HUB_REPOS = {
    "gpt2-small": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
HUB_MIRRORS = ("https://huggingface.co", "https://hf-mirror.com")
BASE_URL_ENV = "GPTLORA_HF_BASE_URL"  # one base URL, or several separated by commas
CHECKPOINT_FILES = ("config.json", "model.safetensors")
DOWNLOAD_AGAIN = "Delete it and download it again (gptlora download NAME)"
CONFIG_WHAT = "a Hugging Face GPT-2 config (n_embd, n_layer, n_head, n_positions, vocab_size)"
# Causal-mask buffers that some GPT-2 files carry (h.<i>.attn.bias, h.<i>.attn.masked_bias): not weights.
_MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")


# ---------------------------------------------------------------- download
def hub_urls(name: str, file: str, base_url: str | list[str] | None = None) -> list[str]:
    """URLs of ``file`` of GPT-2 ``name``, one per base URL, in the order they are tried.

    Base URLs come from ``base_url`` (a string or a list), else from the environment
    variable ``GPTLORA_HF_BASE_URL`` (comma-separated), else :data:`HUB_MIRRORS`.
    """
    if base_url is None:
        base_url = os.environ.get(BASE_URL_ENV) or list(HUB_MIRRORS)
    bases = base_url.split(",") if isinstance(base_url, str) else base_url
    bases = [base.strip().rstrip("/") for base in bases if base.strip()]  # "a,b," has no third server
    for base in bases:
        if not base.startswith(("http://", "https://")):
            raise ValueError(f"the base URL {base!r} (--base-url or {BASE_URL_ENV}) is not an http:// or https:// "
                             "URL; give the server's address, e.g. https://huggingface.co")
    return [f"{base}/{HUB_REPOS[canonical_preset(name)]}/resolve/main/{file}" for base in bases]


def download_gpt2(name: str, models_dir: str | Path = "weights", base_url: str | list[str] | None = None) -> Path:
    """Download ``config.json`` and ``model.safetensors`` of a GPT-2 size; return their directory.

    ``name`` is ``gpt2-small``/``-medium``/``-large``/``-xl`` or ``124M``/``355M``/
    ``774M``/``1558M``; files land in ``<models_dir>/<canonical name>/``. Files already
    there are used without touching the network (they were verified when they were
    downloaded, or placed there by hand). With ``GPTLORA_OFFLINE=1`` a missing file
    raises :class:`~gptlora.infra.download.OfflineError` naming the directory and the files.
    """
    canonical = canonical_preset(name)
    directory = Path(models_dir) / canonical
    missing = {file: hub_urls(canonical, file, base_url) for file in CHECKPOINT_FILES
               if not (directory / file).is_file()}
    if missing and offline_mode():
        raise OfflineError(f"GPTLORA_OFFLINE=1 and {canonical} is not in {directory}: unset GPTLORA_OFFLINE to "
                           f"download it, or put {' and '.join(missing)} there by hand\n"
                           f"{place_by_hand_hint(directory, missing)}")
    for file, urls in missing.items():
        try:
            download_file(urls, directory / file, desc=f"{canonical}/{file}")
        except DownloadError as error:
            if isinstance(error, OfflineError):
                raise
            raise DownloadError(f"{error}\n{canonical} needs all of {', '.join(CHECKPOINT_FILES)} "
                                f"in {directory.resolve()}.") from error
    return directory


# ---------------------------------------------------------------- load
def preset_named(name: str | Path) -> str:
    """The canonical GPT-2 name (``gpt2-small``, ...) that ``name``, which is not a directory, stands for;
    a ValueError that says it is neither a directory nor a GPT-2 name otherwise."""
    try:
        return canonical_preset(str(name))
    except ValueError as error:
        raise ValueError(f"{str(name)!r} is neither a directory nor a GPT-2 name: {error}") from None


def load_pretrained(name_or_dir: str | Path, models_dir: str | Path = "weights", download: bool = True) -> GPTModel:
    """A ``GPTModel`` (eval mode, head tied to the token embedding) with pretrained GPT-2 weights.

    ``name_or_dir`` is a directory holding ``config.json`` + ``model.safetensors``
    (any GPT-2-shaped checkpoint: the shape comes from ``config.json``), or a GPT-2
    name, looked up in ``<models_dir>/<name>/`` and downloaded there if missing and
    ``download`` is true.
    """
    directory = Path(name_or_dir)
    if not directory.is_dir():
        canonical = preset_named(name_or_dir)
        directory = download_gpt2(canonical, models_dir) if download else Path(models_dir) / canonical
    for file in CHECKPOINT_FILES:
        if (directory / file).is_dir():
            raise IsADirectoryError(f"{directory / file} is a directory, not a file; a checkpoint directory holds the "
                                    f"files {' and '.join(CHECKPOINT_FILES)}")
        if not (directory / file).is_file():
            found = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else "no such directory"
            raise FileNotFoundError(f"{directory / file} not found (found: {found}); a checkpoint directory holds "
                                    f"{' and '.join(CHECKPOINT_FILES)}. Fetch one with `gptlora download gpt2-small`")
    hf_config = read_json_object(directory / "config.json", CONFIG_WHAT)
    cfg = config_from_hf(hf_config)
    return load_gpt2_weights(directory / "model.safetensors", cfg, hf_config.get("tie_word_embeddings", True)).eval()


def pretrained_or_random(name_or_dir: str | Path, models_dir: str | Path = "weights",
                         random_init: bool = False) -> GPTModel:
    """``load_pretrained(name_or_dir, models_dir)``, or with ``random_init`` a model of the same shape
    (a GPT-2 name's preset, or the directory's ``config.json``) with random weights drawn from
    PyTorch's global generator (seed it first) and no dropout. Nothing is downloaded for random weights.
    """
    if not random_init:
        return load_pretrained(name_or_dir, models_dir)
    config_path = Path(name_or_dir) / "config.json"
    if Path(name_or_dir).is_dir():
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found; random weights take their shape from a checkpoint "
                                    "directory's config.json, or from a GPT-2 name such as gpt2-small")
        return GPTModel(config_from_hf(read_json_object(config_path, CONFIG_WHAT)))
    return GPTModel(GPTConfig.from_preset(str(name_or_dir), qkv_bias=True, drop_rate=0.0))


def load_gpt2_weights(path: str | Path, cfg: GPTConfig, tie_word_embeddings: bool = True) -> GPTModel:
    """A ``GPTModel`` of shape ``cfg`` holding the Hugging Face GPT-2 weights in the safetensors file ``path``.

    Accepts the Hub's keys (``h.0.attn.c_attn.weight``) and ``save_pretrained``'s
    (``transformer.h.0...``). Every tensor is accounted for: missing, unexpected and
    wrongly shaped ones are listed in one ValueError; causal-mask buffers are skipped,
    and so is a stored ``lm_head.weight`` when the head is tied (as transformers does).

    Memory: the model is built on the ``meta`` device (no storage) and takes the
    loaded tensors as its parameters. The file is memory-mapped one group of tensors
    at a time (embeddings first, then each block); each group is copied out, in our
    layout, and its mapping released before the next, so the pages read never pile
    up: peak memory stays close to one checkpoint size (measure: bench/).
    """
    path = Path(path)
    found = {key.removeprefix("transformer."): (key, shape) for key, shape in safetensors_shapes(path).items()}
    with torch.device("meta"), _random_init_skipped():
        model = GPTModel(cfg)  # parameters without storage, replaced below
    if tie_word_embeddings:
        model.tie_weights()
    # Shapes by arithmetic, not by exporting the meta model: its torch.cat would cost ~2 s (see hf_shapes).
    expected = {name.removeprefix("transformer."): shape for name, shape in hf_shapes(model).items()}
    _check_keys_and_shapes(path, cfg, expected, {name: shape for name, (_, shape) in found.items()})

    state = {}
    for group in _by_block(expected):
        tensors = read_safetensors(path, [found[name][0] for name in group])
        part = {name: tensors[found[name][0]] for name in group}
        mapped = hf_to_gptlora(part, cfg, tie_word_embeddings)
        # Contiguous copies, so nothing refers to this group's mapping any more and its pages are released.
        state.update({k: v.clone(memory_format=torch.contiguous_format) for k, v in mapped.items()})
        del tensors, part, mapped
    model.load_state_dict(state, strict=not tie_word_embeddings, assign=True)
    if tie_word_embeddings:
        model.tie_weights()  # assign=True replaced tok_emb.weight: tie the head to the new tensor
    return model


@contextlib.contextmanager
def _random_init_skipped():
    """Within this block, ``torch.nn.init``'s initialisers (``normal_``, ``kaiming_uniform_``, ...)
    leave their tensor as it is.

    Why: ``load_gpt2_weights`` builds the model only to replace every parameter with
    the checkpoint's, so the random draws of ``nn.Linear``/``nn.Embedding`` are thrown
    away. On the meta device they cost no arithmetic, but the first ``normal_`` there
    imports PyTorch's Python reference kernels (``torch._refs``): about 2 s of a fresh
    process's load. ``transformers`` skips them the same way (``no_init_weights``).
    The switch is process-wide while it lasts: build no other model in another thread.
    """
    # The in-place initialisers are the public names ending in "_"; modules call them as
    # ``init.normal_(...)``, an attribute lookup at call time, so replacing them here works.
    names = [name for name in vars(nn.init) if name.endswith("_") and not name.startswith("_")]
    originals = {name: getattr(nn.init, name) for name in names}
    for name in names:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(nn.init, name, function)


def _by_block(names) -> list[list[str]]:
    """Group Hugging Face names by transformer block (``h.<i>.``); the other names form one group.

    Groups keep the order of ``names``: with the embeddings first, their (large)
    group is copied while little else is loaded yet.
    """
    groups: dict[str, list[str]] = {}
    for name in names:
        block = ".".join(name.split(".")[:2]) if name.startswith("h.") else "top"
        groups.setdefault(block, []).append(name)
    return list(groups.values())


def _check_keys_and_shapes(path: Path, cfg: GPTConfig, expected: dict, found: dict, show: int = 10) -> None:
    """Raise one ValueError listing missing, unexpected and wrongly shaped tensors (Hugging Face names)."""
    def skippable(name):  # mask buffers; a stored copy of a tied head (transformers ignores it too)
        return _MASK_BUFFER.fullmatch(name) or name == "lm_head.weight"

    def listed(title, items):
        more = [f"    ... and {len(items) - show} more"] if len(items) > show else []
        return [f"  {title} ({len(items)}):"] + [f"    {item}" for item in items[:show]] + more

    missing = [name for name in expected if name not in found]
    unexpected = [name for name in found if name not in expected and not skippable(name)]
    wrong_shapes = []
    for name, shape in expected.items():
        if name in found and tuple(found[name]) != shape:
            transposed = len(shape) == 2 and tuple(found[name]) == shape[::-1]
            wrong_shapes.append(f"{name}: expected shape {list(shape)}, found {list(found[name])}"
                                + (" (transposed? GPT-2's Conv1D weights are stored [in, out])" if transposed else ""))
    if missing or unexpected or wrong_shapes:
        groups = [(title, items) for title, items in (("missing", missing), ("unexpected", unexpected),
                                                      ("wrong shape", wrong_shapes)) if items]
        counts = ", ".join(f"{len(items)} {title}" for title, items in groups)
        # The first line is the whole report (found, expected, what to do); the full lists follow it.
        lines = [f"{path} does not match the GPT-2 shape of its config.json (emb_dim={cfg.emb_dim}, "
                 f"n_layers={cfg.n_layers}, vocab_size={cfg.vocab_size}, context_length={cfg.context_length}): "
                 f"{counts} (first: {groups[0][1][0]}); are config.json and model.safetensors from the same "
                 "GPT-2 checkpoint?"]
        for title, items in groups:
            lines += listed(title, items)
        raise ValueError("\n".join(lines))


def safetensors_shapes(path: str | Path, remedy: str = DOWNLOAD_AGAIN) -> dict[str, list[int]]:
    """Name -> shape of every tensor in a safetensors file, read from its header alone. A damaged file is a
    ValueError that names it and ends with ``remedy``."""
    with _open_safetensors(path, remedy) as f:
        return {key: f.get_slice(key).get_shape() for key in f.keys()}


def read_safetensors(path: str | Path, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Tensors ``keys`` (default: all) of a safetensors file, memory-mapped rather than read up front.

    The returned CPU tensors share the file's pages (copy-on-write) until written to,
    so reading costs little memory until they are used. Never unpickles anything.
    """
    with _open_safetensors(path) as f:
        return {key: f.get_tensor(key) for key in (f.keys() if keys is None else keys)}


@contextlib.contextmanager
def _open_safetensors(path: str | Path, remedy: str = DOWNLOAD_AGAIN):
    """``safe_open`` whose errors say which file is damaged and what to do about it (``remedy``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error}); it may be truncated or "
                         f"corrupt. {remedy}") from None
    with handle as f:
        yield f


# ---------------------------------------------------------------- export
def save_hf(model: GPTModel, out_dir: str | Path, pad_token_id: int | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` in Hugging Face's ``GPT2LMHeadModel`` layout.

    ``transformers.GPT2LMHeadModel.from_pretrained(out_dir)`` loads the result. A tied
    head is stored once (as ``wte``). An untied head ``[V, D]`` is written as
    ``lm_head.weight`` with ``tie_word_embeddings: false``, so it round-trips. A model
    whose head is not a language-model head (e.g. a 2-class classifier) is refused.
    ``pad_token_id`` goes into ``config.json`` (``config_to_hf``): the base of a classifier that
    pads with it. Each file is written to a temporary name and renamed into place. Returns ``out_dir``.
    """
    head, embedding = model.out_head, model.tok_emb.weight
    if not isinstance(head, nn.Linear) or head.bias is not None or head.weight.shape != embedding.shape:
        raise ValueError(f"save_hf exports GPT-2 language models, whose head is Linear({embedding.shape[1]}, "
                         f"{embedding.shape[0]}, bias=False); this model's head is {head}. A classifier head has "
                         "no place in GPT2LMHeadModel: save it with torch.save or your own format instead")
    try:
        state = gptlora_to_hf(model)
    except KeyError as unknown:
        raise ValueError(f"save_hf does not know the parameter {unknown} (LoRA layers still injected? "
                         "merge them into the base weights first)") from None
    out_dir = Path(out_dir)
    with replace_atomically(out_dir / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})  # transformers requires the "format" entry
    write_json(config_to_hf(model.cfg, tie_word_embeddings=model.weights_tied, pad_token_id=pad_token_id),
               out_dir / "config.json")
    return out_dir
