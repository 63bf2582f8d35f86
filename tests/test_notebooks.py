"""Execute every notebook in notebooks/, in numeric order, the way a class would.

All notebooks share one temporary workspace (data, weights, runs and figure folders
passed through the ``GPTLORA_*`` variables of ``gptlora.teaching.notebook_params``), so later
notebooks read what earlier ones wrote (05's parquet files, 06's run) and the repository
itself stays clean. From notebook 03 on, ``GPTLORA_MODEL`` is a small GPT-2-shaped
checkpoint written here (03 pretrains a model of its shape from random weights), and ``GPTLORA_EPOCHS=1`` keeps the fine-tuning of 06 and 07 short.

The notebooks are committed with their outputs (``notebooks/execute.py`` writes them). Those marked
``"check": "compare"`` in their metadata are cheap: instead of the short run, they run here with the
parameters they were executed with, and nbval compares every output with the committed one (after
``notebooks/nbval_sanitize.cfg``). The others are checked against the fingerprint execute.py recorded:
the code cells, and the gptlora modules and input files the run used.
"""

from __future__ import annotations

import importlib.util
import json
import xml.etree.ElementTree as ElementTree
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError

from gptlora.teaching.notebook_params import env_name, notebook_params

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
CELL_TIMEOUT_S = 180
# Folders a notebook would write to when run by hand; the test must leave them as they were.
REPO_OUTPUT_DIRS = ("data", "weights", "runs", "notebooks")
ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


def load_colab_script(name: str):
    """notebooks/<name>.py as a module, without leaving a __pycache__ in notebooks/."""
    spec = importlib.util.spec_from_file_location(name, NOTEBOOK_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    writes_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = writes_bytecode
    return module


colab = load_colab_script("add_colab_cells")
executor = load_colab_script("execute")
REPOSITORY = colab.repository_url()  # pyproject.toml's [project.urls] Repository
NOTEBOOKS_SIZE_LIMIT = 10 * 1024**2


def is_install_cell(cell) -> bool:
    return "colab-install" in cell.metadata.get("tags", [])


def notebook_number(path: Path) -> int:
    return int(path.name[:2])


def write_tiny_checkpoint(directory: Path) -> Path:
    """A randomly initialised GPT-2 in the real Hugging Face layout (config.json + model.safetensors)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=50257)
    GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, spam_file) -> dict:
    """The environment all notebooks run under, and where they write (one per test module)."""
    root = tmp_path_factory.mktemp("notebooks")
    env = {
        env_name("data_dir"): str(root / "data"),
        env_name("weights_dir"): str(root / "weights"),
        env_name("runs_dir"): str(root / "runs"),
        env_name("output_dir"): str(root / "figures"),
        env_name("new_tokens"): "4",  # enough to slide notebook 02's 6-token window
        env_name("epochs"): "1",
        env_name("records"): "60",  # notebooks 11 and 12 tune on the first 60 records (51 train)
        env_name("device"): "cpu",
        "GPTLORA_SPAM_SOURCE": str(spam_file),
        "GPTLORA_OFFLINE": "1",  # a notebook that tries to download fails here instead of hanging
        # One thread per kernel: with these small matrices, waking a second thread costs more than it
        # saves, and on cores shared with other jobs each wake-up can wait a whole scheduler tick
        # (measured: notebook 02 took 30 s with two threads, 8 s with one, on 2 busy cores).
        "OMP_NUM_THREADS": "1",
    }
    verdict = root / "data" / "the-verdict" / "the-verdict.txt"  # as notebook 03 downloads it (offline here)
    verdict.parent.mkdir(parents=True)
    verdict.write_bytes((REPO_ROOT.parent / "shared" / "data" / "the-verdict" / "the-verdict.txt").read_bytes())
    instructions = root / "data" / "instruction-data" / "instruction-data.json"  # as notebook 11 downloads it
    instructions.parent.mkdir(parents=True)
    instructions.write_bytes((REPO_ROOT.parent / "shared" / "data" / "instruction-data" /
                              "instruction-data.json").read_bytes())
    preferences = root / "data" / "preference-data" / "instruction-data-with-preference.json"  # notebook 12's
    preferences.parent.mkdir(parents=True)
    preferences.write_bytes((REPO_ROOT.parent / "shared" / "data" / "preference-data" /
                             "instruction-data-with-preference.json").read_bytes())
    return {"root": root, "env": env, "checkpoint": None}


def checkpoint_for(workspace: dict) -> Path:
    """The small checkpoint, written on first use (transformers is slow to import)."""
    if workspace["checkpoint"] is None:
        workspace["checkpoint"] = write_tiny_checkpoint(workspace["root"] / "tiny-gpt2")
    return workspace["checkpoint"]


def snapshot(directories) -> set[str]:
    """Every file below ``directories`` of the repository, as relative paths."""
    found = set()
    for name in directories:
        for path in (REPO_ROOT / name).rglob("*"):
            found.add(str(path.relative_to(REPO_ROOT)))
    return found


def failing_cell(nb, started: list[int]) -> tuple[int, str]:
    """Index and source of the cell that failed: the one with an error output, else the last started."""
    for index, cell in enumerate(nb.cells):
        if any(output.get("output_type") == "error" for output in cell.get("outputs", [])):
            return index, cell.source
    index = started[-1] if started else -1
    return index, nb.cells[index].source if started else ""


def execute(path: Path, env: dict, executed_copy: Path):
    """Run ``path`` in a fresh kernel with cwd notebooks/; fail the test naming the notebook and cell."""
    nb = nbformat.read(path, as_version=4)
    started: list[int] = []
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
        on_cell_execute=lambda cell, cell_index: started.append(cell_index),
    )
    try:
        client.execute(env={**os.environ, **env})
    except (CellExecutionError, CellTimeoutError) as error:
        index, source = failing_cell(nb, started)
        report = ANSI_COLOUR.sub("", str(error))  # IPython colours its tracebacks for terminals
        pytest.fail(f"{path.name}, cell index {index} (markdown counted) failed:\n{source}\n\n{report}",
                    pytrace=False)
    finally:
        executed_copy.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, executed_copy)
    return nb


def inline_images(nb) -> int:
    return sum("image/png" in output.get("data", {})
               for cell in nb.cells if cell.cell_type == "code" for output in cell.outputs)


def test_kernel_runs_in_this_environment(monkeypatch):
    """``python3`` must start this virtual environment's interpreter, not another Python on the machine."""
    monkeypatch.setenv("JUPYTER_PREFER_ENV_PATH", "1")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import sys; print(sys.prefix)")])
    NotebookClient(nb, kernel_name="python3", timeout=60).execute()
    assert nb.cells[0].outputs[0]["text"].strip() == sys.prefix


def test_there_are_notebooks_in_sequence():
    numbers = [notebook_number(path) for path in NOTEBOOKS]
    assert numbers == list(range(1, len(numbers) + 1)), \
        f"expected notebooks numbered from 01_... without gaps in {NOTEBOOK_DIR}, found {numbers}"


def check_of(path: Path) -> str:
    return executor.settings(nbformat.read(path, as_version=4)).get("check", "")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_is_committed_with_clean_outputs(path):
    """Outputs as execute.py writes them: none of this machine's paths or addresses, counts from 1, a note."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    refresh = f"run `{executor.REFRESH} notebooks/{path.name}`"
    assert check_of(path) in ("compare", "fingerprint"), \
        f"{path.name}: metadata.gptlora.execute.check must be 'compare' or 'fingerprint' (see notebooks/execute.py)"
    code = [cell for cell in nb.cells if cell.cell_type == "code" and not is_install_cell(cell)]
    counts = [cell.execution_count for cell in code]
    assert counts == list(range(1, len(code) + 1)), f"{path.name} is not executed as a whole (counts {counts}); {refresh}"
    text = json.dumps([cell.outputs for cell in code])
    for leak in (str(REPO_ROOT), str(REPO_ROOT.parent / "shared"), "/tmp/", "/home/", "/root/"):
        assert leak not in text, f"{path.name}: an output shows the path {leak}; {refresh}"
    assert not re.search(r"\b0x[0-9a-f]{8,}", text), f"{path.name}: an output shows a memory address; {refresh}"
    note = "".join(output.get("text", "") for output in parameter_cell(nb).outputs)
    assert "[outputs made by notebooks/execute.py on " in note, f"{path.name}: the parameter cell lacks the note; {refresh}"
    if executor.settings(nb).get("parameters", {}).get("model") == executor.STAND_IN:
        assert "[run on a random-weight stand-in" in note, f"{path.name}: the stand-in note is missing; {refresh}"
    first_parameters = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
    after_install = [cell for cell in nb.cells if cell.cell_type == "code" and not is_install_cell(cell)]
    assert first_parameters and nb.cells[first_parameters[0]] is after_install[0], \
        f"{path.name}: the first code cell after Colab's install cell must be the parameter cell, tagged 'parameters'"
    assert re.search(r"Needs from earlier notebooks", nb.cells[0].source), \
        f"{path.name}: the first cell must say what the notebook needs from earlier ones"


def parameter_cell(nb):
    return next(cell for cell in nb.cells if "parameters" in cell.metadata.get("tags", []))


def test_the_notebooks_stay_small():
    sizes = {path.name: path.stat().st_size for path in NOTEBOOK_DIR.iterdir() if path.is_file()}
    assert sum(sizes.values()) < NOTEBOOKS_SIZE_LIMIT, \
        f"notebooks/ holds {sum(sizes.values()) / 1024**2:.1f} MB, more than 10 MB: {sorted(sizes.items())}"


@pytest.mark.parametrize("path", [path for path in NOTEBOOKS if check_of(path) == "fingerprint"],
                         ids=[path.stem for path in NOTEBOOKS if check_of(path) == "fingerprint"])
def test_expensive_notebook_outputs_match_their_fingerprint(path):
    """The code cells, gptlora modules and input files the committed outputs came from are still those."""
    reason = executor.stale_reason(path)
    if reason:
        pytest.fail(reason, pytrace=False)


def test_a_stale_fingerprint_names_the_notebook_the_cell_or_the_module(tmp_path, monkeypatch):
    path = next(path for path in NOTEBOOKS if check_of(path) == "fingerprint")
    copy = tmp_path / path.name
    nb = nbformat.read(path, as_version=4)
    nbformat.write(nb, copy)
    assert executor.stale_reason(copy) is None
    module = next(iter(nb.metadata.gptlora.fingerprint.modules))
    nb.metadata.gptlora.fingerprint.modules[module] = "0" * 64
    nbformat.write(nb, copy)
    assert executor.stale_reason(copy) == (f"notebooks/{path.name}: {module} changed since its outputs were made; "
                                           f"refresh its outputs: {executor.REFRESH} notebooks/{path.name}")
    index = next(i for i, cell in enumerate(nb.cells) if cell.cell_type == "code" and not is_install_cell(cell))
    nb.cells[index].source += "\nprint('one more line')"
    nbformat.write(nb, copy)
    reason = executor.stale_reason(copy)
    assert reason.startswith(f"notebooks/{path.name}, cell {index}: its code changed") and reason.count("\n") == 0


def test_a_module_fingerprint_follows_its_code_not_its_docstrings_or_comments(tmp_path):
    """Rewording a docstring or a comment leaves the notebooks that loaded the module fresh; changing what runs
    (a number, a name) makes them stale."""
    module = tmp_path / "m.py"
    versions = {
        "original": '"""A module."""\n\ndef f(x):\n    """Twice x."""\n    return 2 * x  # doubled\n',
        "reworded": '"""The module, said otherwise."""\n\n\ndef f(x):\n    """x, two times."""\n    return 2 * x\n',
        "changed": '"""A module."""\n\ndef f(x):\n    """Twice x."""\n    return 3 * x  # doubled\n',
    }
    digests = {}
    for name, text in versions.items():
        module.write_text(text)
        digests[name] = executor.code_sha256(module)
    assert digests["original"] == digests["reworded"] != digests["changed"]


def test_a_changed_output_of_a_compared_notebook_fails_with_one_line_naming_it(tmp_path):
    """As for 01 and 05: an output committed that the code does not produce is found, cell and values named."""
    path = tmp_path / "99_made_up.ipynb"
    cell = nbformat.v4.new_code_cell("print(6 * 7)", execution_count=1,
                                     outputs=[nbformat.v4.new_output("stream", name="stdout", text="41\n")])
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# 99"), cell]), path)
    failures = nbval_failures(path, {}, tmp_path)
    assert failures == [f"notebooks/99_made_up.ipynb, cell 1: the output differs from the committed one (committed '41', "
                        f"now '42'); "
                        f"refresh it: {executor.REFRESH} notebooks/99_made_up.ipynb"]


def nbval_failures(path: Path, env: dict, workspace_root: Path) -> list[str]:
    """Execute ``path`` under nbval and compare its outputs with the committed ones; one line per differing cell."""
    sanitize = workspace_root / "nbval_sanitize.cfg"
    sanitize.write_text(executor.SANITIZE_FILE.read_text(encoding="utf-8") + "".join(
        f"\n[strip a path]\nregex: {re.escape(str(folder))}\nreplace: {mark}\n"
        for folder, mark in ((workspace_root.resolve(), executor.WORKSPACE_MARK), (REPO_ROOT, executor.REPO_MARK))),
        encoding="utf-8")
    report = workspace_root / f"nbval-{path.stem}.xml"
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval", str(path), "--nbval-current-env", "-p", "no:cacheprovider",
         f"--nbval-sanitize-with={sanitize}", f"--nbval-cell-timeout={CELL_TIMEOUT_S}", "-q", f"--junitxml={report}"],
        cwd=REPO_ROOT, capture_output=True, text=True,
        env={name: value for name, value in {**os.environ, **env}.items() if name != "MPLBACKEND"})  # inline plots
    if not report.is_file():
        return [f"{path.name}: nbval did not run: {(completed.stdout + completed.stderr).strip()[-500:]}"]
    code_cells = [index for index, cell in enumerate(nbformat.read(path, as_version=4).cells) if cell.cell_type == "code"]
    failures = []
    for case in ElementTree.parse(report).iter("testcase"):  # nbval names them "Cell N", N counting code cells
        if case.find("failure") is not None or case.find("error") is not None:
            ordinal = re.search(r"\d+", case.get("name"))
            cell = code_cells[int(ordinal.group())] if ordinal and int(ordinal.group()) < len(code_cells) else "?"
            problem = case.find("failure") if case.find("failure") is not None else case.find("error")
            details = ANSI_COLOUR.sub("", (problem.text or "") + (problem.get("message") or ""))
            # pytest's diff of nbval's `reference == test`: "+" lines are the committed output, "-" the new one
            lines = {sign: next((line.strip()[2:100] for line in details.splitlines()
                                 if line.strip().startswith(sign + " ")), None) for sign in "+-"}
            found = f"committed {lines['+']!r}, now {lines['-']!r}" if lines["+"] else "or the cell failed"
            failures.append(f"notebooks/{path.name}, cell {cell}: the output differs from the committed one "
                            f"({found}); refresh it: {executor.REFRESH} notebooks/{path.name}")
    return failures


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_opens_in_colab(path):
    """The badge opens this notebook from pyproject's repository; the first code cell installs gptlora from
    there in Colab only and is tagged for nbclient to skip. `python notebooks/add_colab_cells.py` adds both."""
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", REPOSITORY), REPOSITORY
    remedy = f"run `.venv/bin/python notebooks/add_colab_cells.py {path.relative_to(REPO_ROOT)}`"
    nb = nbformat.read(path, as_version=4)
    owner_repo = REPOSITORY.removeprefix("https://github.com/")
    badge = (f"[![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
             f"(https://colab.research.google.com/github/{owner_repo}/blob/main/notebooks/{path.name})")
    assert nb.cells[0].source.splitlines()[0] == badge, f"{path.name}: the first line is not the Colab badge; {remedy}"
    install = [cell for cell in nb.cells if cell.cell_type == "code"][0]
    assert is_install_cell(install) and "skip-execution" in install.metadata.tags, \
        f"{path.name}: the first code cell is not Colab's install cell tagged 'skip-execution'; {remedy}"
    assert '"google.colab" in sys.modules' in install.source and f'"gptlora @ git+{REPOSITORY}"' in install.source, \
        f"{path.name}: the install cell does not install {REPOSITORY} in Colab only; {remedy}"
    assert not colab.update(path, REPOSITORY, check_only=True), f"{path.name} differs from what the script writes; {remedy}"


def test_the_repository_url_is_pyprojects_with_or_without_tomllib(monkeypatch):
    pyproject = (REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert f'Repository = "{REPOSITORY}"' in pyproject
    monkeypatch.setattr(colab, "tomllib", None)  # Python 3.10 reads the line itself
    assert colab.repository_url() == REPOSITORY


def test_the_install_cell_does_nothing_outside_colab(monkeypatch):
    def no_install(*args, **kwargs):
        raise AssertionError(f"the install cell ran {args} outside Colab")

    monkeypatch.setattr(subprocess, "run", no_install)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    exec(compile("".join(colab.install_source(REPOSITORY)), "install cell", "exec"), {})
    monkeypatch.setitem(sys.modules, "google.colab", object())
    with pytest.raises(AssertionError, match="git\\+" + re.escape(REPOSITORY)):
        exec(compile("".join(colab.install_source(REPOSITORY)), "install cell", "exec"), {})


def test_the_script_gives_a_new_notebook_its_cells_once(tmp_path):
    """As notebook 11 or any later one gets them: once, in Jupyter's file layout; a new URL replaces the old."""
    path = tmp_path / "11_new_chapter.ipynb"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# 11 · New\n\n**Needs from earlier notebooks:** none."),
                                         nbformat.v4.new_code_cell("params = 1", metadata={"tags": ["parameters"]})])
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    assert colab.update(path, REPOSITORY) and not colab.update(path, REPOSITORY)
    written = nbformat.read(path, as_version=4)
    assert [cell.cell_type for cell in written.cells] == ["markdown", "code", "code"]
    assert written.cells[0].source.startswith("[![Open in Colab]") and written.cells[0].source.count("Open in Colab") == 1
    assert is_install_cell(written.cells[1]) and written.cells[2].source == "params = 1"
    assert path.read_text(encoding="utf-8") == json.dumps(json.loads(path.read_text(encoding="utf-8")), indent=1,
                                                          ensure_ascii=False) + "\n"
    assert colab.update(path, "https://github.com/someone/fork")
    moved = nbformat.read(path, as_version=4)
    assert len(moved.cells) == 3 and "github/someone/fork/blob/main/notebooks/11_new_chapter.ipynb" in moved.cells[0].source
    assert "git+https://github.com/someone/fork" in moved.cells[1].source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_runs(path, workspace, monkeypatch):
    """A cheap notebook runs as it was executed and reproduces its committed outputs; the others run short."""
    monkeypatch.setenv("JUPYTER_PREFER_ENV_PATH", "1")
    if check_of(path) == "compare":
        nb = nbformat.read(path, as_version=4)
        shortened = (env_name("epochs"), env_name("new_tokens"), env_name("records"))  # not as executed
        env = {name: value for name, value in workspace["env"].items() if name not in shortened}
        env.update(executor.parameter_env(nb, workspace["root"]))
        failures = nbval_failures(path, env, workspace["root"])
        if failures:
            pytest.fail("\n".join(failures), pytrace=False)
        return
    env = dict(workspace["env"])
    if notebook_number(path) >= 3:  # 01-02 build GPT-2 presets with random weights; 03 pretrains this shape
        env[env_name("model")] = str(checkpoint_for(workspace))
    if notebook_number(path) == 12:  # DPO runs two forward passes per step over the 50,257-wide head: 2 steps
        env[env_name("records")] = "20"
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's own inline backend, as in Jupyter
    figures = Path(env[env_name("output_dir")])
    figures_before = set(figures.glob("*.png"))
    repo_before = snapshot(REPO_OUTPUT_DIRS)

    nb = execute(path, env, workspace["root"] / "executed" / path.name)
    assert all(cell.execution_count is None for cell in nb.cells if is_install_cell(cell)), \
        f"{path.name}: the Colab install cell ran; it must be skipped outside Colab"

    new_figures = set(figures.glob("*.png")) - figures_before
    assert bool(new_figures) == bool(inline_images(nb)), (
        f"{path.name} shows {inline_images(nb)} plot(s) inline and saved {len(new_figures)} PNG(s) "
        f"to {figures}: every plot must do both (params.save_figure, then plt.show())")
    assert snapshot(REPO_OUTPUT_DIRS) == repo_before, f"{path.name} wrote into the repository"


def test_parameters_come_from_the_environment(monkeypatch):
    monkeypatch.setenv(env_name("epochs"), "2")
    monkeypatch.setenv(env_name("data_dir"), "/somewhere/data")
    monkeypatch.delenv(env_name("new_tokens"), raising=False)
    params = notebook_params(epochs=7, new_tokens=40)
    assert params.epochs == 2  # the environment beats the notebook's default
    assert params.new_tokens == 40  # the notebook's default beats the package's
    assert params.data_dir == Path("/somewhere/data")
    assert params.runs_dir == Path("../runs")


def test_bad_parameters_are_explained(monkeypatch):
    monkeypatch.setenv(env_name("epochs"), "three")
    with pytest.raises(ValueError, match=r"epochs \(GPTLORA_EPOCHS\) must be a whole number, found 'three'"):
        notebook_params()
    monkeypatch.delenv(env_name("epochs"))
    with pytest.raises(ValueError, match=r"unknown notebook parameter\(s\) \['epoch'\]; known: model, "):
        notebook_params(epoch=3)
