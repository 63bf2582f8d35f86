"""One submission graded as ``teach.py grade`` grades it, with a message per question for the student.

:func:`graded_questions` is the one place where the Gradescope autograder (``gradescope.py``) calls the
grader (``scoring.py`` and its sandbox): the same expected answers, the same sandboxed run and the same
comparison, so a change there changes what Gradescope reports too. What it adds is the message: for a
wrong answer, the grader's input that was answered wrongly, the value expected, the value found and,
where the found value is what one of the exercise's typical mistakes (``typical_mistakes.yaml``) gives
on that input, the mistake's name. Messages are built here, in the trusted process, from plain data: a
submission cannot choose them beyond the values its functions return (shown shortened, printable only).
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from gptlora.teaching.exercise_checks import ExerciseCheckFailed, expect
from gptlora.teaching.grading_probes import from_plain

import scoring
from grading_spec import SPEC
from secret_inputs import Secret

EXERCISES_DIR = Path(__file__).resolve().parent
MISTAKES_FILE = EXERCISES_DIR / "typical_mistakes.yaml"
MESSAGE_LIMIT = 1000  # characters of one question's message


@dataclass(frozen=True)
class QuestionResult:
    """One question of one submission: its points out of ``max_points`` and what to tell the student."""

    name: str
    points: float
    max_points: float
    message: str


def graded_questions(notebook, exercise: str, master: Path, limits, unsafe: bool,
                     file: str = "submission.ipynb", *, key: bytes) -> tuple[list[QuestionResult], list[str]]:
    """Grade one submission (its bytes, or a ``scoring.Unreadable``) on inputs drawn from the teacher's
    ``key`` for this run: per question its result, and the row's status lines (``timeout ...``,
    ``invalid notebook: ...``; empty when it was graded normally).

    Raises ``ValueError`` (one line) when nothing can be graded here: no expected answers, or a sandbox
    in which an empty notebook does not run.
    """
    questions = scoring.master_questions(master)
    secret = Secret.for_this_run(key)
    expected = scoring.expected_answers(exercise, master, secret)
    row = scoring.grade_one(file, notebook, exercise, questions, expected, limits, unsafe)
    if row.total == 0 and not any(line.startswith("invalid notebook") for line in row.status):
        scoring.check_sandbox(limits, unsafe)  # zero points: not because an empty notebook cannot run here
    mistakes = TypicalMistakes(exercise, master, secret, expected)
    results = []
    for question in questions:
        answered_right = row.scores[question.name] >= question.points
        mistaken = {} if answered_right else mistakes.answers_for(question.name)  # each costs a run of the master
        message = describe(row.records.get(question.name), expected[question.name].answers, SPEC[exercise][question.name],
                           row.scores[question.name], question.points, mistaken)
        results.append(QuestionResult(question.name, row.scores[question.name], question.points,
                                      scoring.safe_text(message, MESSAGE_LIMIT)))
    return results, row.status


def describe(record: dict | None, expected: list, spec, points: float, max_points: float,
             mistaken: dict[str, list]) -> str:
    """What to tell the student about one question: right, or the first input answered wrongly and how.

    ``mistaken`` maps a typical mistake's name to what that mistake answers on the same inputs."""
    cases = len(expected)
    if record is None:
        return "no answer: the run stopped before this question was asked (see the status above)"
    if "missing" in record:
        return f"missing function {spec.function}: define it (with this name) in your notebook"
    observations = record.get("observations")
    if not isinstance(observations, list) or len(observations) != cases:
        return "no usable answer was recorded for this question"
    if points >= max_points:
        return f"right on all {cases} of the grader's inputs"
    wrong = []
    for index, (observation, wanted) in enumerate(zip(observations, expected)):
        what = f"{spec.function} on the grader's input {index + 1} of {cases}"
        if not isinstance(observation, dict) or "value" not in observation:
            error = observation.get("error") if isinstance(observation, dict) else None
            wrong.append(f"{what} raised {error}" if isinstance(error, str) else f"{what}: no answer")
            continue
        try:
            found = from_plain(observation["value"])
            by_mistake = {name: from_plain(answers[index]) for name, answers in mistaken.items()}
            expect(what, found, from_plain(wanted), mistakes=by_mistake, atol=spec.atol, rtol=spec.rtol)
        except ExerciseCheckFailed as failure:
            unwritten = observation["value"] is None  # the untouched `...` body returns None
            wrong.append(str(failure) + (" Write the function's body and end it with `return`." if unwritten else ""))
        except Exception as error:  # a malformed answer that cannot even be compared
            wrong.append(f"{what}: the answer cannot be compared ({type(error).__name__})")
    if not wrong:
        return f"right on all {cases} of the grader's inputs"
    right = cases - len(wrong)
    return f"{right} of {cases} inputs right. " + wrong[0] + (f" ({len(wrong) - 1} more wrong)" if len(wrong) > 1 else "")


def mistake_name(entry: dict) -> str | None:
    """A typical mistake's name for students: its ``mistake`` field, else what its feedback calls the
    likely mistake; ``None`` for an entry that names none (a hard-coded answer: nothing to diagnose)."""
    if isinstance(entry.get("mistake"), str):
        return entry["mistake"]
    named = re.search(r"Likely mistake: (.+?)\.?$", str(entry.get("feedback", "")))
    return named.group(1) if named else None


class TypicalMistakes:
    """What each typical mistake of ``typical_mistakes.yaml`` answers on the grader's inputs, computed on
    demand (only for a question answered wrongly) by grading the master with that mistake put in."""

    def __init__(self, exercise: str, master: Path, secret: Secret, expected: dict):
        self.exercise, self.master, self._answers = exercise, master, {}
        self.secret, self.expected = secret, expected  # the same draws as the submission was graded on
        table = yaml.safe_load(MISTAKES_FILE.read_text()) if MISTAKES_FILE.is_file() else {}
        self.entries = [entry for entry in (table or {}).get(exercise, []) if mistake_name(entry)]

    def answers_for(self, question: str) -> dict[str, list]:
        """``{mistake name: its observations of each grading input}`` for ``question``'s typical mistakes."""
        found = {}
        for entry in self.entries:
            if entry.get("question") != question:
                continue
            key = (entry["replace"], entry["with"])
            if key not in self._answers:
                self._answers[key] = self._compute(entry)
            if self._answers[key] is not None:
                drawn = self._answers[key][question]
                if drawn.cases == self.expected[question].cases:  # a mistake that drew again answers other inputs
                    found[mistake_name(entry)] = drawn.answers
        return found

    def _compute(self, entry: dict) -> dict | None:
        """The master's expected answers with ``entry``'s mistake put into its solution (None if it cannot be)."""
        text = self.master.read_text()
        replace, replacement = (json.dumps(entry[key], ensure_ascii=False)[1:-1] for key in ("replace", "with"))
        if text.count(replace) != 1:
            return None  # the table and the master disagree: no diagnosis rather than a wrong one
        with tempfile.TemporaryDirectory() as folder:
            mistaken = Path(folder) / self.master.name
            mistaken.write_text(text.replace(replace, replacement))
            try:
                return scoring.expected_answers(self.exercise, mistaken, self.secret)
            except ValueError:
                return None
