"""Frozen-prefix caching: run the frozen blocks once per message, train only what follows.

In the book's ``last-block`` recipe the embeddings and the first ``L - 1``
transformer blocks are frozen and dropout is 0, so their output for a given
message is the same at every epoch and every evaluation. This module computes
that output (the *hidden states after the prefix*) once per message and stores
it; training then runs only the suffix (the last block, the final LayerNorm and
the head) on the stored states. The suffix modules are the model's own objects,
so the model is trained in place and saved as usual.

The result is the plain loop's up to floating-point rounding: same seed, same
batches (the cached loaders reuse the original loaders' samplers, so they draw
the same random numbers), same losses and accuracies.

Memory: one ``[T, D]`` float tensor per message, ``T`` its padded length (120 for
the book's split, 1,045 training messages x 120 x 768 x 4 bytes = 385 MB for
gpt2-small) or, with dynamic padding, its real length (about a quarter of that).

Shapes: ``B`` batch size, ``T`` tokens, ``D`` embedding width, ``C`` classes.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..lora import lora_wrappers
from ..model import GPTModel, MultiHeadAttention, evaluating


def default_prefix_blocks(model: GPTModel) -> int:
    """The book's prefix: every block but the last."""
    return model.cfg.n_layers - 1


def prefix_modules(model: GPTModel, prefix_blocks: int) -> dict[str, nn.Module]:
    """The modules whose output is cached: embeddings and the first ``prefix_blocks`` blocks, by name."""
    if not 0 < prefix_blocks < model.cfg.n_layers:
        raise ValueError(f"prefix_blocks must lie in 1..{model.cfg.n_layers - 1} (the model has "
                         f"{model.cfg.n_layers} blocks and at least one must be trained), found {prefix_blocks}")
    named = {"tok_emb": model.tok_emb, "pos_emb": model.pos_emb, "drop_emb": model.drop_emb}
    named.update({f"trf_blocks.{i}": model.trf_blocks[i] for i in range(prefix_blocks)})
    return named


def check_frozen_prefix(model: GPTModel, prefix_blocks: int) -> None:
    """Raise ``ValueError`` unless the prefix's output can be cached: frozen, no dropout, no LoRA.

    Each condition guarantees that a message's hidden states after the prefix are
    the same in every step, in training and in evaluation mode.
    """
    problems = []
    for name, part in prefix_modules(model, prefix_blocks).items():
        problems += [f"{name}.{wrapped} holds LoRA adapters (they change as they train)"
                     for wrapped in lora_wrappers(part)]
        for sub_name, module in part.named_modules(prefix=name):
            if isinstance(module, nn.Dropout) and module.p > 0:
                problems.append(f"{sub_name} has dropout p={module.p} (random in training mode)")
            elif isinstance(module, MultiHeadAttention) and module.dropout > 0:
                problems.append(f"{sub_name} has attention dropout {module.dropout} (random in training mode)")
        trainable = [f"{name}.{p_name}" for p_name, p in part.named_parameters() if p.requires_grad]
        if trainable:
            problems.append(f"{trainable[0]} is trainable ({len(trainable)} trainable tensors in {name})")
    if problems:
        raise ValueError("cannot cache the frozen prefix (embeddings + blocks 0.."
                         f"{prefix_blocks - 1}): " + "; ".join(problems[:5]) + ". Caching needs a prefix that is "
                         "frozen, has dropout 0 and no LoRA: use --method last-block with drop_rate=0, or train "
                         "without --cache-prefix")


@torch.no_grad()
def prefix_hidden_states(model: GPTModel, ids: torch.Tensor, prefix_blocks: int) -> torch.Tensor:
    """Hidden states after the embeddings and the first ``prefix_blocks`` blocks: ``[B, T] -> [B, T, D]``."""
    x = model.embed(ids)
    for block in model.trf_blocks[:prefix_blocks]:
        x = block(x)
    return x


class HiddenStateDataset(Dataset):
    """Cached prefix outputs and labels of a token-id dataset, item for item.

    Item ``i``: ``(hidden [n_i, D], label)`` where ``n_i`` is the length of item
    ``i`` of the source (its padded length when the source pads).
    """

    def __init__(self, hidden_states: list[torch.Tensor], labels: list[torch.Tensor]):
        self.hidden_states, self.labels = hidden_states, labels

    def __getitem__(self, index):
        return self.hidden_states[index], self.labels[index]

    def __len__(self):
        return len(self.labels)


def cache_dataset(model: GPTModel, dataset, prefix_blocks: int, chunk_size: int = 16,
                  progress: bool = False, desc: str = "caching") -> HiddenStateDataset:
    """Run the prefix once over every item ``(ids [n], label)`` of ``dataset``.

    Items are processed in chunks of similar length, padded on the right: in a
    causal model a real token never sees the pads after it, so each item's states
    are those it would have alone. The model is put in eval mode meanwhile (the
    checked prefix has no dropout, so this changes no number) and restored after.
    ``progress`` shows a bar labelled ``desc``.
    """
    items = [dataset[index] for index in range(len(dataset))]
    order = sorted(range(len(items)), key=lambda index: len(items[index][0]))
    device = next(model.parameters()).device
    hidden: list[torch.Tensor | None] = [None] * len(items)
    with evaluating(model):
        for start in tqdm(range(0, len(order), chunk_size), desc=desc, unit="chunk", disable=not progress):
            chunk = order[start:start + chunk_size]
            width = max(len(items[index][0]) for index in chunk)
            ids = torch.stack([nn.functional.pad(items[index][0], (0, width - len(items[index][0])))
                               for index in chunk])
            states = prefix_hidden_states(model, ids.to(device), prefix_blocks)
            for row, index in enumerate(chunk):
                hidden[index] = states[row, : len(items[index][0])].clone()  # own storage: no padding kept
    return HiddenStateDataset(hidden, [label for _, label in items])


class PrefixSuffix(nn.Module):
    """The trainable rest of a GPT model, run on cached states: ``[B, T, D] -> [B, T, C]``.

    Holds the model's own last blocks, final norm and head (not copies), so
    training this module trains the model in place.
    """

    def __init__(self, model: GPTModel, prefix_blocks: int):
        super().__init__()
        self.blocks = model.trf_blocks[prefix_blocks:]  # a new Sequential of the same block objects
        self.final_norm = model.final_norm
        self.out_head = model.out_head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out_head(self.final_norm(self.blocks(hidden)))


def cached_loader(loader: DataLoader, cached: HiddenStateDataset) -> DataLoader:
    """A loader over ``cached`` that batches exactly as ``loader`` does.

    It reuses ``loader``'s sampler (or its custom batch sampler, such as length
    bucketing) and collate function, so under the same seed it draws the same
    random numbers and forms the same batches (with dynamic padding, ``pad_batch``
    pads the states with zeros and returns lengths). Keeping the sampler itself,
    not only a batch sampler around it, keeps it where ``set_sampler_epoch`` finds
    it: a ``DistributedSampler`` that never heard of the epoch repeats one order.
    """
    if loader.batch_size is None:  # a custom batch sampler: it is the only place that knows the order
        return DataLoader(cached, batch_sampler=loader.batch_sampler, collate_fn=loader.collate_fn,
                          num_workers=loader.num_workers)
    return DataLoader(cached, batch_size=loader.batch_size, sampler=loader.sampler, drop_last=loader.drop_last,
                      collate_fn=loader.collate_fn, num_workers=loader.num_workers)


def cache_frozen_prefix(model: GPTModel, loaders, prefix_blocks: int | None = None, progress: bool = False
                        ) -> tuple[PrefixSuffix, list[DataLoader]]:
    """Check the prefix, cache it for every loader's dataset, and return ``(suffix_model, cached_loaders)``.

    ``loaders`` are token-id loaders (e.g. from ``spam.create_dataloaders``);
    ``prefix_blocks`` defaults to every block but the last (the ``last-block``
    recipe). Train ``suffix_model`` on ``cached_loaders`` with the same loop,
    optimizer and seed as the plain model: it returns the same numbers. ``progress`` shows a bar per loader.
    """
    prefix_blocks = default_prefix_blocks(model) if prefix_blocks is None else prefix_blocks
    check_frozen_prefix(model, prefix_blocks)
    cached = [cached_loader(loader, cache_dataset(model, loader.dataset, prefix_blocks, progress=progress,
                                                  desc=f"caching frozen prefix ({index + 1}/{len(loaders)})"))
              for index, loader in enumerate(loaders)]
    return PrefixSuffix(model, prefix_blocks), cached
