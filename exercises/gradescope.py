"""A Gradescope autograder that grades with ``teach.py grade``'s sandbox and comparison, not in the student's kernel.

``teach.py release`` writes one zip per exercise with :func:`write_autograder_zip`. Gradescope unpacks it
into ``/autograder/source``, runs ``setup.sh`` once to build its image, then, for each submission, runs
``run_autograder``, which calls ``python exercises/gradescope.py run``: :func:`run_autograder` reads the
one notebook in ``/autograder/submission`` (safely: a regular file only, size-capped, never followed
through a link), grades it through ``feedback.graded_questions`` (the sandboxed run and the separate
comparison of ``teach.py grade``) and writes ``/autograder/results/results.json`` in Gradescope's
format (https://gradescope-autograders.readthedocs.io/en/latest/specs/): one test per question with
``score``, ``max_score``, ``visibility`` and a message, plus a total and one line about the run.

The zip is the teacher's: it holds the master notebook with the solutions (the autograder computes the
expected answers from it), the typical mistakes and, with per-run grading inputs, the grading key.
``GPTLORA_AUTOGRADER_ROOT`` replaces ``/autograder`` (the tests run the autograder in a temporary folder).
"""

from __future__ import annotations

import json
import os
import sys
import time
import zipfile
from pathlib import Path

EXERCISES_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(EXERCISES_DIR))  # its sibling modules: feedback, scoring, sandbox, grading_spec

from gptlora.infra.atomic import replace_atomically, write_json  # noqa: E402

ROOT_VARIABLE = "GPTLORA_AUTOGRADER_ROOT"
VISIBILITIES = ("hidden", "after_due_date", "after_published", "visible")  # Gradescope's values
SETTINGS_FILE = "autograder-settings.json"
KEY_IN_ZIP = "grading-key"  # the teacher's key; the zip is the teacher's, never handed to students
DEADLINE_S = 540  # seconds: under Gradescope's default timeout of 10 minutes (its maximum is 40)
# Of the deadline, what drawing the inputs, computing the expected answers and diagnosing typical mistakes may
# take; the sandboxed runs get the rest (all of a submission's runs take at most DEADLINE_RUNS x their timeout).
ANSWERS_MARGIN_S = 60
GRADER_DATA = ("typical_mistakes.yaml",)  # besides every exercises/*.py (the autograder runs teach.py grade's code)
REPO_FILES = ("pyproject.toml", "README.md")  # what `pip install` of the package needs besides gptlora/

SETUP_SH = """#!/usr/bin/env bash
# Gradescope runs this once, as root, to build the autograder's image (Ubuntu). It installs bubblewrap (the
# sandbox), libseccomp (its system-call filter), Python, the CPU build of torch and this copy of gptlora.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq python3 python3-venv python3-pip bubblewrap libseccomp2 util-linux >/dev/null
python3 -m venv /autograder/venv
/autograder/venv/bin/pip install --quiet --upgrade pip
# The CPU build of torch: PyPI's default Linux wheel carries CUDA libraries of several GB that grading never uses.
/autograder/venv/bin/pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu
/autograder/venv/bin/pip install --quiet /autograder/source pyyaml pyseccomp
# The GPT-2 tokenizer files, unless the zip brought them: some expected answers need them, and grading runs offline.
TIKTOKEN_CACHE_DIR=/autograder/source/tiktoken-cache /autograder/venv/bin/python -c \\
    "import tiktoken; tiktoken.get_encoding('gpt2')"
"""

RUN_AUTOGRADER = """#!/usr/bin/env bash
# Gradescope runs this for each submission, as root. It grades the notebook in submission/ with teach.py grade's
# sandbox and comparison and writes results/results.json. GPTLORA_AUTOGRADER_ROOT replaces /autograder (tests).
root="${GPTLORA_AUTOGRADER_ROOT:-/autograder}"
python="${GPTLORA_AUTOGRADER_PYTHON:-/autograder/venv/bin/python}"
export PYTHONPATH="$root/source" TIKTOKEN_CACHE_DIR="$root/source/tiktoken-cache" GPTLORA_OFFLINE=1
mkdir -p "$root/results"
rm -f "$root/results/results.json"  # only what this run writes counts
# Stop the grader before Gradescope's own timeout does: Gradescope then shows no results at all.
deadline=$(sed -n 's/^ *"deadline_s": *\\([0-9.]*\\).*/\\1/p' "$root/source/autograder-settings.json" 2>/dev/null)
deadline="${deadline:-540}"
ended=0
timeout --kill-after=10 "$deadline" "$python" "$root/source/exercises/gradescope.py" run "$root" || ended=$?
if [ ! -s "$root/results/results.json" ]; then  # still one clear line, with 0 points
    case "$ended" in  # timeout(1): 124 past the deadline; 137 killed (SIGKILL: the kernel's OOM killer, or us)
        124) why="grading ran past the $deadline s the teacher allowed (a cell or a function that never ends?)" ;;
        137) why="the grader was killed: out of the container's memory (raise it in Gradescope's settings)" ;;
        *) why="the autograder could not start or stopped early (exit status $ended)" ;;
    esac
    printf '{"score": 0, "stdout_visibility": "hidden", "output": "not graded: %s; tell your teacher"}\\n' "$why" \\
        > "$root/results/results.json"
fi
"""


def grading_key_files(key_file: Path | None = None) -> dict[str, Path]:
    """``{name in the zip: file}`` of the teacher's grading key (``key_file``, default
    ``secret_inputs.DEFAULT_KEY_FILE``, made there on first use). It travels inside the autograder zip, which is
    the teacher's, never the students'; ``run_autograder`` moves it out of the source folder before grading
    (:func:`autograder_key`)."""
    from secret_inputs import DEFAULT_KEY_FILE, grading_key

    path = (key_file or DEFAULT_KEY_FILE).expanduser().absolute()
    grading_key(path)  # made, or checked (mode 600, 64 hex characters), before it is packed
    return {KEY_IN_ZIP: path}


def autograder_key(root: Path) -> bytes:
    """The grading key of the autograder under ``root``: ``root/grading-key``, moved there (mode 600) from the
    zip's copy in ``root/source`` on first use, since the grader refuses a key inside its own source tree. The
    sandbox's user cannot read either (root's, mode 600), and neither is bound into the sandbox."""
    from secret_inputs import grading_key

    key_path, packed = root / KEY_IN_ZIP, root / "source" / KEY_IN_ZIP
    if packed.is_file() and not packed.is_symlink() and not key_path.exists():
        with replace_atomically(key_path) as temporary:
            temporary.write_bytes(packed.read_bytes())
            os.chmod(temporary, 0o600)
    if key_path.is_file():
        packed.unlink(missing_ok=True)  # moved, not copied: no key left in the source tree
    return grading_key(key_path)


def check_settings(visibility: str, deadline_s: float) -> None:
    """``ValueError`` (one line) for a visibility Gradescope does not know or a deadline that is not positive."""
    if visibility not in VISIBILITIES:
        raise ValueError(f"visibility {visibility!r} is not one of Gradescope's: {', '.join(VISIBILITIES)}")
    if not deadline_s > 0:
        raise ValueError(f"the Gradescope deadline must be a positive number of seconds, not {deadline_s!r}")


def write_autograder_zip(master: Path, out_zip: Path, visibility: str = "after_published", unsafe: bool = False,
                         timeout_s: float | None = None, memory_mib: int | None = None,
                         deadline_s: float = DEADLINE_S, key_file: Path | None = None) -> Path:
    """Gradescope's autograder zip for the exercise of ``master`` (written atomically); returns ``out_zip``.

    ``visibility``: when students see the per-question results (one of :data:`VISIBILITIES`).
    ``unsafe``: grade without bubblewrap where it cannot run (the container is then the only isolation).
    ``deadline_s``: ``run_autograder`` stops grading after this long and gives 0 with one line; keep it
    under the assignment's Gradescope timeout, which otherwise ends the run with no results to show.
    ``key_file``: the teacher's grading key the inputs are drawn from (:func:`grading_key_files`).
    """
    import gptlora

    from sandbox import Limits

    check_settings(visibility, deadline_s)
    settings = {"exercise": master.stem, "visibility": visibility, "unsafe": unsafe, "deadline_s": deadline_s,
                "timeout_s": timeout_s or Limits.timeout_s, "memory_mib": memory_mib or Limits.memory_mib}
    package, repo = Path(gptlora.__file__).resolve().parent, Path(gptlora.__file__).resolve().parent.parent
    cache = os.environ.get("TIKTOKEN_CACHE_DIR")
    with replace_atomically(out_zip) as tmp_zip:
        with zipfile.ZipFile(tmp_zip, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, text in (("setup.sh", SETUP_SH), ("run_autograder", RUN_AUTOGRADER)):
                info = zipfile.ZipInfo(name)
                info.external_attr = 0o100755 << 16  # executable: Gradescope runs both directly
                archive.writestr(info, text)
            archive.writestr(SETTINGS_FILE, json.dumps(settings, indent=1))
            archive.write(master, f"exercises/{master.name}")
            # every module of exercises/, not a list: a module that one of them imports later travels too
            for path in sorted(EXERCISES_DIR.glob("*.py")) + [EXERCISES_DIR / name for name in GRADER_DATA]:
                archive.write(path, f"exercises/{path.name}")
            for name in REPO_FILES:
                if (repo / name).is_file():
                    archive.write(repo / name, name)
            for path in sorted(package.rglob("*.py")):
                archive.write(path, f"gptlora/{path.relative_to(package)}")
            if cache and Path(cache).is_dir():
                for path in sorted(Path(cache).iterdir()):
                    if path.is_file() and not path.is_symlink():
                        archive.write(path, f"tiktoken-cache/{path.name}")
            for name, path in grading_key_files(key_file).items():
                archive.write(path, name)
    return out_zip


def submitted_notebook(folder: Path):
    """The one ``*.ipynb`` of ``folder`` (bytes, or a ``scoring.Unreadable`` for a link or a folder) and its
    name; ``ValueError`` (one line, for the student) when there is none or more than one."""
    from teach import submissions_in

    names = sorted(path.name for path in folder.glob("*.ipynb")) if folder.is_dir() else []
    if not names:
        found = sorted(path.name for path in folder.iterdir())[:5] if folder.is_dir() else []
        raise ValueError(f"no notebook (.ipynb) found in your submission{f' (found: {found})' if found else ''}; "
                         f"upload your exercise notebook, the .ipynb file itself")
    if len(names) > 1:
        raise ValueError(f"found {len(names)} notebooks ({', '.join(names[:5])}); upload only the one of this "
                         f"exercise")
    return names[0], submissions_in(folder)[names[0]]


def results_json(settings: dict, results: list, status: list[str], header: str, seconds: float) -> dict:
    """Gradescope's results object: one test per question, the total, and one paragraph about the run."""
    from scoring import safe_text

    visibility = settings["visibility"]
    tests = [{"name": result.name, "number": str(index), "score": result.points, "max_score": result.max_points,
              "visibility": visibility, "output": result.message} for index, result in enumerate(results, start=1)]
    lines = [header] + [safe_text(line, 1000) for line in status]
    return {"score": sum(result.points for result in results), "execution_time": round(seconds),
            "visibility": visibility, "stdout_visibility": "hidden", "output": "\n".join(lines), "tests": tests}


def not_graded(settings: dict, reason: str) -> dict:
    """Results for a submission that could not be graded: 0 of every question, and why, in one line."""
    from feedback import QuestionResult
    from scoring import master_questions, safe_text

    master = EXERCISES_DIR / f"{settings['exercise']}.ipynb"
    questions = master_questions(master) if master.is_file() else []
    results = [QuestionResult(q.name, 0.0, q.points, "not graded (see above)") for q in questions]
    return results_json(settings, results, [], f"not graded: {safe_text(reason, 1000)}", 0)


def bubblewrap_runs(limits, fallback_allowed: bool) -> bool:
    """Whether to grade under bubblewrap. Where it is missing, or (checked only when ``fallback_allowed``,
    the teacher's ``--gradescope-unsafe``) cannot run an empty notebook, the answer is no if the teacher
    allowed grading without it; else ``ValueError`` (the sandbox's own check says why, later, otherwise)."""
    from sandbox import bwrap_path
    from scoring import check_sandbox

    if bwrap_path() is not None:
        if not fallback_allowed:
            return True  # graded_questions checks that an empty notebook runs, and refuses in one line if not
        try:
            check_sandbox(limits, unsafe=False)
            return True
        except ValueError:
            return False
    if fallback_allowed:
        return False
    raise ValueError("bubblewrap (bwrap) is not installed in this container and the teacher did not allow grading "
                     "without it; tell your teacher")


def run_autograder(root: Path) -> dict:
    """Grade the submission under ``root`` (``/autograder``) and write ``root/results/results.json``;
    returns what was written. Never raises for a bad submission or an unusable sandbox: that is said in
    the results' output, with 0 points."""
    from feedback import graded_questions
    from sandbox import DEADLINE_RUNS, Limits, describe_isolation
    from scoring import safe_text

    settings = json.loads((root / "source" / SETTINGS_FILE).read_text())
    # all runs of a hanging submission must end before the zip's deadline, so that its definitions are graded
    # rather than the whole grader stopped: the per-run timeout shrinks where the teacher's would not fit
    fits = max((float(settings["deadline_s"]) - ANSWERS_MARGIN_S) / DEADLINE_RUNS, 1.0)
    limits = Limits(timeout_s=min(float(settings["timeout_s"]), fits), memory_mib=int(settings["memory_mib"]))
    start = time.perf_counter()
    try:
        unsafe = not bubblewrap_runs(limits, fallback_allowed=bool(settings["unsafe"]))
        name, notebook = submitted_notebook(root / "submission")
        name = safe_text(name)  # the student's choice: no line breaks or control characters in the output
        master = EXERCISES_DIR / f"{settings['exercise']}.ipynb"
        results, status = graded_questions(notebook, settings["exercise"], master, limits, unsafe, name,
                                           key=autograder_key(root))
        invalid = [line for line in status if line.startswith("invalid notebook")]
        if invalid:  # nothing ran: the reason is the one line, first, not below the isolation's description
            raise ValueError(f"{name}: {invalid[0]}; upload your exercise notebook, the .ipynb file as Jupyter saved it")
        header = f"graded {name} in the grader's sandbox; {describe_isolation(unsafe, limits)}"
        written = results_json(settings, results, status, header, time.perf_counter() - start)
    except ValueError as error:
        written = not_graded(settings, str(error))
    except Exception as error:  # a fault of the grader, not of the submission: one line, no traceback
        written = not_graded(settings, f"grader error ({type(error).__name__}); tell your teacher")
    write_json(written, root / "results" / "results.json")  # atomically: a half-written file is never uploaded
    print(written["output"].splitlines()[0])  # for the teacher, in Gradescope's stdout of the run
    return written


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (1, 2) or argv[0] != "run":
        print("usage: gradescope.py run [ROOT]  (ROOT: default $GPTLORA_AUTOGRADER_ROOT or /autograder)",
              file=sys.stderr)
        return 2
    root = Path(argv[1] if len(argv) == 2 else os.environ.get(ROOT_VARIABLE, "/autograder"))
    run_autograder(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
