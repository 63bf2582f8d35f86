"""No question of any exercise can be scored without computing its answer (issue 26).

- the grading inputs are drawn per run from the teacher's key and a nonce: every case of every question
  differs between two keys and between two runs, so a table computed from the public spec misses;
- the key file is made once, 0600, atomically (two graders at once get the same key), outside the repository;
- generic forgers, run against every question of every exercise in ``SPEC`` through the grader's own
  responder (``run_submission.respond``), results reader and comparison, in this process: echoes of the
  inputs, constants of the usual types, a table of answers computed at home, lines written to the results
  channel (then returning, or stopping the process), and replaced probes. Each scores 0; the master's
  solutions, through the same path, score full marks.

The sandbox itself is not what is tested here (tests/test_grading.py runs the process-level attacks through
it); running the forgers in-process keeps this to one computation of the expected answers per exercise.
"""

from __future__ import annotations

import io
import json
import stat
import sys
import threading

import pytest
import torch

from conftest import REPO_ROOT, load_teach

EXERCISE_DIR = REPO_ROOT / "exercises"
load_teach()  # puts exercises/ on the path
import grading_spec  # noqa: E402
import scoring  # noqa: E402
import secret_inputs  # noqa: E402
from gptlora.teaching import grading_probes, run_submission  # noqa: E402

RUN = secret_inputs.Secret(b"the teacher's key".ljust(32, b"."), "nonce of this run")
HOME = secret_inputs.Secret(b"a key a student guessed".ljust(32, b"."), "nonce of this run")
NEXT_RUN = secret_inputs.Secret(RUN.key, "nonce of the next run")
EXERCISES = sorted(grading_spec.SPEC)


def resolved(secret, exercise, name):
    return [secret_inputs.resolve(case, secret, exercise, name, index, 0)
            for index, case in enumerate(grading_spec.SPEC[exercise][name].cases)]


def test_every_case_of_every_question_is_drawn_from_the_key_and_the_run():
    """A table keyed by the inputs of the public spec (or of an earlier run) finds none of this run's."""
    for exercise, questions in grading_spec.SPEC.items():
        for name, spec in questions.items():
            assert len(spec.cases) >= 2, f"{exercise} {name}: give it two cases or more"
            if spec.fixed_inputs:  # a quiz (11 q5): the inputs are the question; the forgers below still apply
                continue
            for other in (HOME, NEXT_RUN):
                for index, (mine, theirs) in enumerate(zip(resolved(RUN, exercise, name), resolved(other, exercise, name))):
                    assert mine != theirs, f"{exercise} {name} case {index}: the same input without the key"


def test_the_key_file_is_made_once_private_and_atomically(tmp_path):
    path = tmp_path / "config" / "grading-key"
    keys, threads = [], [threading.Thread(target=lambda: keys.append(secret_inputs.grading_key(path))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(keys)) == 1 and len(keys[0]) == 32, "two graders starting at once used different keys"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["grading-key"], "a temporary key file was left"
    assert secret_inputs.grading_key(path) == keys[0]


def test_a_key_file_others_can_read_or_inside_the_repository_is_refused(tmp_path):
    path = tmp_path / "grading-key"
    secret_inputs.grading_key(path)
    path.chmod(0o644)
    with pytest.raises(ValueError, match="readable by others .*chmod 600"):
        secret_inputs.grading_key(path)
    path.chmod(0o600)
    path.write_text("not hex\n")
    with pytest.raises(ValueError, match="does not hold 64 hex characters; remove it"):
        secret_inputs.grading_key(path)
    with pytest.raises(ValueError, match="inside the repository, where students can read it; .*--key-file"):
        secret_inputs.grading_key(REPO_ROOT / "grading-key")
    assert not (REPO_ROOT / "grading-key").exists()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on one thread, as in the sandbox: threads only contend on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def drawn():
    """Per exercise: its questions, this run's inputs with their expected answers, the master's solutions, and
    the answers of the same questions drawn with a key a student might guess (a table made at home)."""
    found = {}
    for exercise in EXERCISES:
        master = EXERCISE_DIR / f"{exercise}.ipynb"
        found[exercise] = (scoring.master_questions(master), scoring.expected_answers(exercise, master, RUN),
                           scoring.solution_namespace(master), scoring.expected_answers(exercise, master, HOME))
    return found


def _frame_local(name: str):
    """A local variable of the grader's responder, found as a submission would: up the call stack."""
    frame = sys._getframe(1)
    while frame is not None and name not in frame.f_locals:
        frame = frame.f_back
    return frame.f_locals[name]


class Stop(BaseException):
    """Stands for ``os._exit``: the process ends with what it wrote so far."""


def _forged_lines(tasks, home):
    return [json.dumps({"question": t["question"], "observations": [{"tag": c["tag"], "value": v} for c, v in
                                                                   zip(t["cases"], home[t["question"]].answers)]})
            for t in tasks] + [json.dumps({"finished": True})]


def _writes_the_results(then_stop: bool, home):
    def forger(*args, **kwargs):
        results, tasks = _frame_local("results"), _frame_local("tasks")
        results.write("\n" + "\n".join(_forged_lines(tasks, home)) + "\n")
        if then_stop:
            raise Stop
        return 0
    return forger


def _echo_probe(function, *args, **kwargs):
    return args[0] if args else None


def _replaces_the_probes(*args, **kwargs):
    for name in grading_probes.PROBES:
        grading_probes.PROBES[name] = _echo_probe
    grading_probes.call.__code__ = _echo_probe.__code__
    return args[0] if args else None


CONSTANTS = [0, 1, 0.0, 1.0, True, False, None, "", [], (), {}, (0, 0), torch.tensor(0.0), torch.zeros(3),
             [False, True, False]]  # the last: 04 q3's answer, whatever the model, before issue 26
FORGERS = {"echo the first input": lambda *a, **k: a[0] if a else None,
           "echo all inputs": lambda *a, **k: a,
           **{f"constant {c!r}": (lambda c: lambda *a, **k: c)(c) for c in CONSTANTS},
           "replace the probes while answering": _replaces_the_probes}


def score(exercise, drawn, functions, *, forged_lines=None, before=None) -> tuple[float, set[str]]:
    """What the grader gives a submission whose functions are ``functions`` (run through the responder, as in
    the sandbox), or whose results are ``forged_lines``; and the statuses of its row."""
    questions, expected, _, _ = drawn[exercise]
    tasks = scoring.tasks_for(exercise, expected)
    probes, results = run_submission.TrustedProbes(), io.StringIO()
    try:
        if before:
            before()  # a cell, after the probes were taken
        if forged_lines is None:
            run_submission.respond(tasks, functions, probes, results, {"cells": "cells", "problems": []})
        else:
            results.write("\n".join([json.dumps({"cells": "cells", "problems": []})] + forged_lines))
    except Stop:
        pass
    finally:
        probes.restore()
    found = scoring.read_results(results.getvalue().splitlines(), tasks)
    if found.tampered:
        return 0.0, {"tampered"}
    judged = [scoring.judge(found.records.get(q.name), expected[q.name], grading_spec.SPEC[exercise][q.name], q)
              for q in questions]
    return sum(points for points, _ in judged), {problem for _, problem in judged if problem}


@pytest.mark.parametrize("exercise", EXERCISES)
def test_forgers_score_zero_on_every_question_and_the_solution_full_marks(exercise, drawn):
    questions, expected, solutions, home = drawn[exercise]
    names = {spec.function for spec in grading_spec.SPEC[exercise].values()}
    full = sum(q.points for q in questions)
    assert score(exercise, drawn, solutions) == (full, set()), "the master's solutions lost points"
    got = {label: score(exercise, drawn, {name: forger for name in names})[0] for label, forger in FORGERS.items()}
    got["a table of answers made at home"] = score(exercise, drawn, {}, forged_lines=_forged_lines(
        scoring.tasks_for(exercise, expected), home))[0]
    for label, then_stop in (("write the results, then return", False), ("write the results, then stop", True)):
        forger = _writes_the_results(then_stop, home)
        got[label] = score(exercise, drawn, {name: forger for name in names})[0]
    got["a cell replaces the probes"] = score(exercise, drawn, solutions, before=lambda: _replaces_the_probes())[0]
    assert got == {label: 0.0 for label in got}, {label: points for label, points in got.items() if points}
    assert grading_probes.PROBES == run_submission.TrustedProbes().probes  # this process's probes are back


def test_an_echo_or_a_constant_answer_makes_the_grader_draw_again():
    """04 q3's answer was always [False, True, False] and 01 q3 observed the rates it was given: a spec whose
    answers would be constant, or equal to an input, is now drawn again, and refused if it stays so."""
    spec = grading_spec.ask("f", [1], [2])
    cases = [{"args": [1]}, {"args": [2]}]
    assert scoring.answer_flaw(spec, cases, [5, 5]) == "the same answer to every case"
    assert scoring.answer_flaw(spec, cases, [3, 2]) == "an answer equal to its input"
    assert scoring.answer_flaw(spec, cases[:1], [3]) == "fewer than two cases"
    assert scoring.answer_flaw(spec, cases, [3, 4]) == ""


def test_results_out_of_order_or_after_the_answers_mark_the_row_as_tampered():
    tasks = [{"question": "q1", "cases": [{"tag": "a"}]}, {"question": "q2", "cases": [{"tag": "b"}]}]
    header, q1, q2 = '{"cells": "cells"}', '{"question": "q1", "observations": [{"tag": "a", "value": 1}]}', \
        '{"question": "q2", "observations": [{"tag": "b", "value": 2}]}'
    end = '{"finished": true}'
    good = scoring.read_results([header, "", q1, q2, end], tasks)
    assert (sorted(good.records), good.cells_ran, good.finished, good.tampered) == (["q1", "q2"], True, True, "")
    for lines in ([q1, header, q1, q2, end], [header, q1, q1, q2, end], [header, q2, q1, end],
                  [header, q1, q2, end, q2], [header, q1.replace('"a"', '"c"'), q2, end], [header, "not json", q1]):
        assert scoring.read_results(lines, tasks).tampered, lines
    stopped = scoring.read_results([header, q1], tasks)  # a run that stopped: what came is kept
    assert (sorted(stopped.records), stopped.finished, stopped.tampered) == (["q1"], False, "")
