"""The untrusted side of grading: run one submitted notebook and write what its functions answer, as JSON.

    python -m gptlora.teaching.run_submission NOTEBOOK MODE RESULTS < tasks.json

Started by ``exercises/teach.py grade`` inside a sandbox, in a temporary folder holding only a copy of
the notebook. ``MODE`` is ``cells`` (run every code cell in order, as a kernel would; a cell that
raises is noted and the next one runs) or ``definitions`` (run only its imports and ``def``/``class``
statements: the grader's second try when running the cells killed or stalled the process).

``tasks.json`` (read from standard input, only once the cells have run) lists, per question, the
function to probe, the probe (from :mod:`grading_probes`) and the grader's inputs, drawn for this
grading run from the teacher's secret, each case with a random tag. ``RESULTS`` gets one JSON line
when the cells have run, then one line per question with the tagged observation of each input (or
the error it raised), then ``{"finished": true}``: the trusted side accepts exactly that sequence and
marks the row as tampered on any other line (one written by a cell, a thread or a child, before,
between or after). This process decides nothing: whatever it writes is compared, by a separate
process, with the observations of the teacher's reference on inputs it could not know in advance.
"""

from __future__ import annotations

import ast
import inspect
import json
import sys

from .grading_probes import PROBES, build, to_plain

IPYTHON_LINE_PREFIXES = ("%", "!")  # magics and shell lines: not Python, and nothing a grader needs


def code_cells(notebook: dict) -> list[str]:
    """The sources of the notebook's code cells (a source may be stored as one string or a list of lines)."""
    cells = []
    for cell in notebook.get("cells", []):
        if isinstance(cell, dict) and cell.get("cell_type") == "code":
            source = cell.get("source", "")
            source = "".join(source) if isinstance(source, list) else str(source)
            cells.append("\n".join(line for line in source.splitlines()
                                   if not line.lstrip().startswith(IPYTHON_LINE_PREFIXES)))
    return cells


def definitions_only(source: str) -> str:
    """The imports, functions, classes and literal constants (``PAD = 50256``, ``INTRO = "..."``) of
    ``source``: what defines the answers, without top-level calls."""
    kept = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    tree = ast.parse(source)
    tree.body = [node for node in tree.body if isinstance(node, kept) or literal_constant(node)]
    return ast.unparse(tree)


def literal_constant(node: ast.stmt) -> bool:
    """Whether ``node`` binds plain names to a literal (numbers, strings, tuples/lists of them): safe to run."""
    if not isinstance(node, ast.Assign) or not all(isinstance(target, ast.Name) for target in node.targets):
        return False
    try:
        ast.literal_eval(node.value)
    except (ValueError, TypeError, SyntaxError, RecursionError):
        return False
    return True


def run_cells(cells: list[str], mode: str, namespace: dict) -> list[str]:
    """Execute the cells in ``namespace``; the problems met, one short line per failed cell."""
    problems = []
    for index, source in enumerate(cells, start=1):
        try:
            code = definitions_only(source) if mode == "definitions" else source
            exec(compile(code, f"<cell {index}>", "exec"), namespace)
        except BaseException as error:  # SystemExit and KeyboardInterrupt too: a cell cannot stop the grading
            problems.append(f"cell {index} raised {type(error).__name__}")
    return problems


class TrustedProbes:
    """The probes and their helpers as they were before any cell ran.

    A cell may replace ``grading_probes.PROBES[...]``, a function of that module, or a probe's code: each
    case is observed through the functions kept here, anything changed is put back first, and the record
    of the question says what was found changed (the trusted side then marks the row as tampered)."""

    def __init__(self):
        from . import grading_probes

        self.module, self.probes = grading_probes, dict(PROBES)
        self.functions = {name: value for name, value in vars(grading_probes).items() if inspect.isfunction(value)}
        self.codes = {name: function.__code__ for name, function in self.functions.items()}

    def restore(self) -> list[str]:
        """Put back whatever was changed since; the names found changed."""
        changed = []
        for name, function in self.functions.items():
            if vars(self.module).get(name) is not function:
                setattr(self.module, name, function)
                changed.append(name)
            if function.__code__ is not self.codes[name]:
                function.__code__ = self.codes[name]
                changed.append(name)
        for name, probe in self.probes.items():
            if self.module.PROBES.get(name) is not probe:
                self.module.PROBES[name] = probe
                changed.append(f"PROBES[{name!r}]")
        return sorted(set(changed))


def observe(task: dict, namespace: dict, probes: TrustedProbes) -> dict:
    """One question's record: the observation of each input with its tag, or why there is none."""
    function = namespace.get(task["function"])
    if not callable(function):
        return {"question": task["question"], "missing": task["function"]}
    observations, changed = [], []
    for case in task["cases"]:
        changed += probes.restore()
        try:
            found = probes.probes[task["probe"]](function, *build(case.get("args", [])), **build(case.get("kwargs", {})))
            observations.append({"tag": case.get("tag"), "value": to_plain(found)})
        except BaseException as error:  # the student's code raised: no answer for this input
            observations.append({"tag": case.get("tag"), "error": f"{type(error).__name__}: {str(error)[:200]}"})
        changed += probes.restore()  # and after: what the function changed while it answered
    record = {"question": task["question"], "observations": observations}
    return {**record, "changed": sorted(set(changed))} if changed else record


def write_line(results, record: dict):
    """One record on a line of its own (a newline first: a cell may have left the file without one)."""
    results.write("\n" + json.dumps(record) + "\n")
    results.flush()


def respond(tasks: list[dict], namespace: dict, probes: TrustedProbes, results, header: dict) -> None:
    """The results, in the one order the trusted side accepts: ``header``, one record per task, ``finished``."""
    write_line(results, header)
    for task in tasks:
        write_line(results, observe(task, namespace, probes))
    write_line(results, {"finished": True})


def main(argv: list[str]) -> int:
    notebook_path, mode, results_path = argv
    probes, answer = TrustedProbes(), respond  # taken before any cell runs: what a cell rebinds is not used
    with open(notebook_path, encoding="utf-8") as file:
        cells = code_cells(json.load(file))
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    problems = run_cells(cells, mode, namespace)
    # Read only now. The list waits in the pipe from the start and the results descriptor is inherited, so
    # a cell could read or write them first; the grader's strict order (scoring.read_results) makes any
    # line other than the one expected here a tampered row, and a right line needs the right values.
    tasks = json.loads(sys.stdin.read())
    with open(results_path, "a", encoding="utf-8") as results:
        answer(tasks, namespace, probes, results, {"cells": mode, "problems": problems})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
