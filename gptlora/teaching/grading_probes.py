"""The harness that grading runs a student's function through, on both sides of the sandbox.

The grader (``exercises/teach.py grade``) never trusts the process that runs a submission. That
process (``run_submission``) only *observes*: for each question it builds the grader's inputs,
passes them to the student's function through a probe, and writes what it saw as plain JSON.
The trusted process runs the same probe on the teacher's reference function and compares the two
observations. Both sides therefore share this module: how inputs are built from their JSON
description (:func:`build`), the probes (:data:`PROBES`), and how an observation becomes JSON and
back (:func:`to_plain`, :func:`from_plain`). Nothing here holds a solution or an expected value.

Inputs are JSON with tagged objects, e.g. ``{"$randn": [3, 50], "seed": 7, "scale": 3}`` for a
``[3, 50]`` tensor drawn from ``torch.Generator().manual_seed(7)``, or ``{"$random_config": 10}``
for ``random_gpt_config(10)``; the same description gives the same tensor on both sides.
"""

from __future__ import annotations

import math
import tempfile

import torch

MAX_ELEMENTS = 2_000_000  # a tensor in an observation larger than this is refused (a result is small)


def _generator(spec: dict) -> torch.Generator:
    return torch.Generator().manual_seed(int(spec.get("seed", 0)))


def _dtype(spec: dict, default: str = "float32") -> torch.dtype:
    return getattr(torch, spec.get("dtype", default))


def build(value):
    """The Python object a JSON input description stands for (see the module docstring)."""
    from .exercise_checks import random_gpt_config
    from ..model import GPTConfig

    if isinstance(value, list):
        return [build(v) for v in value]
    if not isinstance(value, dict):
        return value
    tags = [key for key in value if key.startswith("$")]
    if not tags:
        return {key: build(v) for key, v in value.items()}
    tag, argument = tags[0], value[tags[0]]
    if tag == "$tuple":
        return tuple(build(v) for v in argument)
    if tag == "$config":
        return GPTConfig(**argument)
    if tag == "$random_config":
        return random_gpt_config(argument, **value.get("overrides", {}))
    if tag == "$tensor":
        return torch.tensor(argument, dtype=_dtype(value))
    if tag == "$randn":  # "zero_rows": [i, ...] sets those rows to 0 (an edge case drawn like any other)
        tensor = torch.randn(argument, generator=_generator(value), dtype=_dtype(value)) * value.get("scale", 1)
        tensor[value.get("zero_rows", [])] = 0
        return tensor
    if tag == "$rand":  # uniform in [low, high)
        low, high = value.get("low", 0.0), value.get("high", 1.0)
        return low + (high - low) * torch.rand(argument, generator=_generator(value), dtype=_dtype(value))
    if tag == "$randint":  # {"$randint": shape, "high": 40}: integers in [low, high)
        ints = torch.randint(value.get("low", 0), value["high"], argument, generator=_generator(value))
        return ints.to(_dtype(value, "int64")) if not value.get("as_list") else ints.tolist()
    if tag == "$low_rank":  # {"$low_rank": [m, n, r]}: an m x n matrix of rank r
        m, n, r = argument
        g = _generator(value)
        return torch.randn(m, r, generator=g, dtype=_dtype(value)) @ torch.randn(r, n, generator=g, dtype=_dtype(value))
    if tag == "$padded":  # {"$padded": [batch, time], "pad_id": 50256}: ids ending in padding, every row >= 1 token
        batch, time = argument
        g, pad = _generator(value), value["pad_id"]
        lengths = torch.randint(1, time + 1, (batch,), generator=g)
        ids = torch.randint(0, pad, (batch, time), generator=g)
        return ids.masked_fill(torch.arange(time)[None] >= lengths[:, None], pad)
    raise ValueError(f"unknown input tag {tag}")


# ---- probes: probe(function, *inputs) -> what the grader compares -----------------------------------------

def call(function, *args, **kwargs):
    """The function's result itself."""
    return function(*args, **kwargs)


def call_as_tensor(function, *args, **kwargs):
    """The function's result as a tensor, whatever array-like the student gave back."""
    return torch.as_tensor(function(*args, **kwargs))


def call_as_tensors(function, *args, **kwargs):
    """Each item of the function's (tuple) result as a tensor, whatever array-like the student gave back."""
    return [torch.as_tensor(item) for item in function(*args, **kwargs)]


def tensors_and_dtypes(function, *args, **kwargs):
    """The items of the result as tensors, and their dtypes (where a dtype is part of the answer)."""
    items = call_as_tensors(function, *args, **kwargs)
    return items + [str(item.dtype) for item in items]


def dropout_effect(function, cfg, embedding, shortcut, attention, seed):
    """``function(model, embedding, shortcut, attention)`` on a fresh GPTModel, then its logits ``[2, T, V]`` in
    train mode on ids drawn from ``seed``, torch's generator seeded by it: what the rates it set *do*. (The
    rates it leaves set would be the inputs themselves, which an echo reproduces without setting anything.)"""
    from ..model import GPTModel

    torch.manual_seed(seed)
    model = GPTModel(cfg)
    function(model, embedding, shortcut, attention)
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.context_length), generator=torch.Generator().manual_seed(seed))
    model.train()
    torch.manual_seed(seed)  # the dropout masks: the same draws on both sides, whatever the function drew
    with torch.no_grad():
        return model(ids)


def _train(model, optimizer, batches):
    from ..pretraining import calc_loss_batch

    for x, y in batches:
        optimizer.zero_grad()
        calc_loss_batch(x, y, model, "cpu").backward()
        optimizer.step()


def resumed_training(function, cfg, seed, lr, steps_before, steps_after):
    """Train a model, save it with its optimizer, ``function(path, cfg)`` it back, train both further;
    the resumed model's weights (by name) after the further steps."""
    from ..model import GPTModel
    from ..pretraining import save_model_and_optimizer

    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randint(0, cfg.vocab_size, (2, cfg.context_length), generator=g),
                torch.randint(0, cfg.vocab_size, (2, cfg.context_length), generator=g))
               for _ in range(steps_before + steps_after)]
    torch.manual_seed(seed)
    model = GPTModel(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    _train(model, optimizer, batches[:steps_before])
    with tempfile.TemporaryDirectory() as folder:
        save_model_and_optimizer(model, optimizer, f"{folder}/run.safetensors")
        resumed_model, resumed_optimizer = function(f"{folder}/run.safetensors", cfg)
    _train(resumed_model, resumed_optimizer, batches[steps_before:])
    return {name: tensor.detach() for name, tensor in sorted(resumed_model.state_dict().items())}


def linear_outputs(function, weight, bias, x):
    """``function(weight, bias)`` is a layer; its outputs on ``x``."""
    with torch.no_grad():
        return function(weight, bias)(x)


def head_tied_answers(function, cfg, seed):
    """``function(model)`` for five models in an order drawn from ``seed``: a fresh one, a tied one, a tied one
    saved and loaded back, one whose head is a copy of the embedding (equal, not tied) and one tied then
    given its own head again. Two are tied, in places an answer fixed in advance cannot know."""
    from ..model import GPTModel
    from ..pretrained import load_pretrained, save_hf

    torch.manual_seed(seed)
    fresh, tied, copied, untied = GPTModel(cfg), GPTModel(cfg), GPTModel(cfg), GPTModel(cfg)
    tied.tie_weights()
    copied.out_head.weight = torch.nn.Parameter(copied.tok_emb.weight.detach().clone())
    untied.tie_weights()
    untied.out_head.weight = torch.nn.Parameter(untied.tok_emb.weight.detach().clone())
    with tempfile.TemporaryDirectory() as folder:
        save_hf(tied, folder)
        loaded = load_pretrained(folder, download=False)
    models = [fresh, tied, loaded, copied, untied]
    order = torch.randperm(len(models), generator=torch.Generator().manual_seed(seed)).tolist()
    return [function(models[i]) for i in order]


class _SeesEverything(torch.nn.Module):
    """Every output position sees every token (not causal)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(30, 3)

    def forward(self, ids):
        x = self.emb(ids)
        return x + x.mean(dim=1, keepdim=True)


class _SeesWindow(torch.nn.Module):
    """Output t sees tokens t - width + 1 .. t."""

    def __init__(self, width: int):
        super().__init__()
        self.emb, self.width = torch.nn.Embedding(30, 3), width

    def forward(self, ids):
        x = self.emb(ids)
        return sum(torch.nn.functional.pad(x, (0, 0, shift, 0))[:, :x.shape[1]] for shift in range(self.width))


def receptive_fields(function, length, window, seed):
    """``function(model, ids, 0)`` for a model that sees everything and one that sees a window of tokens."""
    torch.manual_seed(seed)
    ids = torch.arange(1, length + 1)[None]
    return [function(_SeesEverything().eval(), ids, 0), function(_SeesWindow(window).eval(), ids, 0)]


def accuracy_by_row(function, batch, time, classes, seed):
    """``function(logits, labels, lengths)`` row by row and for the whole batch."""
    from .exercise_checks import batch_read_at_one_position

    logits, labels, lengths = batch_read_at_one_position(torch.Generator().manual_seed(seed), batch, time, classes)
    rows = [function(logits[i:i + 1], labels[i:i + 1], lengths[i:i + 1]) for i in range(batch)]
    return rows, function(logits, labels, lengths)


def update_ranks(function, n_in, n_out, rank, independent, seed):
    """``function(layer)`` for a LoRA layer whose B has ``independent`` independent rows, then with a second,
    full-rank adapter made active."""
    from ..lora import LinearWithLoRA

    torch.manual_seed(seed)
    layer = LinearWithLoRA(torch.nn.Linear(n_in, n_out), rank=rank, alpha=rank)
    with torch.no_grad():
        rows = torch.randn(independent, n_out)
        layer.lora["default"].B.copy_(rows.repeat(math.ceil(rank / independent), 1)[:rank])
    answers = [function(layer)]
    layer.add_adapter("other", rank=2, alpha=2)
    torch.nn.init.normal_(layer.lora["other"].B)
    layer.active_adapter = "other"
    return answers + [function(layer)]


def prompt_tuned_inputs(function, cfg, num_virtual_tokens, shape, seed):
    """``function(model, ids)`` for a prompt-tuned GPTModel."""
    from ..model import GPTModel
    from ..prompt_tuning import apply_prompt_tuning

    torch.manual_seed(seed)
    model = apply_prompt_tuning(GPTModel(cfg), num_virtual_tokens).eval()
    ids = torch.randint(0, cfg.vocab_size, shape)
    with torch.no_grad():
        return function(model, ids)


def routed_rows(function, n_in, n_out, x, names, seed):
    """``function(layer, x, names)`` for a LoRA layer with adapters "a" (rank 2) and "b" (rank 3)."""
    from ..lora import LinearWithLoRA

    torch.manual_seed(seed)
    layer = LinearWithLoRA(torch.nn.Linear(n_in, n_out), rank=2, alpha=2, adapter_name="a")
    layer.add_adapter("b", rank=3, alpha=6)
    for adapter in layer.lora.values():
        torch.nn.init.normal_(adapter.B)
    with torch.no_grad():
        return function(layer, x, names)


def training_state_bytes(function, cfg, rank, seed):
    """``function(model, ids, ids)`` for a fresh GPTModel of ``cfg``, trained in full (``rank`` 0) or with LoRA
    of that rank on every linear layer; ``ids`` is ``[2, context_length]`` of the seed's draws."""
    from ..lora import apply_lora
    from ..model import GPTModel

    torch.manual_seed(seed)
    model = GPTModel(cfg)
    if rank:
        model = apply_lora(model, rank=rank, alpha=rank, verbose=False)
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.context_length), generator=torch.Generator().manual_seed(seed))
    return function(model, ids, ids)


def reference_answers(function, cfg, rank, length, seed):
    """``function(model, ids)`` for a GPTModel of ``cfg`` with trained-looking LoRA adapters (random ``B``) on
    ``[2, length]`` ids; and the model's own logits on ``ids`` afterwards, so that leaving the adapters off shows."""
    from ..lora import apply_lora
    from ..model import GPTModel

    torch.manual_seed(seed)
    model = apply_lora(GPTModel(cfg), rank=rank, alpha=rank, verbose=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    ids = torch.randint(0, cfg.vocab_size, (2, length), generator=generator)
    answer = function(model.eval(), ids)
    with torch.no_grad():
        after = model(ids)
    return answer, after


PROBES = {probe.__name__: probe for probe in (
    call, call_as_tensor, call_as_tensors, tensors_and_dtypes, dropout_effect, resumed_training, linear_outputs, head_tied_answers,
    receptive_fields, accuracy_by_row, update_ranks, prompt_tuned_inputs, routed_rows, training_state_bytes,
    reference_answers)}


# ---- observations as JSON ----------------------------------------------------------------------------------

def to_plain(value, depth: int = 0):
    """``value`` as JSON-able data: tensors as ``{"$tensor": values, "dtype", "shape"}``, tuples as lists,
    anything else a grader cannot compare as ``{"$unsupported": type name}``."""
    if depth > 20:
        return {"$unsupported": "nested too deep"}
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, torch.Tensor):
        if value.numel() > MAX_ELEMENTS:
            return {"$unsupported": f"tensor of {value.numel()} elements"}
        tensor = value.detach().cpu()
        values = tensor.tolist() if not tensor.is_complex() else str(tensor.tolist())
        return {"$tensor": values, "dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape)}
    if isinstance(value, (tuple, list)):
        return [to_plain(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {str(k): to_plain(v, depth + 1) for k, v in value.items()}
    if hasattr(value, "item") and hasattr(value, "dtype"):  # a numpy scalar
        return to_plain(value.item(), depth + 1)
    return {"$unsupported": type(value).__name__}


def from_plain(value):
    """The objects :func:`to_plain` described (tensors rebuilt from their numbers); plain JSON only, so that
    data written by an untrusted process never becomes more than numbers, strings, lists and dicts."""
    if isinstance(value, list):
        return [from_plain(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "$tensor" in value:
        shape = [int(n) for n in value["shape"]]
        if math.prod(shape) > MAX_ELEMENTS:
            raise ValueError(f"a tensor of shape {shape} is too large for an answer")
        dtype = getattr(torch, str(value["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {value['dtype']!r}")
        return torch.tensor(value["$tensor"], dtype=dtype).reshape(shape)
    if "$unsupported" in value:
        return f"<a {value['$unsupported']}, which is not an answer>"
    return {str(k): from_plain(v) for k, v in value.items()}
