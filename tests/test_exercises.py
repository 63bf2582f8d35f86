"""The exercise notebooks in exercises/: each builds with otter assign and grades itself with otter run.

For every master notebook ``exercises/NN_*.ipynb`` (a new chapter's exercises are picked up
by adding its master and one entry in ``exercises/typical_mistakes.yaml``):
- it is well formed: at least 3 questions, each with public and hidden checks, no outputs;
- ``otter assign`` builds it, and the student version carries the public checks only and no
  piece of a solution (in its cells or in the public checks otter stores in its metadata);
- the solution scores 100%, the untouched student notebook 0 on every question, and the
  typical mistakes of ``typical_mistakes.yaml`` score 0 with feedback naming the mistake.
Grading runs ``otter run`` here, without Docker, in kernels of this environment, with no data folder
(a grader may have none). ``teach.py grade``, the sandboxed grader, is tested in test_grading.py.
"""

from __future__ import annotations

import ast
import builtins
import copy
import json
import re
import time
from pathlib import Path

import nbformat
import pytest
import yaml
from conftest import load_teach

REPO_ROOT = Path(__file__).resolve().parents[1]
EXERCISE_DIR = REPO_ROOT / "exercises"
MASTERS = sorted(EXERCISE_DIR.glob("[0-9][0-9]_*.ipynb"))
MISTAKES = yaml.safe_load((EXERCISE_DIR / "typical_mistakes.yaml").read_text())
IDS = [path.stem for path in MASTERS]


teach = load_teach()


def question_names(master: Path) -> list[str]:
    """The question names of a master, from its ``# BEGIN QUESTION`` cells."""
    nb = nbformat.read(master, as_version=4)
    return [yaml.safe_load(cell.source.split("\n", 1)[1])["name"] for cell in nb.cells
            if cell.cell_type == "raw" and re.match(r"#\s*BEGIN QUESTION", cell.source, re.IGNORECASE)]


@pytest.fixture
def grading_env(monkeypatch, tmp_path):
    """The environment otter's kernels inherit: this venv's kernel, one thread, offline, and no data folder.

    A grader's machine may hold no data (``data/``, The Verdict, the SMS Spam Collection): the checks must
    not need it, so that a right answer never loses points there (issue 18). Only the tokenizer's cache,
    which ``get_tokenizer`` needs, is kept. Grading runs from an empty folder for the same reason.
    """
    monkeypatch.setenv("JUPYTER_PREFER_ENV_PATH", "1")  # the python3 kernel of this environment
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("GPTLORA_OFFLINE", "1")
    for name in ("GPTLORA_DATA_DIR", "GPTLORA_SPAM_SOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def grade(notebook: Path, autograder: Path):
    """``otter run`` one notebook; otter's GradingResults and the seconds it took."""
    from otter.api import grade_submission

    start = time.perf_counter()
    results = grade_submission(str(notebook), str(autograder), quiet=True)
    assert results.catastrophic_error is None, f"grading {notebook.name} failed: {results.catastrophic_error}"
    return results, time.perf_counter() - start


def grade_version(master: Path, folder: Path, version: str):
    """Grade the ``version`` ("student" or "autograder", the solutions) that ``teach.build`` wrote in ``folder``."""
    results, seconds = grade(folder / version / master.name, folder / "autograder.zip")
    print(f"{master.stem}: {version} version graded in {seconds:.1f} s")  # shown with pytest -s
    return results


def scores(results) -> dict[str, float]:
    return {name: results.get_score(name) for name in results.test_files}


def feedback(results, question: str, hidden: bool = False) -> str:
    """The messages of a question's public (or hidden) checks, as ``grader.check`` shows them."""
    return "\n".join(r.message for r in results.get_result(question).test_case_results if r.test_case.hidden == hidden)


def public_feedback(results, question: str) -> str:
    return feedback(results, question)


@pytest.mark.parametrize("master", MASTERS, ids=IDS)
def test_master_is_well_formed(master):
    nb = nbformat.read(master, as_version=4)
    nbformat.validate(nb)
    assert not [c for c in nb.cells if c.cell_type == "code" and (c.outputs or c.execution_count)], \
        f"{master.name} has outputs; clear them before committing"
    names = question_names(master)
    assert len(names) >= 3, f"{master.name}: expected at least 3 questions, found {len(names)}"
    tests = [c.source for c in nb.cells if c.cell_type == "code" and c.source.lstrip().startswith(("def test_", "# HIDDEN"))]
    hidden = [t for t in tests if t.startswith("# HIDDEN")]
    assert len(hidden) >= len(names) and len(tests) - len(hidden) >= len(names), \
        f"{master.name}: every question needs public and hidden checks; found {len(tests) - len(hidden)} public, " \
        f"{len(hidden)} hidden for {len(names)} questions"
    assert MISTAKES.get(master.stem), \
        f"{master.name}: add at least one typical wrong answer for it to exercises/typical_mistakes.yaml"


def test_there_are_enough_questions():
    total = sum(len(question_names(master)) for master in MASTERS)
    assert len(MASTERS) >= 7 and total >= 25, f"expected at least 7 notebooks and 25 questions, found {len(MASTERS)} and {total}"


@pytest.mark.parametrize("master", MASTERS, ids=IDS)
def test_student_version_carries_public_checks_only(master, built):
    folder = built(master)
    student = nbformat.read(folder / "student" / master.name, as_version=4)
    tests = student.metadata["otter"]["tests"]
    assert sorted(tests) == sorted(question_names(master))
    leaked = [name for name, source in tests.items() if "hidden=True" in source]
    assert not leaked, f"the student version of {master.name} holds hidden checks of {leaked}"
    assert (folder / "autograder.zip").is_file()


class _Anonymous(ast.NodeTransformer):
    """Every variable, and every attribute of one (``lora.scaling``), becomes ``_`` (modules and
    builtins keep their names) and keyword arguments lose their names (``dim=-1`` is ``-1``), so that
    a check computing the answer with its own names still matches the solution line it copies."""

    KEPT = {"torch", "F", "math", "nn"} | set(dir(builtins))

    def visit_Name(self, node):
        return ast.Name(id=node.id if node.id in self.KEPT else "_", ctx=node.ctx)

    def visit_Attribute(self, node):
        if isinstance(node.value, ast.Name) and node.value.id not in self.KEPT and not isinstance(node.ctx, ast.Store):
            return ast.Name(id="_", ctx=node.ctx)
        return self.generic_visit(node)

    def visit_Call(self, node):
        method = node.func
        if isinstance(method, ast.Attribute) and isinstance(method.value, ast.Name):  # keep the method's name
            node.func = ast.Attribute(value=self.visit_Name(method.value), attr=method.attr, ctx=method.ctx)
        else:
            node.func = self.visit(method)
        node.args = [self.visit(a) for a in node.args]
        node.keywords = [self.visit(k) for k in node.keywords]
        node.args, node.keywords = node.args + [k.value for k in node.keywords if k.arg], [k for k in node.keywords if not k.arg]
        return node


def _parsed(code: str):
    """``code`` parsed; a lone ``for ...:``/``if ...:`` line gets a body so that it parses too."""
    for attempt in (code, code + "\n    pass"):
        try:
            return ast.parse(attempt)
        except SyntaxError:
            continue
    return None


def _skeletons(tree, smallest: int = 10) -> set[str]:
    """The anonymous text of every sub-expression of ``tree`` with at least two operations (calls,
    arithmetic, indexing, comparisons) and ``smallest`` characters: big enough to give an answer away."""
    found = set()
    for node in ast.walk(tree) if tree is not None else []:
        if not isinstance(node, ast.expr) or isinstance(node, (ast.Name, ast.Constant, ast.Slice)):
            continue
        operations = sum(isinstance(n, (ast.Call, ast.BinOp, ast.Subscript, ast.Compare)) for n in ast.walk(node))
        text = "".join(ast.unparse(_Anonymous().visit(copy.deepcopy(node))).split())
        if operations >= 2 and len(text) >= smallest:
            found.add(text)
    return found


def _flat(code: str) -> str:
    """``code`` as otter writes tests (``ast.unparse``: quotes, number and comment style), without whitespace."""
    tree = _parsed(code)
    return "".join((ast.unparse(tree).split("\n")[0] if tree is not None else code).split())


def solution_lines(master: Path) -> list[str]:
    """The distinctive code lines of a master's solutions: between ``# BEGIN SOLUTION`` and
    ``# END SOLUTION``, neither comments nor lines that the notebook shows students anyway
    (in the question's own code, e.g. a demo calling ``torch.manual_seed(seed)``)."""
    solution, shown, inside, in_tests = [], set(), False, False
    for cell in nbformat.read(master, as_version=4).cells:
        if cell.cell_type == "raw" and re.match(r"#\s*(BEGIN|END) TESTS", cell.source, re.IGNORECASE):
            in_tests = cell.source.upper().lstrip("# ").startswith("BEGIN")
        if cell.cell_type != "code" or in_tests:
            continue
        for line in cell.source.splitlines():
            marker = line.strip().upper()
            if marker.startswith(("# BEGIN SOLUTION", "# END SOLUTION")):
                inside = marker.startswith("# BEGIN")
            elif inside and line.strip() and not line.strip().startswith("#"):
                solution.append(line.strip())
            elif not inside:
                shown.add(_flat(line.strip()))
    return [line for line in solution if _flat(line) not in shown]


@pytest.mark.parametrize("master", MASTERS, ids=IDS)
def test_student_version_holds_no_solution(master, built):
    """No solution line, no piece of one (a sub-expression, whatever its variable names) and no
    ``replace`` of typical_mistakes.yaml appears in the student notebook, cells or metadata."""
    student = nbformat.read(built(master) / "student" / master.name, as_version=4)
    sources = [cell.source for cell in student.cells] + list(student.metadata["otter"]["tests"].values())
    flat = "\n".join(["".join(source.split()) for source in sources] + [_flat(source) for source in sources]
                      + ["".join(json.dumps(student.metadata).split())])
    pieces = set().union(*(_skeletons(_parsed(source)) for source in sources))
    lines = solution_lines(master)
    assert len(lines) >= len(question_names(master)), f"{master.name}: no solution lines found"
    shown = [line for line in lines if len(_flat(line)) >= 16 and _flat(line) in flat]
    shown += [f"{line} (as {piece})" for line in lines for piece in _skeletons(_parsed(line)) if piece in pieces]
    shown += [mistake["replace"] for mistake in MISTAKES[master.stem] if _flat(mistake["replace"].strip()) in flat]
    assert not shown, f"the student version of {master.name} shows pieces of the solutions: {shown}"


@pytest.mark.parametrize("master", MASTERS, ids=IDS)
def test_hidden_checks_take_only_the_students_answers(master):
    """A hidden check reads nothing from the notebook but the functions the student wrote: a student's
    cell may overwrite any other name (``train``, ``tokenizer``) and so change what is checked."""
    nb = nbformat.read(master, as_version=4)
    answers = {node.name for cell in nb.cells if cell.cell_type == "code" and "# BEGIN SOLUTION" in cell.source
               for node in ast.parse(cell.source).body if isinstance(node, ast.FunctionDef)}
    for cell in nb.cells:
        if cell.cell_type == "code" and cell.source.startswith("# HIDDEN"):
            for node in ast.parse(cell.source).body:
                if isinstance(node, ast.FunctionDef):
                    arguments = {a.arg for a in node.args.args}
                    assert arguments <= answers, \
                        f"{master.name} {node.name} reads notebook names {sorted(arguments - answers)}; build them inside the check"


@pytest.mark.slow
@pytest.mark.parametrize("master", MASTERS, ids=IDS)
def test_solution_scores_full_marks(master, built, grading_env):
    results = grade_version(master, built(master), "autograder")
    failed = {name: public_feedback(results, name) + feedback(results, name, hidden=True)
              for name, score in scores(results).items() if score != results.get_result(name).possible}
    assert not failed, f"the solution of {master.name} lost points: {failed}"
    assert results.total == results.possible == len(question_names(master))


@pytest.mark.slow
@pytest.mark.parametrize("master", MASTERS, ids=IDS)
def test_untouched_student_notebook_scores_zero(master, built, grading_env):
    results = grade_version(master, built(master), "student")
    assert scores(results) == dict.fromkeys(question_names(master), 0), \
        f"an untouched {master.name} earned points: {scores(results)}"
    for name in question_names(master):
        assert public_feedback(results, name).strip(), f"{master.name} {name}: no feedback for a blank answer"


def with_mistakes(solution: Path, mistakes: list[dict], out: Path) -> Path:
    """A copy of the solution notebook with each mistake's ``replace`` (found exactly once) replaced."""
    nb = nbformat.read(solution, as_version=4)
    for mistake in mistakes:
        cells = [c for c in nb.cells if c.cell_type == "code" and mistake["replace"] in c.source]
        assert len(cells) == 1 and cells[0].source.count(mistake["replace"]) == 1, \
            f"typical_mistakes.yaml: {mistake['replace']!r} must occur exactly once in {solution.name}'s solutions"
        cells[0].source = cells[0].source.replace(mistake["replace"], mistake["with"])
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("master", MASTERS, ids=IDS)
def test_typical_mistakes_score_zero_and_are_named(master, built, grading_env, tmp_path):
    folder, mistakes = built(master), MISTAKES[master.stem]
    wrong = with_mistakes(folder / "autograder" / master.name, mistakes, tmp_path / master.name)
    results, _ = grade(wrong, folder / "autograder.zip")
    mistaken = {m["question"] for m in mistakes}
    assert len(mistaken) == len(mistakes), f"typical_mistakes.yaml: at most one mistake per question of {master.name}"
    expected = {name: (0 if name in mistaken else results.get_result(name).possible) for name in question_names(master)}
    assert scores(results) == expected
    for mistake in mistakes:
        question, hidden = mistake["question"], mistake.get("caught_by", "public") == "hidden"
        if hidden:
            assert "failed" not in public_feedback(results, question), \
                f"{master.name} {question}: this mistake is meant to pass the public checks:\n{public_feedback(results, question)}"
        found = feedback(results, question, hidden)
        assert mistake["feedback"] in found, \
            f"{master.name} {question}: the feedback should name the mistake ({mistake['feedback']!r}); it was:\n{found}"
