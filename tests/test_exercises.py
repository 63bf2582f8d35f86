"""The exercise notebooks in exercises/: each builds with otter assign and grades itself with otter run.

For every master notebook ``exercises/NN_*.ipynb`` (a new chapter's exercises are picked up
by adding its master and one entry in ``exercises/typical_mistakes.yaml``):
- it is well formed: at least 3 questions, each with public and hidden checks, no outputs;
- ``otter assign`` builds it, and the student version carries the public checks only and no
  piece of a solution (in its cells or in the public checks otter stores in its metadata);
- the solution scores 100%, the untouched student notebook 0 on every question, and the
  typical mistakes of ``typical_mistakes.yaml`` score 0 with feedback naming the mistake.
Grading runs ``otter run`` here, without Docker, in kernels of this environment.
"""

from __future__ import annotations

import ast
import builtins
import copy
import csv
import importlib.util
import json
import re
import time
from pathlib import Path

import nbformat
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
EXERCISE_DIR = REPO_ROOT / "exercises"
SHARED = REPO_ROOT.parent / "shared"  # the offline data, as in conftest.py
MASTERS = sorted(EXERCISE_DIR.glob("[0-9][0-9]_*.ipynb"))
MISTAKES = yaml.safe_load((EXERCISE_DIR / "typical_mistakes.yaml").read_text())
IDS = [path.stem for path in MASTERS]


def load_teach():
    spec = importlib.util.spec_from_file_location("teach", EXERCISE_DIR / "teach.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


teach = load_teach()


def question_names(master: Path) -> list[str]:
    """The question names of a master, from its ``# BEGIN QUESTION`` cells."""
    nb = nbformat.read(master, as_version=4)
    return [yaml.safe_load(cell.source.split("\n", 1)[1])["name"] for cell in nb.cells
            if cell.cell_type == "raw" and re.match(r"#\s*BEGIN QUESTION", cell.source, re.IGNORECASE)]


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """``build(master)``: the master built by ``teach.build`` (once per session), as its output folder."""
    out, folders = tmp_path_factory.mktemp("exercises-dist"), {}

    def build(master: Path) -> Path:
        if master.stem not in folders:
            folders[master.stem] = teach.build(master, out)
        return folders[master.stem]

    return build


@pytest.fixture
def grading_env(monkeypatch):
    """The environment otter's kernels inherit: this venv's kernel, one thread, offline data.

    Grading runs in a temporary folder, so data files are named by absolute paths (05 reads the
    SMS Spam Collection from ../shared; without it, 05's kernel would try to download it).
    """
    monkeypatch.setenv("JUPYTER_PREFER_ENV_PATH", "1")  # the python3 kernel of this environment
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("GPTLORA_OFFLINE", "1")
    spam_file = SHARED / "data" / "sms_spam_collection" / "SMSSpamCollection"
    if spam_file.is_file():
        monkeypatch.setenv("GPTLORA_SPAM_SOURCE", str(spam_file))
    if (SHARED / "data" / "the-verdict" / "the-verdict.txt").is_file():  # 03 reads it from params.data_dir
        monkeypatch.setenv("GPTLORA_DATA_DIR", str(SHARED / "data"))


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


@pytest.mark.slow
def test_grade_folder_writes_one_csv(built, grading_env, tmp_path, capsys):
    master = MASTERS[0]
    folder, submissions = built(master), tmp_path / "submissions"
    submissions.mkdir()
    (submissions / "alice.ipynb").write_bytes((folder / "autograder" / master.name).read_bytes())
    (submissions / "bob.ipynb").write_bytes((folder / "student" / master.name).read_bytes())
    with_mistakes(folder / "autograder" / master.name, MISTAKES[master.stem][:1], submissions / "carol.ipynb")
    (submissions / "dan.ipynb").write_text("not json")  # a broken upload must not stop the others' grading
    out = tmp_path / "scores" / "scores.csv"

    status = teach.main(["grade", str(submissions), "--autograder", str(folder / "autograder.zip"),
                         "--out", str(out), "--no-docker"])

    captured = capsys.readouterr()
    assert status == 0 and f"wrote {out}" in captured.out
    assert f"could not grade {submissions / 'dan.ipynb'}: NotJSONError" in captured.err
    rows = {row["file"]: row for row in csv.DictReader(out.open())}
    names = question_names(master)
    assert list(rows) == ["points-per-question", "alice.ipynb", "bob.ipynb", "carol.ipynb", "dan.ipynb"]
    assert [float(rows["dan.ipynb"][name]) for name in names + ["total_points_earned"]] == [0] * (len(names) + 1)
    assert "NotJSONError" in rows["dan.ipynb"]["grading_status"] and rows["alice.ipynb"]["grading_status"] == "Completed"
    wrong_question = MISTAKES[master.stem][0]["question"]
    for name in names:
        assert float(rows["alice.ipynb"][name]) == float(rows["points-per-question"][name])
        assert float(rows["bob.ipynb"][name]) == 0
        assert float(rows["carol.ipynb"][name]) == (0 if name == wrong_question else float(rows["points-per-question"][name]))
    assert float(rows["alice.ipynb"]["total_points_earned"]) == len(names)
    assert float(rows["carol.ipynb"]["total_points_earned"]) == len(names) - 1


def test_grade_folder_explains_bad_input(tmp_path, capsys):
    status = teach.main(["grade", str(tmp_path), "--autograder", str(tmp_path / "missing.zip"), "--no-docker"])
    assert status == 2
    assert "autograder zip" in capsys.readouterr().err and not (tmp_path / "scores.csv").exists()
    (tmp_path / "autograder.zip").write_bytes(b"")
    status = teach.main(["grade", str(tmp_path), "--autograder", str(tmp_path / "autograder.zip"), "--no-docker"])
    assert status == 2 and "no submissions (*.ipynb) found" in capsys.readouterr().err


def test_build_explains_a_missing_master(tmp_path, capsys):
    assert teach.main(["build", str(tmp_path / "nope.ipynb"), "--out", str(tmp_path)]) == 2
    assert "master notebook" in capsys.readouterr().err


def test_grade_folder_uses_otter_grade_when_docker_answers(tmp_path, monkeypatch):
    """The Docker path hands the folder to ``otter grade`` and keeps its table (Docker itself is not run here)."""
    import otter.grade

    calls = []

    def fake_otter_grade(**kwargs):
        calls.append(kwargs)
        (Path(kwargs["output_dir"]) / "final_grades.csv").write_text("file,q1,total_points_earned\nalice.ipynb,1.0,1.0\n")

    monkeypatch.setattr(teach, "docker_available", lambda: True)
    monkeypatch.setattr(otter.grade, "main", fake_otter_grade)
    (tmp_path / "alice.ipynb").write_text("{}")
    (tmp_path / "autograder.zip").write_bytes(b"")
    out = teach.grade_folder(tmp_path, tmp_path / "autograder.zip", tmp_path / "scores.csv")
    assert [call["paths"] for call in calls] == [[str(tmp_path)]] and calls[0]["autograder"] == str(tmp_path / "autograder.zip")
    assert out.read_text() == "file,q1,total_points_earned\nalice.ipynb,1.0,1.0\n"


def test_grade_folder_refuses_docker_when_none_answers(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(teach, "docker_available", lambda: False)
    (tmp_path / "alice.ipynb").write_text("{}")
    (tmp_path / "autograder.zip").write_bytes(b"")
    assert teach.main(["grade", str(tmp_path), "--autograder", str(tmp_path / "autograder.zip"), "--docker"]) == 2
    assert "no Docker daemon answers" in capsys.readouterr().err


def test_grade_folder_scores_unreadable_submissions_zero(built, tmp_path, capsys):
    """Even when no submission can be read, the table is written, one row per file with the reason."""
    folder = built(MASTERS[0])
    (tmp_path / "erin.ipynb").write_text("not json")
    out = tmp_path / "scores.csv"
    assert teach.main(["grade", str(tmp_path), "--autograder", str(folder / "autograder.zip"), "--out", str(out),
                       "--no-docker"]) == 0
    assert f"could not grade {tmp_path / 'erin.ipynb'}" in capsys.readouterr().err
    [row] = csv.DictReader(out.open())
    assert row["file"] == "erin.ipynb" and float(row["total_points_earned"]) == 0 and "NotJSONError" in row["grading_status"]
