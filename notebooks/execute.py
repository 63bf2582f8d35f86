"""Execute the chapter notebooks and write them back with their outputs, the same on any machine.

    .venv/bin/python notebooks/execute.py                       # every notebooks/NN_*.ipynb, in order
    .venv/bin/python notebooks/execute.py notebooks/06_classification_finetuning.ipynb
    .venv/bin/python notebooks/execute.py --check               # exit 1 naming each notebook whose outputs are stale

Each notebook records how it is executed in its metadata, ``metadata["gptlora"]["execute"]``:

* ``parameters``: the notebook's ``GPTLORA_*`` parameters (``gptlora.teaching.notebook_params``) other than the
  folders, which all point into one temporary workspace. ``"model": "stand-in"`` is a GPT-2-shaped checkpoint
  with random weights (``STAND_IN``), for notebooks that need the released GPT-2 weights, which these
  machines cannot download; ``stand_in_note`` then says what GPT-2 small gives (the book's figures), and a visible
  line in the parameter cell's output says that the numbers below come from the stand-in.
* ``needs``: earlier notebooks (file stems) whose files this one reads; executing it alone runs them first.
* ``note``: a line shown with the outputs, e.g. why a run is shorter than the notebook's default.
* ``check``: ``"compare"`` for notebooks cheap enough that tests/test_notebooks.py runs them again and
  compares every output (through nbval, with ``nbval_sanitize.cfg``); ``"fingerprint"`` for the expensive
  ones: the script records the SHA-256 of every gptlora module the kernel had loaded (of its code: docstrings,
  comments and layout left out), of every input data file
  it opened (and those of the notebooks it needs), and of each code cell, and the test checks those.

What varies from machine to machine is taken out of the outputs before they are written (``SANITIZERS``):
the workspace and repository paths, memory addresses, progress bars (a widget's, or a text bar's redraws);
execution counts are numbered from 1. Timings stay as measured, and the parameter cell's output names the machine they were measured on.
Plots are PNGs at ``PLOT_DPI``. Inputs come from ``../shared/data`` (copied into the workspace as if
downloaded); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

NOTEBOOK_DIR = Path(__file__).resolve().parent
REPO_ROOT = NOTEBOOK_DIR.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
SANITIZE_FILE = NOTEBOOK_DIR / "nbval_sanitize.cfg"
STAND_IN = "stand-in"
# A GPT-2-shaped model small enough that fine-tuning it for an epoch takes seconds on a CPU.
STAND_IN_SHAPE = dict(vocab_size=50257, context_length=1024, emb_dim=64, n_heads=4, n_layers=2, qkv_bias=True)
PLOT_DPI = 80
CELL_TIMEOUT_S = 3600
FOLDERS = ("data_dir", "weights_dir", "runs_dir", "output_dir")
REFRESH = ".venv/bin/python notebooks/execute.py"
WORKSPACE_MARK = "<workspace>"
REPO_MARK = "<repo>"
ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")

# Run before the notebook's first cell, in its kernel, and removed again: the plots' resolution, and a record
# of the files the notebook opens (Python's audit hook sees every open()).
SETUP_CELL = f"""\
%config InlineBackend.rc = {{"figure.dpi": {PLOT_DPI}}}
import os as _os, sys as _sys
_gptlora_opened = set()
def _gptlora_audit(event, args):
    if event == "open" and isinstance(args[0], (str, _os.PathLike)):
        _gptlora_opened.add(_os.path.abspath(_os.fspath(args[0])))
_sys.addaudithook(_gptlora_audit)
"""
# Run after the notebook's last cell, and removed again: what it ran on.
REPORT_CELL = """\
import json as _json
print(_json.dumps({"modules": sorted({m.__file__ for n, m in list(_sys.modules.items())
                                      if n.split(".")[0] == "gptlora" and getattr(m, "__file__", None)}),
                   "opened": sorted(_gptlora_opened)}))
"""


def notebooks() -> list[Path]:
    return sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


def settings(nb) -> dict:
    """The notebook's ``metadata.gptlora.execute`` (parameters, needs, check, stand_in_note)."""
    return nb.metadata.get("gptlora", {}).get("execute", {})


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def code_sha256(path: Path) -> str:
    """SHA-256 of a Python module's code: its syntax tree without docstrings, comments or layout, so that
    rewording a docstring (the package's chapter map, say) does not make every notebook's outputs stale,
    while any change to what runs does."""
    import ast

    tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return text_sha256(ast.dump(tree, include_attributes=False))


def machine() -> str:
    """The CPU (or GPU) the outputs were made on, as a reader would name it."""
    cpu = platform.processor() or platform.machine()
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = found.group(1).strip() if found else cpu
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


# ----------------------------------------------------------------------------------------------- the workspace
def prepare_workspace(root: Path) -> dict:
    """Folders and inputs for a run under ``root``; returns the environment's ``GPTLORA_*`` folder variables.

    The data of ``../shared/data`` is copied to ``root/data`` where a notebook would download it; the SMS
    collection is also named by ``GPTLORA_SPAM_SOURCE``; ``GPTLORA_OFFLINE=1`` makes a download fail at once;
    the tokenizer's files come from ``TIKTOKEN_CACHE_DIR``, else from ``../shared/tiktoken-cache`` when it is there.
    """
    from gptlora.teaching.notebook_params import env_name

    root = Path(root)
    if SHARED_DATA.is_dir():
        shutil.copytree(SHARED_DATA, root / "data", dirs_exist_ok=True)
    env = {env_name(name): str(root / name.removesuffix("_dir").replace("output", "figures")) for name in FOLDERS}
    env.update({"GPTLORA_OFFLINE": "1", env_name("device"): "cpu",
                "GPTLORA_SPAM_SOURCE": str(root / "data" / "sms_spam_collection" / "SMSSpamCollection")})
    shared_cache = SHARED_DATA.parent / "tiktoken-cache"
    if "TIKTOKEN_CACHE_DIR" not in os.environ and shared_cache.is_dir():
        env["TIKTOKEN_CACHE_DIR"] = str(shared_cache)
    return env


def stand_in_checkpoint(root: Path) -> Path:
    """A GPT-2-shaped checkpoint with random weights (seed 123) in Hugging Face's layout, under ``root``."""
    import torch

    from gptlora.model import GPTConfig, GPTModel
    from gptlora.pretrained import save_hf

    directory = Path(root) / "weights" / STAND_IN
    if not (directory / "model.safetensors").is_file():
        torch.manual_seed(123)
        model = GPTModel(GPTConfig(**STAND_IN_SHAPE))
        model.tie_weights()  # as GPT-2's released checkpoints: the head is the token embedding
        save_hf(model, directory)
    return directory


def parameter_env(nb, root: Path) -> dict:
    """The ``GPTLORA_*`` variables of ``nb``'s recorded parameters (the stand-in resolved under ``root``)."""
    from gptlora.teaching.notebook_params import env_name

    env = {}
    for name, value in settings(nb).get("parameters", {}).items():
        if name in FOLDERS:
            raise ValueError(f"{name} is set by the workspace; remove it from the notebook's execute parameters")
        env[env_name(name)] = str(stand_in_checkpoint(root)) if value == STAND_IN else str(value)
    return env


# ----------------------------------------------------------------------------------------------- the outputs
def sanitizers(stored: bool = True) -> list[tuple[re.Pattern, str]]:
    """The (pattern, replacement) pairs of nbval_sanitize.cfg, the file nbval reads too.

    Sections named ``strip ...`` clean the outputs this script writes; ``compare ...`` ones (timings) only
    make two runs comparable, and apply only when ``stored`` is False.
    """
    import configparser

    parser = configparser.ConfigParser(interpolation=None)
    parser.read(SANITIZE_FILE, encoding="utf-8")
    return [(re.compile(parser[section]["regex"]), parser[section]["replace"]) for section in parser.sections()
            if section.startswith("strip") or not stored]


def sanitize_text(text: str, root: Path) -> str:
    """``text`` without what differs between machines: paths, progress-bar redraws, then SANITIZERS."""
    for path, mark in ((Path(root).resolve(), WORKSPACE_MARK), (Path(root), WORKSPACE_MARK),
                       (REPO_ROOT, REPO_MARK)):
        text = text.replace(str(path), mark)
    text = "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))  # a progress bar's last state
    for pattern, replacement in SANITIZERS:
        text = pattern.sub(replacement, text)
    return text


def clean_outputs(nb, root: Path) -> None:
    """Sanitise every text output of ``nb`` in place and number the executed cells from 1."""
    count = 0
    nb.metadata.pop("widgets", None)  # the progress-bar widgets' state, dropped with them below
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.execution_count = None if cell.execution_count is None else (count := count + 1)
        # tqdm's notebook progress bars are widgets whose state is not saved: a file shows them as "0%"
        cell.outputs = [output for output in cell.outputs
                        if "application/vnd.jupyter.widget-view+json" not in output.get("data", {})]
        for output in cell.outputs:
            if "text" in output:
                output["text"] = sanitize_text(output["text"], root)
            for kind, value in output.get("data", {}).items():
                if kind.startswith("text/") and isinstance(value, str):
                    output["data"][kind] = sanitize_text(value, root)
            if output.get("output_type") == "execute_result":
                output["execution_count"] = cell.execution_count
        cell.metadata.pop("execution", None)


def note_cell_output(nb) -> dict:
    """The visible line in the parameter cell's output: where the outputs were made, and on what model."""
    import nbformat

    lines = [f"[outputs made by notebooks/execute.py on {machine()}; timings are that machine's]"]
    if settings(nb).get("note"):
        lines.append(f"[{settings(nb)['note']}]")
    note = settings(nb).get("stand_in_note")
    if settings(nb).get("parameters", {}).get("model") == STAND_IN:
        lines.append("[run on a random-weight stand-in (GPT-2's vocabulary and layout, 2 layers of width 64), since "
                     "the released GPT-2 weights cannot be downloaded where these outputs were made: its losses, "
                     "accuracies and texts mean nothing" + (f"; with GPT-2 small, {note}]" if note else "]"))
    return nbformat.v4.new_output("stream", name="stdout", text="\n".join(lines) + "\n")


def parameter_cell(nb):
    return next(cell for cell in nb.cells if "parameters" in cell.metadata.get("tags", []))


# ----------------------------------------------------------------------------------------------- fingerprints
def code_cell_hashes(nb) -> dict:
    """SHA-256 of each code cell's source by cell index (the Colab install cell, which names the URL, left out)."""
    return {str(index): text_sha256(cell.source) for index, cell in enumerate(nb.cells)
            if cell.cell_type == "code" and "colab-install" not in cell.metadata.get("tags", [])}


def fingerprint(report: dict, root: Path) -> dict:
    """The modules (relative to the repository) and input files (relative to ../shared) a run used, hashed."""
    modules = {}
    for file in report["modules"]:
        path = Path(file).resolve()
        if path.is_relative_to(REPO_ROOT):
            modules[str(path.relative_to(REPO_ROOT))] = code_sha256(path)
    data, copies = {}, (Path(root) / "data").resolve()
    for file in report["opened"]:
        path = Path(file).resolve()
        if path.is_relative_to(copies) and (SHARED_DATA / path.relative_to(copies)).is_file():
            data[str(Path("data") / path.relative_to(copies))] = sha256(SHARED_DATA / path.relative_to(copies))
    return {"modules": modules, "data": data}


def merged(*prints: dict) -> dict:
    return {key: dict(sorted({k: v for p in prints for k, v in p.get(key, {}).items()}.items()))
            for key in ("modules", "data")}


def stale_reason(path: Path) -> str | None:
    """None when ``path``'s recorded fingerprint matches the code and data now; else one line saying what changed."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    recorded = nb.metadata.get("gptlora", {}).get("fingerprint")
    refresh = f"refresh its outputs: {REFRESH} notebooks/{path.name}"
    if not recorded:
        return f"notebooks/{path.name} has no recorded fingerprint; {refresh}"
    now = code_cell_hashes(nb)
    for index in sorted(set(now) | set(recorded["cells"]), key=int):
        if now.get(index) != recorded["cells"].get(index):
            return f"notebooks/{path.name}, cell {index}: its code changed since its outputs were made; {refresh}"
    for name, digest in recorded["modules"].items():
        if not (REPO_ROOT / name).is_file() or code_sha256(REPO_ROOT / name) != digest:
            return f"notebooks/{path.name}: {name} changed since its outputs were made; {refresh}"
    for name, digest in recorded["data"].items():
        if (SHARED_DATA.parent / name).is_file() and sha256(SHARED_DATA.parent / name) != digest:
            return f"notebooks/{path.name}: ../shared/{name} changed since its outputs were made; {refresh}"
    return None


# ----------------------------------------------------------------------------------------------- executing
def run(nb, env: dict, name: str) -> dict:
    """Execute ``nb`` in place (cwd notebooks/) between the setup and report cells; return the report."""
    import nbformat
    from nbclient import NotebookClient

    nb.cells.insert(0, nbformat.v4.new_code_cell(SETUP_CELL))
    nb.cells.append(nbformat.v4.new_code_cell(REPORT_CELL))
    kernel_env = {**os.environ, **env, "JUPYTER_PREFER_ENV_PATH": "1"}
    kernel_env.pop("MPLBACKEND", None)  # the kernel's inline backend, as in Jupyter
    try:
        NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                       resources={"metadata": {"path": str(NOTEBOOK_DIR)}}).execute(env=kernel_env)
    finally:
        report_cell = nb.cells.pop()
        nb.cells.pop(0)
    return json.loads(report_cell.outputs[-1]["text"])


def execute(path: Path, root: Path, done: dict, write: bool = True) -> dict:
    """Execute ``path`` (after the notebooks it needs, unless ``done`` has them) in the workspace ``root``.

    Writes the notebook back with its cleaned outputs and fingerprint when ``write``. Returns the fingerprint,
    also kept in ``done`` by stem.
    """
    import nbformat

    nb = nbformat.read(path, as_version=4)
    for need in settings(nb).get("needs", []):
        if need not in done:
            execute(NOTEBOOK_DIR / f"{need}.ipynb", root, done, write=False)
    print(f"{path.name}: executing", flush=True)
    started = time.perf_counter()
    env = {**prepare_workspace(root), **parameter_env(nb, root)}
    report = run(nb, env, path.name)
    done[path.stem] = merged(fingerprint(report, root), *(done[need] for need in settings(nb).get("needs", [])))
    print(f"{path.name}: {time.perf_counter() - started:.0f} s", flush=True)
    if write:
        clean_outputs(nb, root)
        parameters = parameter_cell(nb)
        parameters.outputs.insert(0, note_cell_output(nb))
        if "nbval-ignore-output" not in parameters.metadata.setdefault("tags", []):
            parameters.metadata.tags.append("nbval-ignore-output")  # its folders and note are the workspace's
        nb.metadata.setdefault("gptlora", {})["fingerprint"] = {"cells": code_cell_hashes(nb), **done[path.stem]}
        write_notebook(nb, path)
    return done[path.stem]


def write_notebook(nb, path: Path) -> None:
    """Write ``nb`` as Jupyter does (sources and texts as lists of lines, keys sorted, a final newline), atomically."""
    import nbformat

    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(nbformat.writes(nb).rstrip("\n") + "\n", encoding="utf-8")
    temporary.replace(path)  # never a half-written notebook


SANITIZERS = sanitizers()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every notebooks/NN_*.ipynb, in order")
    parser.add_argument("--check", action="store_true", help="execute nothing; exit 1 naming stale notebooks")
    parser.add_argument("--keep", type=Path, help="keep the workspace in this folder (default: a temporary one)")
    args = parser.parse_args(argv)
    paths = sorted(path.resolve() for path in args.notebooks) or notebooks()
    if args.check:
        reasons = [reason for path in paths if (reason := stale_reason(path))]
        print("\n".join(reasons) or f"{len(paths)} notebook(s) up to date")
        return 1 if reasons else 0
    root = args.keep or Path(tempfile.mkdtemp(prefix="gptlora-execute-"))
    done: dict = {}
    try:
        for path in paths:
            execute(path, root, done)
    except Exception as error:  # a failing cell: what failed, where, the workspace kept for a look
        failed = next((f"cell {index}" for index, cell in enumerate(getattr(error, "notebook_cells", [])) if any(
            output.get("output_type") == "error" for output in cell.get("outputs", []))), "")
        print(f"error: {failed} {getattr(error, 'ename', type(error).__name__)}: "
              f"{getattr(error, 'evalue', error)}\n{ANSI_COLOUR.sub('', str(error))[-3000:]}\n"
              f"(workspace kept in {root})", file=sys.stderr)
        return 1
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
