"""Give chapter notebooks their "Open in Colab" badge and their Colab install cell.

    .venv/bin/python notebooks/add_colab_cells.py                  # every notebooks/NN_*.ipynb
    .venv/bin/python notebooks/add_colab_cells.py notebooks/11_instruction_finetuning.ipynb
    .venv/bin/python notebooks/add_colab_cells.py --check          # exit 1, naming notebooks that lack them

The badge is the first line of the notebook's first (markdown) cell and opens the notebook from the
repository named in pyproject.toml's ``[project.urls] Repository``. The install cell comes right
before the parameter cell: in Colab it pip-installs gptlora from that repository, anywhere else it
does nothing. It is tagged ``skip-execution``, which nbclient (and so tests/test_notebooks.py) skips.
Running the script again changes nothing; a changed URL replaces the old badge and cell. The file
keeps the layout Jupyter writes (JSON indented by one space, non-ASCII as is, a final newline).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: read the one line this script needs
    tomllib = None

NOTEBOOK_DIR = Path(__file__).resolve().parent
PYPROJECT = NOTEBOOK_DIR.parent / "pyproject.toml"
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
INSTALL_CELL_ID = "colab-install"
INSTALL_TAGS = ["colab-install", "skip-execution"]
BADGE_LINE = re.compile(r"^\[!\[Open in Colab\]\(.*\)\]\(.*\)\n?$")


def repository_url(pyproject: Path = PYPROJECT) -> str:
    """The repository URL of pyproject.toml's ``[project.urls]``, e.g. ``https://github.com/owner/repo``."""
    text = pyproject.read_text(encoding="utf-8")
    if tomllib is not None:
        url = tomllib.loads(text)["project"].get("urls", {}).get("Repository", "")
    else:
        found = re.search(r"(?ms)^\[project\.urls\][^\[]*?^Repository\s*=\s*\"([^\"]*)\"", text)
        url = found.group(1) if found else ""
    url = url.rstrip("/")
    if not re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url):
        raise ValueError(f"expected [project.urls] Repository = \"https://github.com/OWNER/REPO\" in {pyproject}, "
                         f"found {url or 'none'}; set it there, then run this script again")
    return url


def colab_link(notebook_name: str, url: str) -> str:
    """Where Colab opens ``notebooks/<notebook_name>`` of the repository's main branch."""
    return url.replace("https://github.com/", "https://colab.research.google.com/github/") + \
        f"/blob/main/notebooks/{notebook_name}"


def badge_line(notebook_name: str, url: str) -> str:
    return f"[![Open in Colab]({BADGE_IMAGE})]({colab_link(notebook_name, url)})\n"


def install_source(url: str) -> list[str]:
    """The install cell's lines (plain Python, so that it also runs where IPython's %pip does not)."""
    return [
        "# In Google Colab, install gptlora from its repository first; anywhere else this cell does nothing.\n",
        "import subprocess\n",
        "import sys\n",
        "\n",
        "if \"google.colab\" in sys.modules:\n",
        f"    subprocess.run([sys.executable, \"-m\", \"pip\", \"install\", \"--quiet\", \"gptlora @ git+{url}\"], check=True)",
    ]


def install_cell(url: str) -> dict:
    return {"cell_type": "code", "execution_count": None, "id": INSTALL_CELL_ID,
            "metadata": {"tags": list(INSTALL_TAGS)}, "outputs": [], "source": install_source(url)}


def with_colab_cells(nb: dict, notebook_name: str, url: str) -> dict:
    """``nb`` (notebook JSON) with the badge on top of its first cell and the install cell before its first
    code cell; an earlier badge or install cell is replaced, so the result is the same however often it runs."""
    cells = [cell for cell in nb["cells"] if "colab-install" not in cell.get("metadata", {}).get("tags", [])]
    if not cells or cells[0]["cell_type"] != "markdown":
        raise ValueError(f"{notebook_name}: expected a markdown cell first (the title), "
                         f"found {cells[0]['cell_type'] if cells else 'no cells'}")
    source = cells[0]["source"]
    lines = source.splitlines(keepends=True) if isinstance(source, str) else list(source)
    if lines and BADGE_LINE.match(lines[0]):
        lines = lines[2:] if len(lines) > 1 and not lines[1].strip() else lines[1:]
    cells[0] = {**cells[0], "source": [badge_line(notebook_name, url), "\n", *lines]}
    first_code = next((i for i, cell in enumerate(cells) if cell["cell_type"] == "code"), len(cells))
    cells.insert(first_code, install_cell(url))
    return {**nb, "cells": cells}


def notebook_text(nb: dict) -> str:
    """The file's text as Jupyter writes it."""
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def update(path: Path, url: str, check_only: bool = False) -> bool:
    """Give ``path`` its badge and install cell; True when the file was (or, checking, would be) changed."""
    text = path.read_text(encoding="utf-8")
    wanted = notebook_text(with_colab_cells(json.loads(text), path.name, url))
    if wanted == text:
        return False
    if not check_only:
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(wanted, encoding="utf-8")
        temporary.replace(path)  # never a half-written notebook
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every notebooks/NN_*.ipynb")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a notebook lacks them")
    args = parser.parse_args(argv)
    try:
        url = repository_url()
        paths = args.notebooks or sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
        changed = [path for path in paths if update(path, url, check_only=args.check)]
    except (OSError, ValueError) as error:  # json.JSONDecodeError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path in changed:
        print(f"{path}: {'lacks' if args.check else 'given'} the Colab badge and install cell")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
