"""The trusted side of grading: expected answers from the master notebook, scores from plain JSON.

This process imports gptlora and the teacher's master notebook, never a submission: each submission
runs in its own sandboxed process (sandbox.py) that only reports, as JSON, what its functions answered
on the grader's inputs (grading_spec.py, drawn for this run from the teacher's secret: secret_inputs.py).
Here those answers are rebuilt as numbers and tensors and compared with what the master's solutions
answer through the same probes. Question names and points come from the master notebook. The results
must be exactly the sequence the sandboxed process writes (a header, one record per question asked, in
order, each case with the tag it was sent with, then ``finished``); any other line marks the row as
tampered and scores it 0.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from gptlora.teaching.exercise_checks import expect
from gptlora.teaching.grading_probes import PROBES, build, from_plain, to_plain
from gptlora.teaching.run_submission import code_cells, definitions_only

from grading_spec import SPEC
from sandbox import DEADLINE_RUNS, Limits, run_submission, stop_all
from secret_inputs import Secret, resolve

MAX_NOTEBOOK_BYTES = 20 * 1024 * 1024
MAX_TEXT = 200  # characters of any one CSV/terminal field that a file name can put there
PARSE_ERRORS = (ValueError, RecursionError)  # what json.loads raises on a broken or a deeply nested line
DRAWS = 20  # draws of a question's inputs before its spec is refused (a good spec needs one or two)
MAX_TASKS_BYTES = 60_000  # the task list fits the pipe's buffer: the sandbox writes it before the cells end


@dataclass(frozen=True)
class Unreadable:
    """A submitted entry that is no notebook file (a link, a folder): why, in the grader's own words."""

    reason: str


@dataclass(frozen=True)
class Question:
    name: str
    points: float
    all_or_nothing: bool


@dataclass(frozen=True)
class Drawn:
    """One question's cases as drawn for this grading run (plain JSON, sent to the sandbox) and the master
    solution's observation of each (plain JSON, never sent)."""

    cases: list
    answers: list


@dataclass
class Row:
    """One submission's line of the table."""

    file: str
    scores: dict
    status: list[str] = field(default_factory=list)
    records: dict = field(default_factory=dict)  # question -> what the sandbox answered (for feedback messages)

    @property
    def total(self) -> float:
        return sum(self.scores.values())


def master_questions(master: Path) -> list[Question]:
    """The questions of a master notebook (name, points) from its ``# BEGIN QUESTION`` cells."""
    questions = []
    for cell in json.loads(master.read_text())["cells"]:
        source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        if cell["cell_type"] == "raw" and re.match(r"#\s*BEGIN QUESTION", source, re.IGNORECASE):
            header = yaml.safe_load(source.split("\n", 1)[1])
            questions.append(Question(str(header["name"]), float(header.get("points", 1)),
                                      bool(header.get("all_or_nothing", False))))
    return questions


def solution_namespace(master: Path) -> dict:
    """The master's imports and solution functions (its test cells and demo lines left out), run here."""
    notebook, inside_tests, namespace = json.loads(master.read_text()), False, {"__name__": "solutions"}
    for cell in notebook["cells"]:
        source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        if cell["cell_type"] == "raw" and re.match(r"#\s*(BEGIN|END) TESTS", source, re.IGNORECASE):
            inside_tests = "BEGIN" in source.upper()
        elif cell["cell_type"] == "code" and not inside_tests:
            [code] = code_cells({"cells": [cell]})
            exec(compile(definitions_only(code), f"<{master.name}>", "exec"), namespace)
    return namespace


def tasks_for(exercise: str, drawn: dict[str, Drawn], questions=None) -> list[dict]:
    """What the sandboxed process is asked: per question, the function, the probe and the drawn inputs, each
    case with a fresh random tag (so that an answer names the one case it answers, in this run only)."""
    return [{"question": name, "function": spec.function, "probe": spec.probe,
             "cases": [{**case, "tag": secrets.token_hex(8)} for case in drawn[name].cases]}
            for name, spec in SPEC[exercise].items() if questions is None or name in questions]


def expected_answers(exercise: str, master: Path, secret: Secret) -> dict[str, Drawn]:
    """Each question's inputs drawn for ``secret`` and the solution's observation of each, as JSON-able data
    (as a submission's would be). A draw whose answers are all equal, or one of which equals an input of its
    case, is drawn again: an echo or a constant would score on it."""
    if exercise not in SPEC:
        raise ValueError(f"no grading spec for {exercise}; add its questions to exercises/grading_spec.py")
    names = [q.name for q in master_questions(master)]
    if sorted(names) != sorted(SPEC[exercise]):
        raise ValueError(f"exercises/grading_spec.py lists questions {sorted(SPEC[exercise])} for {exercise}, "
                         f"its master notebook {names}; list each question of the notebook once")
    solutions, expected = solution_namespace(master), {}
    for name, spec in SPEC[exercise].items():
        for attempt in range(DRAWS):
            cases = [resolve(case, secret, exercise, name, index, attempt) for index, case in enumerate(spec.cases)]
            try:
                answers = [to_plain(PROBES[spec.probe](solutions[spec.function], *build(case["args"]),
                                                       **build(case.get("kwargs", {})))) for case in cases]
            except Exception as error:
                raise ValueError(f"the expected answers of {exercise} {name} cannot be computed here "
                                 f"({type(error).__name__}: {error}); provide what it names (the GPT-2 tokenizer "
                                 f"files: TIKTOKEN_CACHE_DIR) before grading, no submission was scored") from None
            flaw = answer_flaw(spec, cases, answers)
            if not flaw:
                break
        else:
            raise ValueError(f"exercises/grading_spec.py: {exercise} {name}: {flaw} in {DRAWS} draws; give it at "
                             f"least two cases whose answers differ from each other and from their inputs")
        expected[name] = Drawn(cases, answers)
    if len(json.dumps(tasks_for(exercise, expected))) > MAX_TASKS_BYTES:
        raise ValueError(f"exercises/grading_spec.py: the inputs of {exercise} take more than {MAX_TASKS_BYTES} "
                         f"bytes as JSON; describe them by seeds and shapes rather than values")
    return expected


def answer_flaw(spec, cases: list, answers: list) -> str:
    """Why these answers would let a submission score without computing them (empty when none)."""
    if len(cases) < 2:
        return "fewer than two cases"
    if all(answer == answers[0] for answer in answers):
        return "the same answer to every case"
    for case, answer in zip(cases, answers):
        inputs = build(case["args"]) + list(build(case.get("kwargs", {})).values())
        for given in inputs + [inputs]:
            try:
                expect(spec.function, given, from_plain(answer), atol=spec.atol, rtol=spec.rtol)
                return "an answer equal to its input"
            except Exception:  # AssertionError: they differ (anything else: they cannot even be compared)
                continue
    return ""


def _booleans_only(value) -> bool:
    if isinstance(value, list):
        return all(_booleans_only(v) for v in value)
    return isinstance(value, bool)


def judge(record: dict | None, expected: Drawn, spec, question: Question) -> tuple[float, str]:
    """Points for one question's record from the sandbox, and what was wrong (empty when right).

    The same answer to every case, where the expected answers differ, is a constant: 0. Yes/no answers
    score all or nothing (a share of them right is what guessing gets)."""
    if record is None:
        return 0.0, "no answer"
    if "missing" in record:  # the function's name from the grader's spec: nothing the sandbox wrote is echoed
        return 0.0, f"missing function {spec.function}"
    observations, wanted = record.get("observations"), expected.answers
    if not isinstance(observations, list) or len(observations) != len(wanted):
        return 0.0, "malformed answer"
    values = [o.get("value") if isinstance(o, dict) else None for o in observations]
    if all(isinstance(o, dict) and "value" in o for o in observations) and all(v == values[0] for v in values):
        return 0.0, "the same answer to every input"
    right = 0
    for value, answer in zip(values, wanted):
        try:
            expect(spec.function, from_plain(value), from_plain(answer), atol=spec.atol, rtol=spec.rtol)
            right += 1
        except Exception:  # AssertionError for a wrong answer; anything a malformed one raises: no point
            continue
    if right == len(wanted):
        return question.points, ""
    share = 0.0 if question.all_or_nothing or _booleans_only(wanted) else right / len(wanted)
    return question.points * share, "wrong answer"


@dataclass
class Results:
    """What one run's results file holds, read as the one sequence an untouched run writes."""

    records: dict = field(default_factory=dict)
    cells_ran: bool = False
    finished: bool = False
    tampered: str = ""


def read_results(lines: list[str], tasks: list[dict]) -> Results:
    """The records of ``tasks`` in ``lines``, which must be: a header, one record per task in order (each case
    with the tag it was sent with), ``{"finished": true}``, and nothing else. The first record of a question
    is the one read; a line out of that order (written by a cell, a thread or a child of the submission,
    before, between or after the answers) marks the run as tampered."""
    found, expected = Results(), ["header"] + tasks + ["finished"]
    for line in (line for line in lines if line.strip()):
        step = len(found.records) + found.cells_ran + found.finished
        try:
            record = json.loads(line)
        except PARSE_ERRORS:
            record = None
        if step >= len(expected) or not isinstance(record, dict):
            found.tampered = "a line the grader did not ask for in its results"
        elif step == 0:
            found.cells_ran = "cells" in record or _tamper(found, "results before its cells had run")
        elif step == len(expected) - 1:
            found.finished = record == {"finished": True} or _tamper(found, "a line after its last answer")
        elif record.get("question") != expected[step]["question"]:
            found.tampered = "an answer out of order"
        elif record.get("changed"):
            found.tampered = f"it changed the grader's probes ({', '.join(map(str, record['changed']))[:100]})"
        elif "missing" not in record and _tags(record) != [case["tag"] for case in expected[step]["cases"]]:
            found.tampered = "an answer to a case it was not asked"
        else:
            found.records[record["question"]] = record
        if found.tampered:
            break
    return found


def _tags(record: dict) -> list:
    observations = record.get("observations")
    return [o.get("tag") if isinstance(o, dict) else None for o in observations] if isinstance(observations, list) else []


def _tamper(found: Results, why: str) -> bool:
    found.tampered = why
    return False


def _ending(run, limits: Limits) -> str:
    """Why a run stopped early, in a few words (the same words every time, for a stable table)."""
    printed = run.output_head + run.output_tail
    if run.returncode is None:
        return f"timeout: ran past {limits.timeout_s:g} s"
    if "memory" in run.notes or "MemoryError" in printed or "can't allocate memory" in printed or "Cannot allocate memory" in printed:
        return f"memory: ran out of its {limits.memory_mib} MiB"
    how = f"signal {-run.returncode}" if run.returncode < 0 else f"exit status {run.returncode}"
    return f"crash: the process ended ({how})"


def grade_one(file: str, notebook: bytes | Unreadable, exercise: str, questions: list[Question], expected: dict,
              limits: Limits, unsafe: bool) -> Row:
    """One submission's row, whatever it holds: a grader error on it becomes its row's status (its type only,
    no text the submission could choose), so that the others are graded."""
    try:
        return _grade(file, notebook, exercise, questions, expected, limits, unsafe)
    except Exception as error:
        return Row(file, {q.name: 0.0 for q in questions}, [f"grader error: {type(error).__name__}"])


def _grade(file: str, notebook: bytes | Unreadable, exercise: str, questions: list[Question], expected: dict,
           limits: Limits, unsafe: bool) -> Row:
    """Run a submission (again in ``definitions`` mode when its cells stop the process, and again for the
    remaining questions when one question's function does), then score what it answered."""
    row = Row(file, {q.name: 0.0 for q in questions})
    if isinstance(notebook, Unreadable):
        return Row(file, row.scores, [f"invalid notebook: {notebook.reason}"])
    try:
        if len(notebook) > MAX_NOTEBOOK_BYTES:
            raise ValueError(f"larger than {MAX_NOTEBOOK_BYTES // 2**20} MB")
        parsed = json.loads(notebook)
        if not isinstance(parsed, dict) or not isinstance(parsed.get("cells"), list):
            raise ValueError("no list of cells")
    except PARSE_ERRORS as error:
        row.status.append(f"invalid notebook: {error if type(error) is ValueError else type(error).__name__}")
        return row
    by_name, specs = {q.name: q for q in questions}, SPEC[exercise]
    remaining, mode, records = list(specs), "cells", {}
    stopped_after_cells = ""  # why a run in cells mode stopped while its questions were asked
    deadline = time.monotonic() + DEADLINE_RUNS * limits.timeout_s  # one for all its runs: ~2 x --timeout at most
    for _ in range(len(questions) + 3):
        left = deadline - time.monotonic()
        if left < 1:
            row.status.append(f"timeout: its runs used the {DEADLINE_RUNS:g} x {limits.timeout_s:g} s a submission gets;"
                              f" {', '.join(remaining)} not asked")
            break
        tasks = tasks_for(exercise, expected, remaining)  # fresh tags for every run
        run = run_submission(notebook, tasks, mode, replace(limits, timeout_s=min(limits.timeout_s, left)), unsafe)
        row.status += [f"isolation: {problem}" for problem in run.problems if f"isolation: {problem}" not in row.status]
        results = read_results(run.lines, tasks)
        if results.tampered:
            return Row(file, row.scores, row.status + [f"tampered: {results.tampered}; its answers were not scored"])
        found, cells_ran, finished = results.records, results.cells_ran, results.finished
        records.update(found)
        if not cells_ran:
            row.status.append(f"{_ending(run, limits)} while running its {mode}" + ("; its definitions were graded"
                                                                                    if mode == "cells" else ""))
            if mode == "cells":
                mode = "definitions"
                continue
            break
        remaining = [name for name in remaining if name not in found]
        if finished or not remaining:
            if stopped_after_cells:
                row.status.append(f"{stopped_after_cells} after its cells had run; its definitions were graded")
            break
        if mode == "cells":  # its cells may have used the time (or broken the state): ask again without them
            stopped_after_cells, mode = _ending(run, limits), "definitions"
            continue
        stopped_after_cells = ""  # it stopped without its cells too: the question asked first is to blame
        stuck = remaining.pop(0)  # the question whose function stopped the process
        row.status.append(f"{_ending(run, limits)} in {stuck}")
        if not remaining:
            break
    problems = []
    for question in questions:
        points, problem = judge(records.get(question.name), expected[question.name], specs[question.name],
                                by_name[question.name])
        row.scores[question.name] = points
        if problem.startswith("missing"):
            problems.append(f"{question.name}: {problem}")
    return Row(file, row.scores, row.status + problems, records)


def check_sandbox(limits: Limits, unsafe: bool) -> None:
    """Run an empty notebook first: if even that cannot run under these limits, stop before scoring anyone
    (a grader that cannot start Python must not give every submission 0)."""
    run = run_submission(json.dumps({"cells": []}).encode(), [], "cells", limits, unsafe)
    if not read_results(run.lines, []).finished:
        said = (run.output_tail.strip().splitlines() or ["nothing"])[-1][:200]
        raise ValueError(f"an empty notebook does not run in the sandbox ({_ending(run, limits)}; it said: {said}); "
                         f"raise --memory or --timeout, or check the isolation; no submission was scored")


def grade_submissions(submissions: dict[str, bytes], exercise: str, master: Path, limits: Limits, unsafe: bool,
                      jobs: int = 2, *, key: bytes) -> tuple[list[Question], list[Row]]:
    """Every submission's row (sorted by file name); the inputs are drawn from ``key`` (the teacher's, from
    secret_inputs.grading_key) and a fresh nonce, and their expected answers computed first, once."""
    questions = master_questions(master)
    expected = expected_answers(exercise, master, Secret.for_this_run(key))
    check_sandbox(limits, unsafe)
    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    try:
        rows = list(pool.map(lambda item: grade_one(item[0], item[1], exercise, questions, expected, limits, unsafe),
                             sorted(submissions.items())))
    except KeyboardInterrupt:  # Ctrl-C: kill the running sandboxes now rather than wait for their timeouts
        stop_all()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    return questions, rows


def table(questions: list[Question], rows: list[Row]) -> list[list[str]]:
    """The CSV's rows: header, the points possible, then one row per submission."""
    def number(x: float) -> str:
        return f"{x:g}"

    header = ["file"] + [q.name for q in questions] + ["total", "status"]
    possible = ["points-per-question"] + [number(q.points) for q in questions] + [number(sum(q.points for q in questions)), ""]
    return [header, possible] + [[safe_text(row.file)] + [number(row.scores[q.name]) for q in questions] +
                                 [number(row.total), safe_text("; ".join(row.status) or "graded", 1000)] for row in rows]


def safe_text(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` fit for a CSV cell and a terminal: no control characters, at most ``limit`` characters, and
    no leading ``= + - @`` that a spreadsheet would run as a formula (a file name is the student's choice)."""
    text = "".join(c if c.isprintable() else "?" for c in text)
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text
