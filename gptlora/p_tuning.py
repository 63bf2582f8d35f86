"""P-tuning (Liu et al., 2021, "GPT Understands, Too"): a soft prompt made by a small trainable encoder.

Prompt tuning trains the ``n`` prompt vectors ``[n, D]`` directly. P-tuning trains an
input ``embedding [n, D]`` *and* a prompt encoder that turns it into the prompt; the
paper found that the vectors, made this way, depend on one another and train more
stably than free ones. Two encoders, as ``peft``'s ``PromptEncoderConfig``
(``encoder_reparameterization_type``):

- ``"mlp"``: ``Linear(D, h) -> ReLU -> Linear(h, h) -> ReLU -> Linear(h, D)``.
- ``"lstm"``: a bidirectional LSTM over the ``n`` positions (``num_layers`` layers of
  width ``h`` each way), then ``Linear(2h, 2h) -> ReLU -> Linear(2h, D)``.

``h`` defaults to ``D`` (as ``peft``). The parameters carry ``peft``'s names and are
created in its order, so under one seed both start from the same numbers (tested).
Everything else is prompt tuning's: the prompt goes in front of the token embeddings
(``PromptTunedGPT``), files and the ``peft`` export live in ``prompt_tuning_io.py``.
After training only the encoder's output matters: ``vectors()`` ``[n, D]`` is what
``peft`` saves, and what the export writes.
"""

from __future__ import annotations

import torch
from torch import nn

from .model import GPTModel
from .prompt_tuning import PromptTunedGPT, check_virtual_tokens, freeze_base

ENCODERS = ("mlp", "lstm")


def check_encoder(encoder, hidden=None) -> None:
    """Raise ``ValueError`` unless ``encoder`` is one of ``ENCODERS`` and ``hidden`` None or a positive integer."""
    if encoder not in ENCODERS:
        raise ValueError(f"unknown P-tuning prompt encoder {encoder!r}; choose one of {', '.join(ENCODERS)}")
    if hidden is not None and (isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1):
        raise ValueError(f"the prompt encoder's hidden width must be a positive integer (e.g. 768), found {hidden!r}")


class PromptEncoder(nn.Module):
    """``embedding [n, D]`` through the encoder gives the soft prompt ``[n, D]``; ``forward(B)`` gives ``[B, n, D]``."""

    def __init__(self, num_virtual_tokens: int, emb_dim: int, encoder: str = "mlp", hidden: int | None = None,
                 num_layers: int = 2, dropout: float = 0.0):
        super().__init__()
        check_encoder(encoder, hidden)
        self.encoder_type, self.hidden, self.num_layers = encoder, hidden or emb_dim, num_layers
        h = self.hidden
        self.embedding = nn.Embedding(num_virtual_tokens, emb_dim)  # N(0, 1) start, as peft's
        if encoder == "lstm":
            self.lstm_head = nn.LSTM(emb_dim, h, num_layers=num_layers, dropout=dropout, bidirectional=True,
                                     batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, emb_dim))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(emb_dim, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                                          nn.Linear(h, emb_dim))

    num_virtual_tokens = property(lambda self: self.embedding.num_embeddings)

    def vectors(self) -> torch.Tensor:
        """The soft prompt ``[n, D]`` (computed once per call, the same for every row of a batch)."""
        inputs = self.embedding.weight  # [n, D]
        if self.encoder_type == "lstm":  # the LSTM reads the n positions as one sequence, both ways
            return self.mlp_head(self.lstm_head(inputs.unsqueeze(0))[0])[0]
        return self.mlp_head(inputs)

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.vectors().unsqueeze(0).expand(batch_size, -1, -1)


class PTunedGPT(PromptTunedGPT):
    """P-tuning: prompt tuning whose prompt comes out of a ``PromptEncoder``; ``[B, T] -> [B, T, V]``."""

    method = "p-tuning"


def apply_p_tuning(base: GPTModel, num_virtual_tokens: int, encoder: str = "mlp", hidden: int | None = None,
                   init_ids: list[int] | None = None, modules_to_save=None) -> PTunedGPT:
    """Freeze ``base`` and return it wrapped with a trainable prompt encoder of ``num_virtual_tokens``.

    The encoder's input starts as standard normal draws (PyTorch's global generator, as
    ``peft``), or as the token embeddings of ``init_ids`` (a task description).
    ``modules_to_save`` (e.g. ``["out_head"]``) also train, in full.
    """
    check_virtual_tokens(num_virtual_tokens, base.cfg.context_length)
    if init_ids is not None and len(init_ids) != num_virtual_tokens:
        raise ValueError(f"expected {num_virtual_tokens} init token ids, found {len(init_ids)}; see init_token_ids")
    device = base.tok_emb.weight.device
    prompt = PromptEncoder(num_virtual_tokens, base.cfg.emb_dim, encoder, hidden).to(device)
    if init_ids is not None:
        with torch.no_grad():
            prompt.embedding.weight.copy_(base.tok_emb(torch.tensor(init_ids, device=device)))
    freeze_base(base, modules_to_save)
    return PTunedGPT(base, prompt)
