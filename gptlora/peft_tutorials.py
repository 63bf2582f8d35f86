"""The models and data of two classic LoRA tutorials, for ``gptlora.lora`` to be checked against.

1. ``peft``'s custom-model tutorial: an MLP ``20 -> 2000 -> 200 -> 2`` (442,602
   parameters) learns whether ``sin(sum(x)) > 0`` for 1,000 random points in
   ``[0, 1)^20`` (``torch.manual_seed(0)``: 663 of class 0, 337 of class 1), then gets
   rank-3 LoRA on ``seq.0`` and ``seq.2`` (12,660 trainable of 455,262, 2.7808%).
2. LoRA from scratch on MNIST: an over-sized network ``784 -> 1000 -> 2000 -> 10``
   (2,807,010 parameters; rank-1 LoRA on its three layers adds 6,794) is pretrained,
   then fine-tuned with rank-1 adapters on the digit it gets wrong most, its base
   weights untouched. Here on scikit-learn's 8 x 8 handwritten digits (1,797 images
   shipped inside scikit-learn, no download), so the input is 64 wide.

The models are plain ``nn.Module``s: LoRA goes on with ``apply_lora`` like on GPT.
Shapes: ``N`` examples, ``F`` features, ``C`` classes.
"""

from __future__ import annotations

import torch
from torch import nn

from .model import evaluating


class TutorialMLP(nn.Module):
    """peft's tutorial MLP: ``[N, 20] -> [N, 2]`` log-probabilities, layers ``seq.0``, ``seq.2``, ``seq.4``."""

    def __init__(self, num_units_hidden: int = 2000):
        super().__init__()
        self.seq = nn.Sequential(
            nn.Linear(20, num_units_hidden), nn.ReLU(),
            nn.Linear(num_units_hidden, 200), nn.ReLU(),
            nn.Linear(200, 2), nn.LogSoftmax(dim=-1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


def sine_data(seed: int = 0, n: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """The tutorial's data: ``X`` ``[n, 20]`` uniform in [0, 1), ``y`` ``[n]`` = ``sin(X.sum(1)) > 0``.

    Drawn from a generator of its own seeded with ``seed``: the same numbers as the tutorial's
    ``torch.manual_seed(seed); torch.rand((n, 20))``, leaving PyTorch's global generator alone.
    """
    x = torch.rand((n, 20), generator=torch.Generator().manual_seed(seed))
    return x, (torch.sin(x.sum(1)) > 0).long()


class DigitsMLP(nn.Module):
    """The MNIST tutorial's over-sized network: ``[N, F] -> 1000 -> 2000 -> [N, 10]`` logits, ReLU between."""

    def __init__(self, in_features: int = 64, hidden_1: int = 1000, hidden_2: int = 2000, classes: int = 10):
        super().__init__()
        self.linear1 = nn.Linear(in_features, hidden_1)
        self.linear2 = nn.Linear(hidden_1, hidden_2)
        self.linear3 = nn.Linear(hidden_2, classes)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear3(self.relu(self.linear2(self.relu(self.linear1(x)))))


def digits_data(test_fraction: float = 0.3, seed: int = 0):
    """scikit-learn's 8 x 8 digits as ``(X_train, y_train, X_test, y_test)``: pixels ``[N, 64]`` scaled to
    [0, 1] (they run 0..16), labels ``[N]``; the split is stratified by digit and fixed by ``seed``."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise ImportError("the digits tutorial needs scikit-learn: pip install -e '.[notebooks]'") from None
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(digits.data / 16.0, digits.target, test_size=test_fraction,
                                                        stratify=digits.target, random_state=seed)
    as_x, as_y = (lambda a: torch.tensor(a, dtype=torch.float32)), (lambda a: torch.tensor(a, dtype=torch.long))
    return as_x(x_train), as_y(y_train), as_x(x_test), as_y(y_test)


def train_mlp(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 1, lr: float = 1e-3,
              batch_size: int = 64, max_steps: int | None = None, log_probs: bool = False) -> list[float]:
    """Adam on the trainable parameters over shuffled batches of ``(x [N, F], y [N])``; the batch losses.

    The loss is cross-entropy on the model's outputs (``log_probs=True``: they already are
    log-probabilities, as ``TutorialMLP``'s, so negative log-likelihood). Shuffles with
    PyTorch's global generator; stops after ``max_steps`` batches if given.

    A loop of its own, on purpose: the tutorials train with plain Adam on in-memory tensors
    (no data loaders, evaluation, checkpoints or processes), and their numbers come from that
    recipe; the spam classifier's loop (``classifier.train_classifier``) is built for the rest.
    """
    loss_fn = nn.NLLLoss() if log_probs else nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    model.train()
    for _ in range(epochs):
        for rows in torch.randperm(len(x)).split(batch_size):
            if max_steps is not None and len(losses) >= max_steps:
                return losses
            optimizer.zero_grad()
            loss = loss_fn(model(x[rows]), y[rows])
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses


def wrong_per_class(model: nn.Module, x: torch.Tensor, y: torch.Tensor, classes: int = 10) -> list[int]:
    """How many examples of each class ``model`` gets wrong: a list of ``classes`` counts."""
    with evaluating(model):
        predicted = model(x).argmax(dim=-1)
    wrong = y[predicted != y]
    return torch.bincount(wrong, minlength=classes).tolist()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction (0 to 1) of rows of ``x`` whose arg-max output is ``y``."""
    with evaluating(model):
        return (model(x).argmax(dim=-1) == y).float().mean().item()
