"""The parameter cell of every notebook: defaults for a reader's machine, overridable from the environment.

Each notebook's parameter cell (tagged ``parameters``; the first code cell after Colab's install cell)
is one call::

    params = notebook_params(new_tokens=50)   # this notebook's own defaults

and then uses ``params.model``, ``params.data_dir``, ... The same notebooks thus
run with the real ``gpt2-small`` on a user's machine and with a small local
checkpoint in CI, where the test sets these variables:

=====================  ==============  ==================================================
variable               field           meaning (default)
=====================  ==============  ==================================================
GPTLORA_MODEL          model           a preset (``gpt2-small``, ``124M``, ...) or a
                                       checkpoint directory (``gpt2-small``)
GPTLORA_DATA_DIR       data_dir        downloaded and prepared data (``../data``)
GPTLORA_WEIGHTS_DIR    weights_dir     downloaded checkpoints (``../weights``)
GPTLORA_RUNS_DIR       runs_dir        fine-tuning runs and adapters (``../runs``)
GPTLORA_OUTPUT_DIR     output_dir      PNG copies of the plots (``../runs/figures``)
GPTLORA_EPOCHS         epochs          training epochs (5)
GPTLORA_NEW_TOKENS     new_tokens      tokens to generate (25)
GPTLORA_RECORDS        records         records of a data set to use, from its start
                                       (0: all of them)
GPTLORA_DEVICE         device          ``auto`` (CUDA if present, else CPU), ``cpu``, ``cuda``
=====================  ==============  ==================================================

Relative paths are relative to the notebook's folder (Jupyter's working directory).
Precedence: environment variable, then the notebook's own default, then the one above.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from ..infra.atomic import replace_atomically
from ..model import PRESET_ALIASES, PRESETS

ENV_PREFIX = "GPTLORA_"


@dataclass(frozen=True)
class NotebookParams:
    """Model choice, folders and run lengths shared by the notebooks (see the module docstring)."""

    model: str = "gpt2-small"
    data_dir: Path = Path("../data")
    weights_dir: Path = Path("../weights")
    runs_dir: Path = Path("../runs")
    output_dir: Path = Path("../runs/figures")
    epochs: int = 5
    new_tokens: int = 25
    records: int = 0
    device: str = "auto"

    @property
    def model_is_preset(self) -> bool:
        """True when ``model`` names a GPT-2 size rather than a checkpoint directory."""
        return self.model in PRESETS or self.model in PRESET_ALIASES

    def torch_device(self):
        """``device`` as a ``torch.device``; ``auto`` picks CUDA when it is available."""
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def save_figure(self, figure, file_name: str) -> Path:
        """Write ``figure`` (a matplotlib Figure) as PNG to ``output_dir / file_name``; return the path.

        The notebook still shows the figure inline; this keeps a copy for slides and reports.
        """
        path = self.output_dir / file_name
        with replace_atomically(path) as tmp:
            figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        return path

    def show_saved_figure(self, png_path, file_name: str) -> Path:
        """Show a PNG the package already wrote (e.g. a run's ``loss.png``) inline; copy it to ``output_dir / file_name``.

        For plots made outside the notebook, so that they too are both shown and kept
        with the others. Returns the copy's path.
        """
        from IPython.display import Image, display

        data = Path(png_path).read_bytes()
        path = self.output_dir / file_name
        with replace_atomically(path) as tmp:
            tmp.write_bytes(data)
        display(Image(data=data, format="png"))
        return path


def env_name(field_name: str) -> str:
    """The environment variable that overrides ``field_name``, e.g. ``GPTLORA_DATA_DIR``."""
    return ENV_PREFIX + field_name.upper()


def notebook_params(**defaults) -> NotebookParams:
    """Parameters for one notebook: ``defaults`` (this notebook's own), overridden by ``GPTLORA_*`` variables.

    Raises ``ValueError`` for a default that is not a field, or for a variable whose
    value does not have the field's type (a whole number for ``epochs``).
    """
    fields = {f.name: f for f in dataclasses.fields(NotebookParams)}
    unknown = sorted(set(defaults) - set(fields))
    if unknown:
        raise ValueError(f"unknown notebook parameter(s) {unknown}; known: {', '.join(fields)}")
    values = dict(defaults)
    for name, field in fields.items():
        raw = os.environ.get(env_name(name))
        if raw is not None and raw != "":
            values[name] = raw
    return NotebookParams(**{name: _convert(fields[name], value) for name, value in values.items()})


def _convert(field: dataclasses.Field, value):
    """Give ``value`` (from the environment or a notebook) the type of ``field``'s default."""
    kind = type(field.default)
    if isinstance(field.default, Path):
        return Path(value)
    if kind is int:
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{field.name} ({env_name(field.name)}) must be a whole number, found {value!r}") from None
        if number < 0:
            raise ValueError(f"{field.name} ({env_name(field.name)}) must be 0 or more, found {number}")
        return number
    return str(value)
