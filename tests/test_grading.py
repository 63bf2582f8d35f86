"""`exercises/teach.py grade`: sandboxed submissions that only report answers, scored by a separate process.

- every exercise: its solution scores 100% and its untouched student notebook 0, with no data folder;
- a table of dishonest or broken submissions graded in one folder with two honest ones: each gets the
  score its real answers deserve, the honest rows do not move, nothing outside its sandbox changes,
  nothing it started survives, and the run ends within its timeouts;
- one row per submission always; the CSV is the same on a second run; bad input is one clear line.
With bubblewrap installed (CI installs it) the filesystem attacks are graded under it; without, the
table runs with --unsafe and the rows that need isolation are skipped.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import pytest

from conftest import REPO_ROOT, load_teach

EXERCISE_DIR = REPO_ROOT / "exercises"
MASTERS = sorted(EXERCISE_DIR.glob("[0-9][0-9]_*.ipynb"))
teach = load_teach()
sys.path.insert(0, str(EXERCISE_DIR))
import grading_spec  # noqa: E402  (exercises/ is a folder of scripts, on the path since load_teach)
import sandbox  # noqa: E402
import secret_inputs  # noqa: E402

SECRET = secret_inputs.Secret(b"a teacher's key for these tests".ljust(32, b"."), "a run's nonce")

def _bwrap_works() -> bool:
    """bubblewrap installed and able to make its namespaces here (some containers forbid them)."""
    import subprocess

    if sandbox.bwrap_path() is None:
        return False
    probe = [sandbox.bwrap_path(), "--unshare-all", "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "true"]
    return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0


ISOLATED = _bwrap_works()
TIMEOUT = 15  # seconds per run of a submission in these tests (the default is minutes)


def grade(folder: Path, exercise: str, out: Path, *extra: str) -> tuple[int, dict, str]:
    """Run ``teach.py grade``; its exit status, the CSV's rows by file name, and what it printed."""
    import subprocess

    command = [sys.executable, str(EXERCISE_DIR / "teach.py"), "grade", str(folder), "--exercise", exercise,
               "--out", str(out), "--timeout", str(TIMEOUT), "--jobs", "3", "--key-file", str(out.parent / "grading-key"),
               *extra] + ([] if ISOLATED else ["--unsafe"])
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    rows = {row["file"]: row for row in csv.DictReader(out.open())} if out.is_file() else {}
    return done.returncode, rows, done.stdout + done.stderr


def scores(row: dict, questions: list[str]) -> list[float]:
    return [float(row[name]) for name in questions]


def questions_of(master: Path) -> list[str]:
    return [cell.source.split("name:")[1].split()[0] for cell in nbformat.read(master, as_version=4).cells
            if cell.cell_type == "raw" and cell.source.startswith("# BEGIN QUESTION")]


def test_every_exercise_has_a_grading_spec_for_each_question():
    for master in MASTERS:
        assert sorted(grading_spec.SPEC.get(master.stem, {})) == sorted(questions_of(master)), \
            f"exercises/grading_spec.py: list every question of {master.name} once"


@pytest.mark.slow
@pytest.mark.parametrize("master", MASTERS, ids=[m.stem for m in MASTERS])
def test_solution_scores_full_and_student_notebook_zero(master, built, tmp_path, monkeypatch):
    """Graded with no data folder and no GPTLORA_DATA_DIR: the grader needs none (issue 18)."""
    for name in ("GPTLORA_DATA_DIR", "GPTLORA_SPAM_SOURCE"):
        monkeypatch.delenv(name, raising=False)
    folder = built(master)
    submissions = tmp_path / "submissions"
    submissions.mkdir()
    (submissions / "solution.ipynb").write_bytes((folder / "autograder" / master.name).read_bytes())
    (submissions / "student.ipynb").write_bytes((folder / "student" / master.name).read_bytes())
    out = teach.grade_folder(submissions, master.stem, tmp_path / "scores.csv", sandbox.Limits(timeout_s=120),
                             unsafe=not ISOLATED, jobs=2, key_file=tmp_path / "grading-key")  # in this process
    rows, printed = {row["file"]: row for row in csv.DictReader(out.open())}, out.read_text()
    names = questions_of(master)
    assert scores(rows["solution.ipynb"], names) == scores(rows["points-per-question"], names), printed
    assert rows["solution.ipynb"]["status"] == "graded"
    assert scores(rows["student.ipynb"], names) == [0] * len(names)


# ---- the adversarial table (exercise 01) ----------------------------------------------------------------

def cell(source: str) -> dict:
    return nbformat.v4.new_code_cell(source)


ATTACKS = {  # name: (base notebook, cells added at the end (or "first:" at the start), points it deserves)
    "patched_check_helpers": ("student", """
import gptlora.teaching.exercise_checks as checks
checks.expect = lambda *a, **k: None
checks.call = lambda name, function, *a, **k: 1
checks._same = lambda *a, **k: True
""", 0),
    "patched_builtins": ("student", """
import builtins, math, torch, json
math.isclose = lambda *a, **k: True
torch.allclose = lambda *a, **k: True
torch.equal = lambda *a, **k: True
builtins.isinstance = lambda *a: True
""", 0),
    "always_equal_objects": ("student", """
class Anything(int):
    def __eq__(self, other): return True
    __hash__ = int.__hash__
def block_parameters(cfg): return Anything(0), Anything(0)
def total_parameters(cfg): return Anything(0)
def causal_attention_weights(scores): return Anything(0)
""", 0),
    "replaces_a_probe": ("student", """
import gptlora.teaching.grading_probes as probes
for name in list(probes.PROBES):
    probes.PROBES[name] = lambda function, *inputs, **options: inputs
""", 0),
    "forges_from_the_task_list": ("student", """
import gc, json, os, sys, threading
def forge():  # waits for the task list, then writes an answer to every case and ends the process
    import time
    for _ in range(2000):
        for thing in gc.get_objects():
            if isinstance(thing, list) and thing and isinstance(thing[0], dict) and "probe" in thing[0]:
                with open("results.jsonl", "a") as results:
                    for task in thing:
                        cases = [{"tag": case.get("tag"), "value": case["args"][1:] or case["args"]} for case in task["cases"]]
                        results.write("\\n" + json.dumps({"question": task["question"], "observations": cases}))
                    results.write("\\n" + json.dumps({"finished": True}) + "\\n")
                os._exit(0)
        time.sleep(0.005)
threading.Thread(target=forge, daemon=True).start()
""", 0),
    "writes_a_results_file": ("student", """
import json, sys
forged = {"question": "q1", "observations": [{"value": 1000}]}
# files a grader might read, and the real results channel (the pipe named on the command line)
for name in ("results.jsonl", "results.json", "/tmp/results.json", sys.argv[-1]):
    try:
        with open(name, "a") as file:
            file.write(json.dumps(forged) + "\\n" + json.dumps({"cells": "cells", "finished": True}) + "\\n")
    except OSError:
        pass
print(json.dumps({"q1": 1, "q2": 1, "q3": 1, "q4": 1, "total": 4}))
""", 0),
    "forged_extra_question": ("student", """
import json
with open("results.jsonl", "a") as f:
    f.write(json.dumps({"question": "q1000", "points": 1000, "observations": []}) + "\\n")
print(json.dumps({"tests": [{"name": "q1000", "score": 1000, "max_score": 1000}]}))
""", 0),
    "pickle_payload": ("student", """
import os, pickle
class Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/gptlora-grading-unpickled",))
for name in ("results.jsonl", "results.pkl", "results.pickle"):
    with open(name, "wb") as file:
        pickle.dump(Payload(), file)
""", 0),
    "sys_exit_first": ("solution", "first:import sys\nsys.exit(0)", 4),
    "os_exit_last": ("solution", "import os\nos._exit(0)", 4),
    "killed_kernel": ("solution", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", 4),
    "endless_loop": ("solution", "while True:\n    pass", 4),
    "large_allocation": ("solution", "hog = bytearray(64 * 2**30)\nimport torch\nbig = torch.empty(2**40)", 4),
    "megabytes_of_output": ("solution", "for _ in range(400):\n    print('x' * 250_000)", 4),
    "deeply_nested_results_line": ("student", "open('results.jsonl', 'a').write('\\n' + '[' * 200000 + '\\n')", 0),
    "unhashable_question": ("student", "open('results.jsonl', 'a').write('\\n{\"question\": []}\\n')", 0),
    "one_function_kills_the_process": ("solution", """
import os
def set_dropout_rates(model, embedding, shortcut, attention):
    os._exit(1)
""", 3),
}
FILESYSTEM_ATTACKS = {  # these need isolation: without it they do reach the teacher's files
    "reads_hidden_inputs": ("student", """
import glob, pathlib
for path in glob.glob('{exercises}/**', recursive=True) + glob.glob('/tmp/**/*.ipynb', recursive=True):
    if path.endswith(('01_gpt_model.ipynb', 'grading_spec.py')) and 'BEGIN SOLUTION' in pathlib.Path(path).read_text():
        import json
        for c in json.loads(pathlib.Path(path).read_text())['cells']:
            if c['cell_type'] == 'code' and 'BEGIN SOLUTION' in ''.join(c['source']):
                exec(''.join(c['source']).split('\\n\\n\\n')[0])
""", 0),
    "touches_other_submissions": ("student", """
import glob, os, pathlib
for path in glob.glob("{submissions}/*") + glob.glob("{teacher}/*"):
    try:
        pathlib.Path(path).write_text("{}")
    except OSError:
        pass
""", 0),
    "background_process": ("solution", """
import subprocess, sys
subprocess.Popen([sys.executable, "-c", "import time, pathlib\\ntime.sleep(4)\\n"
                  "for p in ['{out}', '{submissions}/alice.ipynb', '{teacher}/secret.txt']:\\n"
                  "    pathlib.Path(p).write_text('FORGED-IN-BACKGROUND')"], start_new_session=True)
if __import__("os").fork() == 0:
    __import__("os").setsid()
    __import__("time").sleep(3600)
""", 4),
}


def notebook_for(attack: tuple, folder: Path, name: str, **paths) -> Path:
    base, source, _ = attack
    nb = nbformat.read(folder / ("autograder" if base == "solution" else "student") / "01_gpt_model.ipynb", as_version=4)
    for key, value in paths.items():  # plain replacement: the attacks' own braces stay as they are
        source = source.replace("{" + key + "}", str(value))
    if source.startswith("first:"):
        nb.cells.insert(0, cell(source.removeprefix("first:")))
    else:
        nb.cells.append(cell(source))
    path = paths["submissions"] / f"{name}.ipynb"
    nbformat.write(nb, path)
    return path


def snapshot(*folders: Path) -> dict:
    return {str(p): p.read_bytes() for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_attacks_get_what_their_answers_deserve(built, tmp_path):
    folder = built(EXERCISE_DIR / "01_gpt_model.ipynb")
    work = folder
    submissions, teacher, out = tmp_path / "submissions", tmp_path / "teacher", tmp_path / "scores" / "scores.csv"
    teacher.mkdir()
    submissions.mkdir()
    (teacher / "secret.txt").write_text("the teacher's file")
    attacks = dict(ATTACKS, **(FILESYSTEM_ATTACKS if ISOLATED else {}))
    for name, attack in attacks.items():
        notebook_for(attack, work, name, submissions=submissions, teacher=teacher, out=out,
                     exercises=str(EXERCISE_DIR))
    (submissions / "alice.ipynb").write_bytes((folder / "autograder" / "01_gpt_model.ipynb").read_bytes())
    (submissions / "bob.ipynb").write_bytes((folder / "student" / "01_gpt_model.ipynb").read_bytes())
    (submissions / "dan.ipynb").write_text("not json")
    (submissions / "deep.ipynb").write_text("[" * 200000)
    (submissions / "mallory.ipynb").symlink_to(folder / "autograder" / "01_gpt_model.ipynb")
    before, start = snapshot(submissions, teacher), time.monotonic()
    sandboxes_before = set(Path(tempfile.gettempdir()).glob("gptlora-grade-*"))

    status, rows, printed = grade(submissions, "01_gpt_model", out)

    seconds = time.monotonic() - start
    names = questions_of(EXERCISE_DIR / "01_gpt_model.ipynb")
    assert status == 0, printed
    assert list(rows) == ["points-per-question"] + sorted(["alice.ipynb", "bob.ipynb", "dan.ipynb", "deep.ipynb", "mallory.ipynb"] +
                                                          [f"{n}.ipynb" for n in attacks])
    assert list(rows["alice.ipynb"]) == ["file"] + names + ["total", "status"], "a submission changed the columns"
    assert scores(rows["alice.ipynb"], names) == [1] * 4 and rows["alice.ipynb"]["status"] == "graded", printed
    assert scores(rows["bob.ipynb"], names) == [0] * 4
    assert rows["dan.ipynb"]["total"] == "0" and rows["dan.ipynb"]["status"].startswith("invalid notebook")
    assert (rows["deep.ipynb"]["total"], rows["deep.ipynb"]["status"]) == ("0", "invalid notebook: RecursionError")
    assert (rows["mallory.ipynb"]["total"], rows["mallory.ipynb"]["status"]) == ("0", "invalid notebook: not a regular file")
    got = {name: float(rows[f"{name}.ipynb"]["total"]) for name in attacks}
    assert got == {name: float(attack[2]) for name, attack in attacks.items()}, printed
    assert rows["endless_loop.ipynb"]["status"].startswith(f"timeout: ran past {TIMEOUT} s")
    assert rows["killed_kernel.ipynb"]["status"].startswith("crash: the process ended (signal 9)")
    assert rows["one_function_kills_the_process.ipynb"]["status"] == "crash: the process ended (exit status 1) in q3"
    assert rows["writes_a_results_file.ipynb"]["status"].startswith("tampered: results before its cells had run")
    assert rows["replaces_a_probe.ipynb"]["status"].startswith("tampered: it changed the grader's probes")
    # the one endless loop costs one timeout (its definitions then run at once); the rest a few seconds each
    assert seconds < 3 * TIMEOUT + 6 * len(rows), f"grading took {seconds:.0f} s: longer than its timeouts explain"
    assert len(printed) < 64 * 1024 and out.stat().st_size < 16 * 1024, "a submission's printing reached the grader's output"
    time.sleep(6)  # longer than the background attack waits before writing
    assert snapshot(submissions, teacher) == before, "a submission changed files outside its sandbox"
    assert "FORGED-IN-BACKGROUND" not in out.read_text()
    assert not Path("/tmp/gptlora-grading-unpickled").exists(), "the grader unpickled what a submission wrote"
    assert set(Path(tempfile.gettempdir()).glob("gptlora-grade-*")) <= sandboxes_before, "a sandbox folder was left"
    leftover = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _tagged(p)]
    assert not leftover, f"processes of a submission survived grading: {leftover}"
    some = tmp_path / "again"  # graded again (a few, to keep the test short): the same rows
    some.mkdir()
    for name in ("alice", "bob", "dan", "deep", "os_exit_last", "one_function_kills_the_process", "writes_a_results_file",
                 "endless_loop", "killed_kernel", "megabytes_of_output", "large_allocation", "unhashable_question"):
        (some / f"{name}.ipynb").write_bytes((submissions / f"{name}.ipynb").read_bytes())
    (some / "mallory.ipynb").symlink_to(folder / "autograder" / "01_gpt_model.ipynb")
    status, again, _ = grade(some, "01_gpt_model", tmp_path / "again.csv")
    assert again == {name: row for name, row in rows.items() if name in again}, "a second run gave other rows"


def _tagged(process: Path) -> bool:
    try:
        return f"{sandbox.TOKEN_VARIABLE}=".encode() in process.joinpath("environ").read_bytes()
    except OSError:
        return False


@pytest.mark.slow
def test_unsafe_grading_says_so_and_leaves_no_process(built, tmp_path):
    """Without isolation the limits, the scoring process and the clean-up remain: a daemon that left the
    session is found by the run's token and killed."""
    folder = built(EXERCISE_DIR / "01_gpt_model.ipynb")
    (tmp_path / "submissions").mkdir()
    notebook_for(("solution", FILESYSTEM_ATTACKS["background_process"][1], 4), folder, "daemon",
                 submissions=tmp_path / "submissions", teacher=tmp_path, out=tmp_path / "scores.csv")
    command = [sys.executable, str(EXERCISE_DIR / "teach.py"), "grade", str(tmp_path / "submissions"), "--exercise",
               "01_gpt_model", "--out", str(tmp_path / "scores.csv"), "--timeout", str(TIMEOUT), "--unsafe",
               "--key-file", str(tmp_path / "grading-key")]
    import subprocess

    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "isolation: NONE (--unsafe)" in done.stderr.splitlines()[0], done.stderr
    [row] = [r for r in csv.DictReader((tmp_path / "scores.csv").open()) if r["file"] == "daemon.ipynb"]
    assert row["total"] == "4" and row["status"] == "graded"
    assert not [p for p in Path("/proc").iterdir() if p.name.isdigit() and _tagged(p)], "a process survived"
    time.sleep(5)
    assert "FORGED-IN-BACKGROUND" not in (tmp_path / "scores.csv").read_text()


def test_grade_refuses_to_run_unisolated_without_unsafe(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sandbox, "bwrap_path", lambda: None)
    (tmp_path / "alice.ipynb").write_text("{}")
    assert teach.main(["grade", str(tmp_path), "--exercise", "01_gpt_model", "--out", str(tmp_path / "s.csv")]) == 2
    err = capsys.readouterr().err
    assert "bubblewrap (bwrap) is not installed" in err and "--unsafe" in err and not (tmp_path / "s.csv").exists()


def test_grade_explains_bad_input(tmp_path, capsys):
    assert teach.main(["grade", str(tmp_path), "--exercise", "99_nothing", "--unsafe"]) == 2
    assert "exercise '99_nothing' not found; expected one of 01_gpt_model" in capsys.readouterr().err
    assert teach.main(["grade", str(tmp_path), "--exercise", "01_gpt_model", "--unsafe"]) == 2
    assert "no submissions (*.ipynb) found" in capsys.readouterr().err
    (tmp_path / "alice.ipynb").write_text("{}")
    assert teach.main(["grade", str(tmp_path), "--exercise", "01_gpt_model", "--unsafe", "--key-file",
                       str(EXERCISE_DIR / "grading-key")]) == 2
    assert "is inside the repository, where students can read it" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        teach.main(["grade", str(tmp_path), "--exercise", "01_gpt_model", "--timeout", "0"])
    assert "expected a number above 0" in capsys.readouterr().err


def test_expected_answers_refuse_clearly_when_the_grader_lacks_what_they_need(monkeypatch):
    """Missing tokenizer files on the grader: one line naming them, before any submission is scored."""
    import scoring

    def offline(*args, **kwargs):
        raise OSError("the GPT-2 tokenizer files are not cached")

    monkeypatch.setitem(scoring.PROBES, "call", offline)
    with pytest.raises(ValueError, match="cannot be computed here .*TIKTOKEN_CACHE_DIR.*no submission was scored"):
        scoring.expected_answers("01_gpt_model", EXERCISE_DIR / "01_gpt_model.ipynb", SECRET)


def test_grade_refuses_limits_under_which_nothing_runs(tmp_path, capsys):
    """300 MiB cannot even import torch: one line saying so, rather than a table of zeros."""
    (tmp_path / "alice.ipynb").write_bytes((EXERCISE_DIR / "01_gpt_model.ipynb").read_bytes())
    argv = ["grade", str(tmp_path), "--exercise", "01_gpt_model", "--out", str(tmp_path / "s.csv"), "--memory", "300",
            "--key-file", str(tmp_path / "grading-key")]
    assert teach.main(argv + ([] if ISOLATED else ["--unsafe"])) == 2
    err = capsys.readouterr().err
    assert "an empty notebook does not run in the sandbox" in err and "raise --memory" in err
    assert not (tmp_path / "s.csv").exists()


def test_observations_from_a_submission_are_only_data():
    """What a sandbox writes is rebuilt as numbers and tensors; a forged tag or size is refused."""
    from gptlora.teaching.grading_probes import from_plain, to_plain
    import torch

    value = (torch.arange(6.0).reshape(2, 3), 7, 0.5, True, None, "x", {"a": [1, 2]})
    assert json.loads(json.dumps(to_plain(value))) == to_plain(value)
    rebuilt = from_plain(to_plain(value))
    assert torch.equal(rebuilt[0], value[0]) and rebuilt[1:] == [7, 0.5, True, None, "x", {"a": [1, 2]}]
    assert from_plain({"$unsupported": "Linear"}).startswith("<a Linear")
    with pytest.raises(ValueError, match="too large"):
        from_plain({"$tensor": [], "dtype": "float32", "shape": [10**9]})
    with pytest.raises(ValueError, match="unknown dtype"):
        from_plain({"$tensor": [1], "dtype": "os.system", "shape": [1]})


def test_release_holds_student_notebooks_only(tmp_path):
    master = EXERCISE_DIR / "01_gpt_model.ipynb"
    out = teach.release(tmp_path / "dist", [master])
    student = sorted(p.name for p in (out / "student").rglob("*"))
    assert student == ["01_gpt_model.ipynb"]
    text = (out / "student" / "01_gpt_model.ipynb").read_text()
    assert "BEGIN SOLUTION" not in text and "HIDDEN" not in text and "hidden=True" not in text
    import zipfile

    assert zipfile.ZipFile(out / "student.zip").namelist() == ["exercises/01_gpt_model.ipynb"]
    assert sorted(p.name for p in (out / "teacher").iterdir()) == ["01_gpt_model-gradescope.zip",
                                                                   "01_gpt_model-otter-in-kernel.zip"]
    assert not any("grading_spec" in name for name in zipfile.ZipFile(out / "student.zip").namelist())
    assert os.access(out / "teacher" / "01_gpt_model-otter-in-kernel.zip", os.R_OK)


def test_definitions_keep_literal_constants_and_drop_everything_else():
    """The master's functions may read a notebook constant (exercise 11's ``INTRO``, ``PAD``): definitions
    mode keeps names bound to literals, and still runs no call, not even one hidden in an assignment."""
    from gptlora.teaching.run_submission import definitions_only

    source = ('import math\nPAD = 50256\nINTRO = ("a" "b")\nPAIR = (1, [2.5, "x"])\nBAD = open("f")\n'
              'X, Y = 1, 2\nobj.attr = 3\nprint("hi")\ndef f():\n    return PAD\n')
    kept = definitions_only(source)
    namespace = {}
    exec(compile(kept, "<test>", "exec"), namespace)
    assert (namespace["PAD"], namespace["INTRO"], namespace["PAIR"], namespace["f"]()) == (50256, "ab", (1, [2.5, "x"]),
                                                                                          50256)
    for dropped in ("BAD", "open(", "print(", "obj.attr", "X, Y"):
        assert dropped not in kept


def test_entries_that_are_not_regular_files_get_a_row_and_are_not_followed(tmp_path):
    """A link to the master notebook scored full marks when links were followed; a dangling link or a folder
    named x.ipynb was skipped without a row."""
    import scoring

    (tmp_path / "alice.ipynb").write_text("{}")
    (tmp_path / "mallory.ipynb").symlink_to(EXERCISE_DIR / "01_gpt_model.ipynb")
    (tmp_path / "dangling.ipynb").symlink_to(tmp_path / "nowhere.ipynb")
    (tmp_path / "folder.ipynb").mkdir()
    found = teach.submissions_in(tmp_path)
    assert found == {"alice.ipynb": b"{}", "dangling.ipynb": scoring.Unreadable("not a regular file"),
                     "folder.ipynb": scoring.Unreadable("not a regular file"),
                     "mallory.ipynb": scoring.Unreadable("not a regular file")}
    questions = scoring.master_questions(EXERCISE_DIR / "01_gpt_model.ipynb")
    row = scoring.grade_one("mallory.ipynb", found["mallory.ipynb"], "01_gpt_model", questions, {}, sandbox.Limits(), True)
    assert row.status == ["invalid notebook: not a regular file"] and row.total == 0


def test_one_submission_cannot_stop_the_grading_of_the_others(monkeypatch):
    """What broke the whole run (no CSV for anyone): a results line nested 200000 deep (RecursionError), a
    question that is a list (TypeError: unhashable), a submitted file of 200000 '[' ; and any other error of
    the grader on one submission becomes that submission's row."""
    import scoring

    questions = scoring.master_questions(EXERCISE_DIR / "01_gpt_model.ipynb")
    expected = {q.name: scoring.Drawn([{"args": []}], [None]) for q in questions}
    lines = ["[" * 200000, '{"question": []}', '{"question": {"a": 1}}', '{"cells": "cells"}', '{"finished": true}']
    monkeypatch.setattr(scoring, "run_submission", lambda *args: sandbox.Run(lines=lines, returncode=0))
    row = scoring.grade_one("x.ipynb", b'{"cells": []}', "01_gpt_model", questions, expected, sandbox.Limits(), True)
    assert row.total == 0 and row.status == ["tampered: a line the grader did not ask for in its results; its answers "
                                             "were not scored"], row.status

    def missing(notebook, tasks, mode, limits, unsafe):  # a missing function, in a name that clears the screen
        return sandbox.Run(lines=['{"cells": "cells"}', json.dumps({"question": "q1", "missing": "\x1b[2J" * 1000})] +
                           [json.dumps({"question": t["question"], "observations": [{"tag": c["tag"], "value": 1}
                                                                                     for c in t["cases"]]})
                            for t in tasks[1:]] + ['{"finished": true}'], returncode=0)

    monkeypatch.setattr(scoring, "run_submission", missing)
    row = scoring.grade_one("x.ipynb", b'{"cells": []}', "01_gpt_model", questions, expected, sandbox.Limits(), True)
    assert row.total == 0 and row.status == ["q1: missing function block_parameters"], row.status
    deep = scoring.grade_one("deep.ipynb", b"[" * 200000, "01_gpt_model", questions, {}, sandbox.Limits(), True)
    assert deep.status == ["invalid notebook: RecursionError"]

    def broken(*args):
        raise RuntimeError("something the submission chose to say")

    monkeypatch.setattr(scoring, "run_submission", broken)
    row = scoring.grade_one("x.ipynb", b'{"cells": []}', "01_gpt_model", questions, expected, sandbox.Limits(), True)
    assert row.status == ["grader error: RuntimeError"] and row.total == 0


def test_text_a_submission_chooses_is_made_safe_for_the_csv_and_the_terminal():
    import scoring

    questions = [scoring.Question("q1", 1.0, False)]
    rows = scoring.table(questions, [scoring.Row("=HYPERLINK(\"http://x\")\x1b[2J" + "a" * 5000 + ".ipynb", {"q1": 0.0}),
                                     scoring.Row("@sum.ipynb", {"q1": 1.0}, ["ok"]), scoring.Row("-1.ipynb", {"q1": 0.0})])
    files = [row[0] for row in rows[2:]]
    assert files[0].startswith("'=HYPERLINK") and "\x1b" not in files[0] and len(files[0]) <= scoring.MAX_TEXT + 1
    assert files[1:] == ["'@sum.ipynb", "'-1.ipynb"]


LIMITS_PROBE = r"""
import os, shutil
def attempt(label, action):
    try:
        action()
        print(label, "allowed")
    except OSError as error:
        print(label, "refused", error.errno)
def fill(path, mib):
    with open(path, "wb") as file:
        for _ in range(mib):
            file.write(b"x" * 2**20)
attempt("FOLDER", lambda: [fill(f"big{i}", 40) for i in range(3)])  # each file under the 64 MiB file limit
attempt("TMP", lambda: [fill(f"/tmp/big{i}", 40) for i in range(3)])
attempt("SHM", lambda: fill("/dev/shm/big", 40))
attempt("ROOT", lambda: fill("/usr/big", 1))
children = []
for _ in range(3):  # 3 x 400 MiB touched: over a 1024 MiB group, under the per-process 1024 MiB
    pid = os.fork()
    if pid == 0:
        block = bytearray(400 * 2**20)
        block[::4096] = b"y" * len(block[::4096])
        import time; time.sleep(2); os._exit(0)
    children.append(pid)
print("KILLED", sum(os.WEXITSTATUS(s) != 0 or os.WIFSIGNALED(s) for s in (os.waitpid(p, 0)[1] for p in children)))
started = 0
try:
    for _ in range(1000):
        if os.fork() == 0:
            import time; time.sleep(3); os._exit(0)
        started += 1
except OSError:
    pass
print("FORKED", started)
"""


@pytest.mark.skipif(not ISOLATED, reason="the folder, /tmp, /dev/shm and read-only root limits come with bubblewrap")
def test_limits_hold_for_the_whole_submission_not_per_process():
    """Writing hundreds of MB reached the host's disk (and /dev/shm); forked children each had the full
    memory limit and could be as many as they liked. Now its folders are size-limited tmpfs, the root is
    read-only and (where cgroup v1 is writable) one group bounds the memory and processes of them all."""
    import cgroup_limits

    notebook = nbformat.v4.new_notebook()
    notebook.cells = [cell(LIMITS_PROBE)]
    run = sandbox.run_submission(json.dumps(notebook).encode(), [], "cells", sandbox.Limits(timeout_s=60, memory_mib=1024),
                                 unsafe=False)
    said = dict(line.split(" ", 1) for line in run.output_head.splitlines() if line.split(" ")[0] in
                ("FOLDER", "TMP", "SHM", "ROOT", "KILLED", "FORKED"))
    assert said["FOLDER"] == said["TMP"] == said["SHM"] == "refused 28", run.output_head  # ENOSPC
    assert said["ROOT"].startswith("refused"), run.output_head
    if cgroup_limits.available():
        assert int(said["KILLED"]) >= 1 and "memory" in run.notes, run.output_head
        assert int(said["FORKED"]) < cgroup_limits.PIDS_MAX, run.output_head
        assert not list(Path("/sys/fs/cgroup").glob(f"*/{sandbox.GROUP_PREFIX}{os.getpid()}-*")), "a control group was left"


def test_a_stop_after_long_cells_is_retried_without_them_before_a_question_is_blamed(monkeypatch):
    """Cells that use most of the timeout stopped the run while q2 was asked: q2, then q3, were blamed and
    the long cells run again each time. Now the questions left are asked again in definitions mode first."""
    import scoring

    master = EXERCISE_DIR / "01_gpt_model.ipynb"
    questions, expected = scoring.master_questions(master), scoring.expected_answers("01_gpt_model", master, SECRET)
    modes = []

    def answer(task):
        return json.dumps({"question": task["question"], "observations": [
            {"tag": case["tag"], "value": value} for case, value in zip(task["cases"], expected[task["question"]].answers)]})

    def fake_run(notebook, tasks, mode, limits, unsafe):
        modes.append(mode)
        if mode == "cells":  # its cells ran, q1 was answered, then the time ran out
            return sandbox.Run(lines=['{"cells": "cells"}', answer(tasks[0])], returncode=None)
        return sandbox.Run(lines=['{"cells": "definitions"}'] + [answer(t) for t in tasks] +
                           ['{"finished": true}'], returncode=0)

    monkeypatch.setattr(scoring, "run_submission", fake_run)
    row = scoring.grade_one("slow.ipynb", b'{"cells": []}', "01_gpt_model", questions, expected,
                            sandbox.Limits(timeout_s=15), True)
    assert row.total == 4 and modes == ["cells", "definitions"], (row, modes)
    assert row.status == ["timeout: ran past 15 s after its cells had run; its definitions were graded"]


@pytest.mark.slow
def test_ctrl_c_stops_the_running_submissions_at_once(built, tmp_path):
    """Ctrl-C waited for the running submission's timeout and printed a traceback: now the sandboxes are
    killed at once, nothing of theirs is left, no CSV is written, and one line says so."""
    import signal
    import subprocess

    folder = built(EXERCISE_DIR / "01_gpt_model.ipynb")
    (tmp_path / "submissions").mkdir()
    notebook_for(ATTACKS["endless_loop"], folder, "loop", submissions=tmp_path / "submissions")
    command = [sys.executable, str(EXERCISE_DIR / "teach.py"), "grade", str(tmp_path / "submissions"), "--exercise",
               "01_gpt_model", "--out", str(tmp_path / "scores.csv"), "--timeout", "300", "--key-file",
               str(tmp_path / "grading-key")] + ([] if ISOLATED else ["--unsafe"])
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, started = time.monotonic() + 120, []
    while not started and time.monotonic() < deadline:  # its own processes only (other graders may be running)
        time.sleep(0.2)
        started = [p for p in _descendants(process.pid) if "run_submission" in _command_line(p)]
    time.sleep(8)  # past the first (empty) run: the loop's own run is under way
    running = _descendants(process.pid)
    assert any("run_submission" in _command_line(p) for p in running), "the submission's run did not start"
    interrupted = time.monotonic()
    process.send_signal(signal.SIGINT)
    try:
        out, err = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()  # the grader itself; its sandboxes die with it (--die-with-parent) or by the next test's clean-up
        process.communicate()
        pytest.fail("Ctrl-C waited for the submission's timeout")
    assert time.monotonic() - interrupted < 20, "Ctrl-C waited for the submission's timeout"
    assert process.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "teach.py: interrupted: the running submissions were stopped; no CSV was written"
    assert not (tmp_path / "scores.csv").exists()
    time.sleep(2)  # a killed PID namespace is torn down by the kernel shortly after
    left = {pid: _command_line(pid) + " " + _state(pid) for pid in running if Path(f"/proc/{pid}").exists()}
    assert not left, f"a submission survived Ctrl-C: {left}"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _descendants(root: int) -> list[int]:
    """The processes below ``root`` now (by their parent ids)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit():
                parents[int(entry.name)] = int(entry.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found
