"""The trusted side of grading: expected answers from the master notebook, scores from plain JSON.

This process imports gptlora and the teacher's master notebook, never a submission: each submission
runs in its own sandboxed process (sandbox.py) that only reports, as JSON, what its functions answered
on the grader's inputs (grading_spec.py). Here those answers are rebuilt as numbers and tensors and
compared with what the master's solutions answer through the same probes. Question names and points
come from the master notebook alone; whatever else a submission writes is ignored.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from gptlora.teaching.exercise_checks import expect
from gptlora.teaching.grading_probes import PROBES, build, from_plain, to_plain
from gptlora.teaching.run_submission import code_cells, definitions_only

from grading_spec import SPEC
from sandbox import Limits, run_submission, stop_all

MAX_NOTEBOOK_BYTES = 20 * 1024 * 1024
MAX_TEXT = 200  # characters of any one CSV/terminal field that a file name can put there
PARSE_ERRORS = (ValueError, RecursionError)  # what json.loads raises on a broken or a deeply nested line


@dataclass(frozen=True)
class Unreadable:
    """A submitted entry that is no notebook file (a link, a folder): why, in the grader's own words."""

    reason: str


@dataclass(frozen=True)
class Question:
    name: str
    points: float
    all_or_nothing: bool


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


def tasks_for(exercise: str) -> list[dict]:
    """What the sandboxed process is asked: per question, the function, the probe and the inputs."""
    return [{"question": name, "function": spec.function, "probe": spec.probe, "cases": list(spec.cases)}
            for name, spec in SPEC[exercise].items()]


def expected_answers(exercise: str, master: Path) -> dict[str, list]:
    """The solution's observation of every input, as JSON-able data (as a submission's would be)."""
    if exercise not in SPEC:
        raise ValueError(f"no grading spec for {exercise}; add its questions to exercises/grading_spec.py")
    names = [q.name for q in master_questions(master)]
    if sorted(names) != sorted(SPEC[exercise]):
        raise ValueError(f"exercises/grading_spec.py lists questions {sorted(SPEC[exercise])} for {exercise}, "
                         f"its master notebook {names}; list each question of the notebook once")
    solutions, expected = solution_namespace(master), {}
    for name, spec in SPEC[exercise].items():
        try:
            expected[name] = [to_plain(PROBES[spec.probe](solutions[spec.function], *build(case["args"]),
                                                          **build(case.get("kwargs", {}))))
                              for case in spec.cases]
        except Exception as error:
            raise ValueError(f"the expected answers of {exercise} {name} cannot be computed here "
                             f"({type(error).__name__}: {error}); provide what it names (the GPT-2 tokenizer "
                             f"files: TIKTOKEN_CACHE_DIR) before grading, no submission was scored") from None
    return expected


def judge(record: dict | None, expected: list, spec, question: Question) -> tuple[float, str]:
    """Points for one question's record from the sandbox, and what was wrong (empty when right)."""
    if record is None:
        return 0.0, "no answer"
    if "missing" in record:  # the function's name from the grader's spec: nothing the sandbox wrote is echoed
        return 0.0, f"missing function {spec.function}"
    observations = record.get("observations")
    if not isinstance(observations, list) or len(observations) != len(expected):
        return 0.0, "malformed answer"
    right = 0
    for observation, wanted in zip(observations, expected):
        try:
            found = from_plain(observation["value"])
            expect(spec.function, found, from_plain(wanted), atol=spec.atol, rtol=spec.rtol)
            right += 1
        except Exception:  # AssertionError for a wrong answer; anything a malformed one raises: no point
            continue
    if right == len(expected):
        return question.points, ""
    share = 0.0 if question.all_or_nothing else right / len(expected)
    return question.points * share, "wrong answer"


def _records(lines: list[str], questions: set[str]) -> tuple[dict, bool, bool]:
    """The last record of each question in ``lines``, whether the cells ran and whether the run finished."""
    records, cells_ran, finished = {}, False, False
    for line in lines:
        try:
            record = json.loads(line)
        except PARSE_ERRORS:
            continue
        if not isinstance(record, dict):
            continue
        cells_ran |= "cells" in record
        finished |= record.get("finished") is True
        if isinstance(record.get("question"), str) and record["question"] in questions:
            records[record["question"]] = record
    return records, cells_ran, finished


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
    remaining, mode, records = tasks_for(exercise), "cells", {}
    stopped_after_cells = ""  # why a run in cells mode stopped while its questions were asked
    for _ in range(len(questions) + 3):
        run = run_submission(notebook, remaining, mode, limits, unsafe)
        found, cells_ran, finished = _records(run.lines, {t["question"] for t in remaining})
        records.update(found)
        if not cells_ran:
            row.status.append(f"{_ending(run, limits)} while running its {mode}" + ("; its definitions were graded"
                                                                                    if mode == "cells" else ""))
            if mode == "cells":
                mode = "definitions"
                continue
            break
        remaining = [t for t in remaining if t["question"] not in found]
        if finished or not remaining:
            if stopped_after_cells:
                row.status.append(f"{stopped_after_cells} after its cells had run; its definitions were graded")
            break
        if mode == "cells":  # its cells may have used the time (or broken the state): ask again without them
            stopped_after_cells, mode = _ending(run, limits), "definitions"
            continue
        stopped_after_cells = ""  # it stopped without its cells too: the question asked first is to blame
        stuck = remaining.pop(0)  # the question whose function stopped the process
        row.status.append(f"{_ending(run, limits)} in {stuck['question']}")
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
    if not _records(run.lines, set())[2]:
        said = (run.output_tail.strip().splitlines() or ["nothing"])[-1][:200]
        raise ValueError(f"an empty notebook does not run in the sandbox ({_ending(run, limits)}; it said: {said}); "
                         f"raise --memory or --timeout, or check the isolation; no submission was scored")


def grade_submissions(submissions: dict[str, bytes], exercise: str, master: Path, limits: Limits, unsafe: bool,
                      jobs: int = 2) -> tuple[list[Question], list[Row]]:
    """Every submission's row (sorted by file name); the expected answers are computed first, once."""
    questions, expected = master_questions(master), expected_answers(exercise, master)
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
