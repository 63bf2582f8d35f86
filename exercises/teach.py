"""Build the exercise notebooks into student and autograder versions, and grade a folder of submissions.

    python exercises/teach.py build [MASTER.ipynb ...] [--out dist]
    python exercises/teach.py grade SUBMISSIONS_DIR --autograder dist/01_gpt_model/autograder.zip --out scores.csv

``build`` runs ``otter assign`` on each master notebook (default: every ``exercises/NN_*.ipynb``)
into ``OUT/<name>/``: ``student/<name>.ipynb`` to hand out (public checks only) and
``autograder.zip`` (every check, hidden ones included) to grade with.

``grade`` grades every ``*.ipynb`` in ``SUBMISSIONS_DIR`` into one CSV, one row per
submission and one column per question (otter's ``final_grades.csv`` layout, with a first
row of the points possible, and a ``grading_status`` column: a submission that cannot be graded
scores 0 with the reason there, and the others are still graded). With Docker available it runs ``otter grade`` (one container per
submission, the environment of the autograder zip); otherwise, or with ``--no-docker``, it runs
``otter run`` on each submission in this Python environment, which must have ``gptlora``
installed. Needs ``pip install -e ".[teach]"``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from gptlora.infra.atomic import replace_atomically

EXERCISES_DIR = Path(__file__).resolve().parent


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


def docker_available() -> bool:
    """Whether a Docker daemon answers (``otter grade`` needs one)."""
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


def submissions_in(folder: Path) -> list[Path]:
    paths = sorted(folder.glob("*.ipynb"))
    if not paths:
        raise ValueError(f"no submissions (*.ipynb) found in {folder}; expected one notebook per student")
    return paths


def grade_without_docker(submissions: list[Path], autograder: Path):
    """``otter run`` each submission here; otter's score table (a DataFrame) of all of them.

    A submission that cannot be graded (not a notebook, a kernel that dies, ...) gets a row of
    zeros whose ``grading_status`` says why, and grading goes on with the next one: one broken
    file must not cost the whole class its table.
    """
    from otter.api import grade_submission
    from otter.grade.utils import merge_scores_to_df
    from otter.test_files import GradingResults

    results = []
    for path in submissions:
        print(f"grading {path.name}", file=sys.stderr)
        try:
            result = grade_submission(str(path), str(autograder), quiet=True)
        except Exception as error:  # whatever the submission holds, the other students are still graded
            result = GradingResults.without_results(RuntimeError(f"{type(error).__name__}: {error}"))
        if result.catastrophic_error is not None:
            print(f"teach.py: could not grade {path}: {result.catastrophic_error}; it scores 0 "
                  f"(the reason is in the grading_status column)", file=sys.stderr)
        result.file = path.name  # as otter grade names each row
        results.append(result)
    return merge_scores_to_df(results)


def grade_with_docker(submissions_dir: Path, autograder: Path):
    """``otter grade`` the folder in Docker containers; its score table (a DataFrame)."""
    import pandas as pd
    from otter.grade import main as otter_grade

    with tempfile.TemporaryDirectory() as tmp:
        otter_grade(name=autograder.parent.name or "exercises", paths=[str(submissions_dir)], output_dir=tmp,
                    autograder=str(autograder), ext="ipynb")
        return pd.read_csv(Path(tmp) / "final_grades.csv")


def grade_folder(submissions_dir: Path, autograder: Path, out_csv: Path, docker: bool | None = None) -> Path:
    """Grade every notebook of ``submissions_dir`` with ``autograder`` into ``out_csv``.

    ``docker=None`` uses Docker when a daemon answers; True requires it; False never uses it.
    The CSV is written to a temporary file and renamed, so a failed run leaves no partial table.
    """
    if not autograder.is_file():
        raise ValueError(f"autograder zip {autograder} not found; build it with `python exercises/teach.py build`")
    if not submissions_dir.is_dir():
        raise ValueError(f"{submissions_dir} is not a folder; expected a folder of submitted notebooks")
    submissions = submissions_in(submissions_dir)
    use_docker = docker_available() if docker is None else docker
    if use_docker and not docker_available():
        raise ValueError("--docker was asked for, but no Docker daemon answers `docker info`; "
                         "start Docker, or grade with --no-docker")
    table = grade_with_docker(submissions_dir, autograder) if use_docker else grade_without_docker(submissions, autograder)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with replace_atomically(out_csv) as tmp:
        table.to_csv(tmp, index=False)
    return out_csv


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="teach.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="otter assign the master notebooks into student and autograder versions")
    build_parser.add_argument("masters", nargs="*", type=Path, help="master notebooks (default: every exercises/NN_*.ipynb)")
    build_parser.add_argument("--out", type=Path, default=Path("dist"), help="output folder (default: dist)")
    grade_parser = commands.add_parser("grade", help="grade a folder of submitted notebooks into one CSV")
    grade_parser.add_argument("submissions", type=Path, help="folder of submitted .ipynb files")
    grade_parser.add_argument("--autograder", type=Path, required=True, help="autograder.zip written by `build`")
    grade_parser.add_argument("--out", type=Path, default=Path("scores.csv"), help="CSV to write (default: scores.csv)")
    docker = grade_parser.add_mutually_exclusive_group()
    docker.add_argument("--docker", dest="docker", action="store_true", default=None, help="require otter grade (Docker)")
    docker.add_argument("--no-docker", dest="docker", action="store_false", help="otter run each submission here")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            for master in args.masters or master_notebooks():
                if not master.is_file():
                    raise ValueError(f"master notebook {master} not found; expected a path like exercises/01_gpt_model.ipynb")
                print(f"built {build(master, args.out)}")
        else:
            print(f"wrote {grade_folder(args.submissions, args.autograder, args.out, args.docker)}")
    except (ValueError, RuntimeError) as error:
        print(f"teach.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
