"""Build the exercise notebooks for students and for otter/Gradescope, and grade a folder of submissions.

    python exercises/teach.py release [--out dist] [--visibility after_published] [--gradescope-unsafe]
                                      [--gradescope-deadline 540] [--key-file PATH]
    python exercises/teach.py build [MASTER.ipynb ...] [--out dist]
    python exercises/teach.py grade SUBMISSIONS_DIR --exercise 01_gpt_model [--out scores.csv] [--timeout 180]
                                    [--memory 4096] [--jobs 2] [--unsafe] [--key-file PATH]
    python exercises/teach.py similarity SUBMISSIONS_DIR --exercise 01_gpt_model [--out similarity.html]

``release`` writes ``OUT/student/`` (one notebook per exercise, public checks only: no solutions, no
hidden checks, no grading inputs) and ``OUT/student.zip`` to hand out, and, apart from it,
``OUT/teacher/``, per exercise, two autograders for Gradescope: ``NN_name-gradescope.zip`` grades with this
grader's sandbox and comparison (``gradescope.py``), ``NN_name-otter-in-kernel.zip`` is otter's, whose
checks run in the student's kernel.

``build`` runs ``otter assign`` on each master notebook (default: every ``exercises/NN_*.ipynb``)
into ``OUT/<name>/``: ``student/<name>.ipynb``, ``autograder/<name>.ipynb`` (the solutions) and
``autograder.zip``.

``grade`` grades every ``*.ipynb`` in ``SUBMISSIONS_DIR`` against ``exercises/<exercise>.ipynb`` into one
CSV: one row per submission, its points per question, total and status (why it lost points it could
not be asked for: timeout, memory, crash, invalid notebook, missing function). Each submission runs in
a sandbox (bubblewrap) that only reports its functions' answers on the grader's inputs; a separate
process scores them. See exercises/GRADING.md for what this promises. Needs ``pip install -e ".[teach]"``.

``similarity`` ranks pairs of submissions, and each against the master's solutions, by the overlap of their
answer code (``similarity.py``: MOSS's winnowed fingerprints, starter code removed, nothing executed) into an
HTML page with the matched cells side by side: a lead for a person to check, not a verdict.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import stat
import sys
import tempfile
import zipfile
from pathlib import Path

from gptlora.infra.atomic import replace_atomically

EXERCISES_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(EXERCISES_DIR))  # its sibling modules: grading_spec, sandbox, scoring


def master_notebooks() -> list[Path]:
    """The exercise master notebooks, in chapter order."""
    return sorted(EXERCISES_DIR.glob("[0-9][0-9]_*.ipynb"))


def build(master: Path, out_dir: Path) -> Path:
    """``otter assign`` ``master`` into ``out_dir/<name>/``; returns that folder.

    The folder holds ``student/<name>.ipynb`` and ``autograder.zip`` (renamed from otter's
    time-stamped zip name, so that scripts can name it), plus ``autograder/<name>.ipynb``,
    the solution notebook. An earlier build in that folder is replaced.
    """
    from otter.assign import main as otter_assign

    target = out_dir / master.stem
    if target.exists():
        shutil.rmtree(target)
    otter_assign(str(master), str(target), no_pdfs=True, no_run_tests=True)
    zips = sorted((target / "autograder").glob("*.zip"))
    if len(zips) != 1:
        raise RuntimeError(f"otter assign wrote {len(zips)} autograder zip files in {target / 'autograder'}, expected 1")
    zips[0].replace(target / "autograder.zip")
    return target


def release(out_dir: Path, masters: list[Path] | None = None, visibility: str = "after_published",
            unsafe: bool = False, deadline_s: float | None = None, key_file: Path | None = None) -> Path:
    """The student release ``out_dir/student/`` (+ ``student.zip``) and, beside it, in ``out_dir/teacher/``,
    two Gradescope autograders per exercise: ``NN_name-gradescope.zip`` (this grader's sandbox and comparison,
    ``gradescope.py``; ``visibility``, ``unsafe`` and ``deadline_s`` are its settings, and it carries the grading
    key of ``key_file``: keep these zips to yourself) and
    ``NN_name-otter-in-kernel.zip`` (otter's, which checks in the student's kernel); returns ``out_dir``. The
    student folder holds only the student notebooks."""
    from gradescope import DEADLINE_S, check_settings, write_autograder_zip

    deadline_s = DEADLINE_S if deadline_s is None else deadline_s
    check_settings(visibility, deadline_s)  # before anything in out_dir is replaced
    student, teacher = out_dir / "student", out_dir / "teacher"
    for folder in (student, teacher):
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        for master in masters or master_notebooks():
            built = build(master, Path(tmp))
            shutil.copyfile(built / "student" / master.name, student / master.name)
            shutil.copyfile(built / "autograder.zip", teacher / f"{master.stem}-otter-in-kernel.zip")
            write_autograder_zip(master, teacher / f"{master.stem}-gradescope.zip", visibility, unsafe,
                                 deadline_s=deadline_s, key_file=key_file)
    with replace_atomically(out_dir / "student.zip") as tmp_zip:
        with zipfile.ZipFile(tmp_zip, "w", zipfile.ZIP_DEFLATED) as archive:
            for notebook in sorted(student.glob("*.ipynb")):
                archive.write(notebook, f"exercises/{notebook.name}")
    return out_dir


def submissions_in(folder: Path) -> dict:
    """Every ``*.ipynb`` entry of ``folder``, read once before any is graded (a submission can change no other):
    its bytes, or, for what is not a regular file (a symbolic link, even to the master notebook; a folder),
    an ``Unreadable`` that becomes a row of its own rather than being followed or skipped."""
    from scoring import MAX_NOTEBOOK_BYTES, Unreadable

    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder; expected a folder of submitted notebooks")
    paths = sorted(folder.glob("*.ipynb"))
    if not paths:
        raise ValueError(f"no submissions (*.ipynb) found in {folder}; expected one notebook per student")
    submissions = {}
    for path in paths:
        try:  # O_NOFOLLOW: a link swapped in after glob is refused too, not followed
            descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            submissions[path.name] = Unreadable("not a regular file")
            continue
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            os.close(descriptor)
            submissions[path.name] = Unreadable("not a regular file")
            continue
        with os.fdopen(descriptor, "rb") as file:
            submissions[path.name] = file.read(MAX_NOTEBOOK_BYTES + 1)
    return submissions


def master_of(exercise: str) -> Path:
    path = EXERCISES_DIR / f"{Path(exercise).stem}.ipynb"
    if not path.is_file():
        names = ", ".join(p.stem for p in master_notebooks())
        raise ValueError(f"exercise {exercise!r} not found; expected one of {names}")
    return path


def grade_folder(submissions_dir: Path, exercise: str, out_csv: Path, limits=None, unsafe: bool = False,
                 jobs: int = 2, key_file: Path | None = None) -> Path:
    """Grade every notebook of ``submissions_dir`` as answers to ``exercise`` into ``out_csv`` (written at the
    end, atomically), on inputs drawn from the key in ``key_file`` (made there on first use). Refuses to run
    without bubblewrap unless ``unsafe``."""
    from sandbox import Limits, bwrap_path, describe_isolation, isolation_problems
    from scoring import grade_submissions, safe_text, table
    from secret_inputs import DEFAULT_KEY_FILE, grading_key

    limits = limits or Limits()
    master = master_of(exercise)
    if not unsafe and bwrap_path() is None:
        raise ValueError("no isolation available: bubblewrap (bwrap) is not installed; install it "
                         "(apt-get install bubblewrap) or pass --unsafe to run submissions as you, unisolated")
    submissions = submissions_in(submissions_dir)
    key = grading_key(key_file or DEFAULT_KEY_FILE)
    print(f"teach.py: {describe_isolation(unsafe, limits)}", file=sys.stderr)
    isolation_problems.clear()  # this grading's only
    questions, rows = grade_submissions(submissions, master.stem, master, limits, unsafe, jobs, key=key)
    if isolation_problems:  # first, before the rows: a teardown that did not come clean is the teacher's concern
        print(f"teach.py: WARNING: the sandbox's teardown found {len(isolation_problems)} problems (see the rows' "
              f"status): {safe_text('; '.join(sorted(set(isolation_problems))), 1000)}", file=sys.stderr)
    for row in rows:
        if row.status:
            print(f"teach.py: {safe_text(row.file)}: {safe_text('; '.join(row.status), 1000)}", file=sys.stderr)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with replace_atomically(out_csv) as tmp:
        with open(tmp, "w", newline="") as file:
            csv.writer(file, lineterminator="\n").writerows(table(questions, rows))
    return out_csv


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a number above 0, found {text}")
        return value
    return parse


def main(argv: list[str] | None = None) -> int:
    from sandbox import Limits

    parser = argparse.ArgumentParser(prog="teach.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    release_parser = commands.add_parser("release", help="the student release and, apart, otter's autograder zips")
    release_parser.add_argument("--out", type=Path, default=Path("dist"), help="output folder (default: dist)")
    release_parser.add_argument("--visibility", default="after_published",
                                choices=("hidden", "after_due_date", "after_published", "visible"),
                                help="when students see the Gradescope autograder's results (default: after_published)")
    release_parser.add_argument("--gradescope-unsafe", action="store_true",
                                help="let the Gradescope autograder grade without bubblewrap where it cannot run "
                                     "(the container is then the only isolation); default: it refuses")
    release_parser.add_argument("--gradescope-deadline", type=float, default=None, metavar="SECONDS",
                                help="the Gradescope autograder stops grading after this long and gives 0 with one "
                                     "line (default 540: under Gradescope's default timeout of 10 minutes)")
    release_parser.add_argument("--key-file", type=Path, default=None,
                                help="the grading key the Gradescope zips carry (default: the one `grade` uses, "
                                     "~/.config/gptlora/grading-key, made there on first use)")
    build_parser = commands.add_parser("build", help="otter assign the master notebooks into student and autograder versions")
    build_parser.add_argument("masters", nargs="*", type=Path, help="master notebooks (default: every exercises/NN_*.ipynb)")
    build_parser.add_argument("--out", type=Path, default=Path("dist"), help="output folder (default: dist)")
    grade_parser = commands.add_parser("grade", help="grade a folder of submitted notebooks into one CSV")
    grade_parser.add_argument("submissions", type=Path, help="folder of submitted .ipynb files")
    grade_parser.add_argument("--exercise", required=True, help="the exercise they answer, e.g. 01_gpt_model")
    grade_parser.add_argument("--out", type=Path, default=Path("scores.csv"), help="CSV to write (default: scores.csv)")
    grade_parser.add_argument("--timeout", type=_positive(float), default=Limits.timeout_s,
                              help=f"seconds one run of a submission may take (default {Limits.timeout_s:g})")
    grade_parser.add_argument("--memory", type=_positive(int), default=Limits.memory_mib,
                              help=f"MiB of address space per submission (default {Limits.memory_mib})")
    grade_parser.add_argument("--jobs", type=_positive(int), default=None,
                              help="submissions graded at once (default: up to 4 with a control group per "
                                   "submission, else 1: without one a CPU hog can slow its neighbours)")
    grade_parser.add_argument("--key-file", type=Path, default=None,
                              help="the secret the grading inputs are drawn from, outside the repository; made "
                                   "there (mode 600) on first use (default: ~/.config/gptlora/grading-key)")
    grade_parser.add_argument("--unsafe", action="store_true",
                              help="grade without bubblewrap: submissions can then read and change your files")
    similar_parser = commands.add_parser("similarity", help="rank pairs of submissions by overlap of their answer "
                                                            "code: a lead for a person to check, not a verdict")
    similar_parser.add_argument("submissions", type=Path, help="folder of submitted .ipynb files")
    similar_parser.add_argument("--exercise", required=True, help="the exercise they answer, e.g. 01_gpt_model")
    similar_parser.add_argument("--out", type=Path, default=Path("similarity.html"),
                                help="HTML report to write (default: similarity.html)")
    args = parser.parse_args(argv)
    try:
        if args.command == "release":
            written = release(args.out, visibility=args.visibility, unsafe=args.gradescope_unsafe,
                              deadline_s=args.gradescope_deadline, key_file=args.key_file)
            print(f"wrote {written}: student/ "
                  f"and student.zip to hand out, teacher/ for Gradescope")
        elif args.command == "similarity":
            from similarity import report_folder

            print(report_folder(args.submissions, master_of(args.exercise), args.out))
        elif args.command == "build":
            for master in args.masters or master_notebooks():
                if not master.is_file():
                    raise ValueError(f"master notebook {master} not found; expected a path like exercises/01_gpt_model.ipynb")
                print(f"built {build(master, args.out)}")
        else:
            import cgroup_limits

            limits = Limits(timeout_s=args.timeout, memory_mib=args.memory)
            jobs = args.jobs or (min(4, os.cpu_count() or 1) if cgroup_limits.available() else 1)
            print(f"wrote {grade_folder(args.submissions, args.exercise, args.out, limits, args.unsafe, jobs, args.key_file)}")
    except (ValueError, RuntimeError) as error:
        print(f"teach.py: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from sandbox import stop_all

        stop_all()  # a run in this thread (the first, empty one) has already been killed by its own clean-up
        print("teach.py: interrupted: the running submissions were stopped; no CSV was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
