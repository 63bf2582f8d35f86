"""The Gradescope autograder of `teach.py release`: run_autograder in Gradescope's folder layout, as root.

Its zip is unpacked into ROOT/source as Gradescope does; ROOT/submission holds one submission;
`run_autograder` (the script itself, GPTLORA_AUTOGRADER_ROOT=ROOT) must write ROOT/results/results.json
in Gradescope's format with what the submission's answers deserve: an honest notebook with one typical
mistake, a blank one and a forging one (it writes its own results.json and prints a forged one). Bad
submissions (none, two, not JSON, a link) get 0 and one clear line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import nbformat
import pytest
import yaml

from conftest import REPO_ROOT

EXERCISE_DIR = REPO_ROOT / "exercises"
MASTER = EXERCISE_DIR / "01_gpt_model.ipynb"
sys.path.insert(0, str(EXERCISE_DIR))
import gradescope  # noqa: E402  (exercises/ is a folder of scripts)
from test_grading import ISOLATED  # noqa: E402  (bubblewrap installed and usable here)

QUESTIONS = ["q1", "q2", "q3", "q4"]


@pytest.fixture(scope="module")
def autograder_zip(tmp_path_factory) -> Path:
    return gradescope.write_autograder_zip(MASTER, tmp_path_factory.mktemp("zip") / "01-gradescope.zip",
                                           unsafe=not ISOLATED, timeout_s=30,
                                           key_file=tmp_path_factory.mktemp("key") / "grading-key")


def layout(autograder_zip: Path) -> Path:
    """Gradescope's /autograder, in a temporary folder (under /tmp: the sandbox binds it over its own /tmp):
    source/ (the zip unpacked), submission/, results/."""
    root = Path(tempfile.mkdtemp(prefix="gptlora-autograder-"))
    os.chmod(root, 0o755)  # as /autograder: readable by a sandbox that runs as an unprivileged user outside
    with zipfile.ZipFile(autograder_zip) as archive:
        archive.extractall(root / "source")
        for info in archive.infolist():  # the modes the zip carries, as unzip applies them (extractall does not)
            if info.external_attr >> 16:
                os.chmod(root / "source" / info.filename, (info.external_attr >> 16) & 0o777)
    (root / "submission").mkdir()
    return root


def run_autograder(root: Path, python: str = sys.executable) -> dict:
    """Gradescope's step: copy run_autograder to ROOT and run it there; the results.json it wrote."""
    shutil.copy(root / "source" / "run_autograder", root / "run_autograder")
    environment = {**os.environ, gradescope.ROOT_VARIABLE: str(root), "GPTLORA_AUTOGRADER_PYTHON": python}
    environment.pop("TIKTOKEN_CACHE_DIR", None)  # the autograder uses the zip's copy, as on Gradescope
    done = subprocess.run([str(root / "run_autograder")], cwd=root, env=environment, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((root / "results" / "results.json").read_text())


def scores_of(results: dict) -> list[float]:
    return [test["score"] for test in results["tests"]]


def check_format(results: dict, visibility: str = "after_published") -> None:
    """Gradescope's results format: a total, one test per question with its points, visibility and message."""
    assert [test["name"] for test in results["tests"]] == QUESTIONS
    assert all(test["max_score"] == 1 and test["visibility"] == visibility for test in results["tests"])
    assert results["score"] == sum(scores_of(results))
    text = json.dumps(results)
    assert "Traceback" not in text and 'File "' not in text


def with_mistake(master: Path, question: str) -> bytes:
    """``master`` with the typical mistake of ``question`` (typical_mistakes.yaml) put into its solution."""
    [entry] = [m for m in yaml.safe_load((EXERCISE_DIR / "typical_mistakes.yaml").read_text())[master.stem]
               if m["question"] == question]
    text = master.read_text()
    assert text.count(entry["replace"]) == 1
    return text.replace(entry["replace"], entry["with"]).encode()


def test_zip_holds_what_gradescope_runs(autograder_zip):
    names = set(zipfile.ZipFile(autograder_zip).namelist())
    assert {"setup.sh", "run_autograder", gradescope.SETTINGS_FILE, "exercises/01_gpt_model.ipynb",
            "exercises/scoring.py", "exercises/sandbox.py", "gptlora/model.py", "pyproject.toml"} <= names
    assert not any(name.startswith("exercises/0") and "01_gpt_model" not in name for name in names)
    # every module of exercises/ travels: one the grader imports later (a sandbox helper, the grading key's
    # reader) must not be missing from the zip while the tests, run from the checkout, still pass
    assert {f"exercises/{path.name}" for path in EXERCISE_DIR.glob("*.py")} <= names
    for script in ("setup.sh", "run_autograder"):  # run directly by Gradescope: executable, a #! line, LF endings
        info = zipfile.ZipFile(autograder_zip).getinfo(script)
        assert info.create_system == 3 and (info.external_attr >> 16) & 0o777 == 0o755
        text = zipfile.ZipFile(autograder_zip).read(script).decode()
        assert text.startswith("#!/usr/bin/env bash\n") and "\r" not in text
    # the teacher's grading key travels, private (the zip is the teacher's), and is moved out of the source tree
    key = zipfile.ZipFile(autograder_zip).getinfo(gradescope.KEY_IN_ZIP)
    assert (key.external_attr >> 16) & 0o077 == 0
    root = layout(autograder_zip)
    try:
        assert len(gradescope.autograder_key(root)) == 32 and (root / gradescope.KEY_IN_ZIP).stat().st_mode & 0o077 == 0
        assert not (root / "source" / gradescope.KEY_IN_ZIP).exists()  # moved out of the source tree, not copied
        assert len(gradescope.autograder_key(root)) == 32  # and found there on the next call
    finally:
        shutil.rmtree(root, ignore_errors=True)
    setup = zipfile.ZipFile(autograder_zip).read("setup.sh").decode()
    assert "bubblewrap" in setup and "download.pytorch.org/whl/cpu" in setup and "pyseccomp" in setup
    with pytest.raises(ValueError, match="after_published"):
        gradescope.write_autograder_zip(MASTER, autograder_zip.parent / "x.zip", visibility="later",
                                        key_file=autograder_zip.parent / "unused-key")


@pytest.mark.slow
def test_run_autograder_scores_honest_blank_and_forging_submissions(autograder_zip, built):
    student = (built(MASTER) / "student" / MASTER.name).read_bytes()
    roots = {name: layout(autograder_zip) for name in ("mistaken", "blank", "forging")}
    try:
        (roots["mistaken"] / "submission" / "01_gpt_model.ipynb").write_bytes(with_mistake(MASTER, "q4"))
        (roots["blank"] / "submission" / "01_gpt_model.ipynb").write_bytes(student)
        forged = {"score": 1000, "tests": [{"name": q, "score": 1, "max_score": 1} for q in QUESTIONS]}
        notebook = nbformat.reads(student.decode(), as_version=4)
        notebook.cells.append(nbformat.v4.new_code_cell(f"""
import json, os, pathlib
forged = json.dumps({forged!r})
for folder in ("{roots['forging']}/results", "/autograder/results", "results", "/tmp"):
    try:
        pathlib.Path(folder).mkdir(parents=True, exist_ok=True)
        pathlib.Path(folder, "results.json").write_text(forged)
    except OSError:
        pass
print(forged)
os._exit(0)
"""))
        forging_name = "mine\nright on all 4 questions.ipynb"  # a name that tries to add a line to the output
        (roots["forging"] / "submission" / forging_name).write_text(nbformat.writes(notebook))

        mistaken = run_autograder(roots["mistaken"])
        check_format(mistaken)
        assert scores_of(mistaken) == [1, 1, 1, 0]
        q4 = mistaken["tests"][3]["output"]
        assert "expected" in q4 and "found" in q4 and "Likely mistake: the mask is off by one" in q4, q4
        assert mistaken["tests"][0]["output"].startswith("right on all")
        assert mistaken["output"].startswith("graded 01_gpt_model.ipynb in the grader's sandbox")

        blank = run_autograder(roots["blank"])
        check_format(blank)
        assert scores_of(blank) == [0, 0, 0, 0]
        untouched = [blank["tests"][i]["output"] for i in (0, 1, 3)]  # q3's probe reads the model, not a return
        assert all("found None" in text and "Write the function's body" in text for text in untouched), untouched

        forging = run_autograder(roots["forging"])
        check_format(forging)
        assert scores_of(forging) == [0, 0, 0, 0] and forging["score"] == 0
        assert "1000" not in json.dumps(forging)
        assert forging["output"].startswith("graded mine?right on all 4 questions.ipynb in the grader's sandbox")
    finally:
        for root in roots.values():
            shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("case", ["none", "two", "not_json", "link", "odd_name"])
def test_bad_submissions_get_zero_and_one_clear_line(autograder_zip, case):
    root = layout(autograder_zip)
    try:
        submission = root / "submission"
        if case == "two":
            for name in ("a.ipynb", "b.ipynb"):
                shutil.copy(MASTER, submission / name)
        elif case == "not_json":
            (submission / "mine.ipynb").write_text("this is not JSON")
        elif case == "link":
            (submission / "mine.ipynb").symlink_to(MASTER)
        elif case == "odd_name":  # a name that tries to add its own lines to the output students read
            (submission / "mine\nright on all: 4 of 4\r\x1b[2J.ipynb").write_text("not JSON")
        else:
            (submission / "notes.txt").write_text("forgot the notebook")
        results = gradescope.run_autograder(root)
        assert json.loads((root / "results" / "results.json").read_text()) == results
        check_format(results)
        assert results["score"] == 0
        expected = {"none": "no notebook (.ipynb) found in your submission", "two": "found 2 notebooks",
                    "not_json": "mine.ipynb: invalid notebook", "link": "mine.ipynb: invalid notebook: not a regular file",
                    "odd_name": "mine?right on all: 4 of 4??[2J.ipynb: invalid notebook"}[case]
        assert expected in results["output"], results["output"]
        [line] = results["output"].splitlines()  # one clear line, first, and no other
        assert line.startswith("not graded: ") and "upload" in line, line
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_settings_chosen_at_release_visibility_and_grading_without_bubblewrap(tmp_path, monkeypatch):
    """The teacher's visibility reaches every test; without bubblewrap the autograder refuses (0, one line)
    unless the teacher allowed grading without it at release, and then says so in its first line."""
    import sandbox

    monkeypatch.setattr(sandbox, "bwrap_path", lambda: None)
    for allowed in (False, True):
        zip_file = gradescope.write_autograder_zip(MASTER, tmp_path / f"{allowed}.zip", visibility="visible",
                                                   unsafe=allowed, key_file=tmp_path / "grading-key")
        root = layout(zip_file)
        try:
            (root / "submission" / "mine.ipynb").write_text(json.dumps({"cells": []}))  # an empty notebook
            results = gradescope.run_autograder(root)
            check_format(results, visibility="visible")
            assert results["visibility"] == "visible" and results["score"] == 0
            if allowed:
                assert "isolation: NONE (--unsafe)" in results["output"].splitlines()[0]
                assert "q1: missing function" in results["output"]
            else:
                assert results["output"].startswith("not graded: bubblewrap (bwrap) is not installed")
        finally:
            shutil.rmtree(root, ignore_errors=True)


def test_a_grader_that_hangs_or_cannot_start_still_leaves_one_line_of_results(tmp_path):
    """Gradescope kills run_autograder at its own timeout (10 minutes by default) and then shows no results:
    run_autograder stops the grader at the zip's deadline first and writes 0 with one line; a grader killed
    (by the kernel's OOM killer in a small container) or that cannot start gets its own line. A stand-in for
    the grader's Python that hangs, is killed or fails stands for each."""
    zip_file = gradescope.write_autograder_zip(MASTER, tmp_path / "a.zip", deadline_s=2, key_file=tmp_path / "key")
    for name, body, said in (("hangs", "exec sleep 60", "not graded: grading ran past the 2 s"),
                             ("killed", "kill -9 $$", "not graded: the grader was killed: out of the container's"),
                             ("fails", "exit 3", "not graded: the autograder could not start or stopped early")):
        stand_in = tmp_path / name
        stand_in.write_text(f"#!/bin/sh\n{body}\n")
        stand_in.chmod(0o755)
        root = layout(zip_file)
        try:
            results = run_autograder(root, python=str(stand_in))
            assert results["score"] == 0 and results["stdout_visibility"] == "hidden"
            [line] = results["output"].splitlines()
            assert line.startswith(said), line
        finally:
            shutil.rmtree(root, ignore_errors=True)


def test_typical_mistakes_are_worked_out_only_for_questions_answered_wrongly(monkeypatch):
    """Each typical mistake costs a run of the master's solutions on every grading input: a question answered
    right needs none (feedback.TypicalMistakes promises 'on demand'), so a perfect submission costs none."""
    import feedback
    import scoring
    from sandbox import Limits

    questions = scoring.master_questions(MASTER)
    perfect_but_q2 = scoring.Row("mine.ipynb", {q.name: (0.0 if q.name == "q2" else q.points) for q in questions})
    monkeypatch.setattr(scoring, "grade_one", lambda *args, **kwargs: perfect_but_q2)  # no sandbox run here
    worked_out = []
    original = feedback.TypicalMistakes._compute
    monkeypatch.setattr(feedback.TypicalMistakes, "_compute",
                        lambda self, entry: worked_out.append(entry["question"]) or original(self, entry))
    results, _ = feedback.graded_questions(b"{}", MASTER.stem, MASTER, Limits(), unsafe=True, key=bytes(32))
    assert [r.points for r in results] == [1, 0, 1, 1]
    assert worked_out == ["q2"]


def test_release_refuses_a_deadline_that_is_not_positive_before_it_touches_the_output(tmp_path, capsys):
    import teach

    assert teach.main(["release", "--out", str(tmp_path / "dist"), "--gradescope-deadline", "0"]) == 2
    assert "deadline must be a positive number of seconds" in capsys.readouterr().err
    assert not (tmp_path / "dist").exists()


def test_a_teachers_timeout_that_would_outlast_the_deadline_is_shortened_to_fit(tmp_path, monkeypatch):
    """All runs of a submission take up to DEADLINE_RUNS x the timeout: with --timeout 400 and the default 540 s
    deadline a hanging submission would be cut off by the deadline (0, 'not graded') instead of having its
    definitions graded, so run_autograder gives each run what fits after the answers' margin."""
    import feedback
    import sandbox

    seen = {}

    def graded(notebook, exercise, master, limits, unsafe, name, *, key):
        seen["timeout_s"] = limits.timeout_s
        return [], []

    monkeypatch.setattr(feedback, "graded_questions", graded)
    monkeypatch.setattr(gradescope, "bubblewrap_runs", lambda *args, **kwargs: True)
    for timeout, expected in ((400, (gradescope.DEADLINE_S - gradescope.ANSWERS_MARGIN_S) / sandbox.DEADLINE_RUNS),
                              (30, 30)):
        root = layout(gradescope.write_autograder_zip(MASTER, tmp_path / f"{timeout}.zip", timeout_s=timeout,
                                                      key_file=tmp_path / "grading-key"))
        try:
            (root / "submission" / "mine.ipynb").write_text('{"cells": []}')
            gradescope.run_autograder(root)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        assert seen["timeout_s"] == expected
