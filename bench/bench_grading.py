"""Grading a class: `exercises/teach.py grade` on 30 submissions of exercise 01, time per submission.

    .venv/bin/python bench/bench_grading.py [--submissions 30] [--jobs 1,2] [--otter 3]

The 30 submissions are a third solutions, a third untouched student notebooks and a third solutions
with the first typical mistake of exercises/typical_mistakes.yaml. References measured in the same run:
the start of one Python interpreter that imports torch and gptlora (what every sandboxed run pays), and
``otter run`` of one solution (the grader teach.py used before, unisolated, in the student's kernel).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, machine_line, print_table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "exercises"))
if (SHARED / "tiktoken-cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken-cache"))

import teach  # noqa: E402
from sandbox import Limits, bwrap_path  # noqa: E402

EXERCISE = "01_gpt_model"


def class_folder(built: Path, out: Path, count: int) -> Path:
    """``count`` submissions: solutions, blank student notebooks and solutions with a typical mistake, in turn."""
    solution = (built / "autograder" / f"{EXERCISE}.ipynb").read_text()
    mistake = yaml.safe_load((REPO / "exercises" / "typical_mistakes.yaml").read_text())[EXERCISE][0]
    kinds = [solution, (built / "student" / f"{EXERCISE}.ipynb").read_text(),
             solution.replace(teach_json(mistake["replace"]), teach_json(mistake["with"]), 1)]
    out.mkdir(parents=True)
    for i in range(count):
        (out / f"student{i:02d}.ipynb").write_text(kinds[i % 3])
    return out


def teach_json(text: str) -> str:
    """``text`` as it appears inside a notebook's JSON string."""
    import json

    return json.dumps(text)[1:-1]


def seconds_of(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--submissions", type=int, default=30)
    parser.add_argument("--jobs", default="1,2", help="comma-separated numbers of submissions graded at once")
    parser.add_argument("--otter", type=int, default=3, help="otter runs of one solution for the reference (0: none)")
    args = parser.parse_args()
    unsafe = bwrap_path() is None
    print(machine_line())
    with tempfile.TemporaryDirectory() as tmp:
        built = teach.build(REPO / "exercises" / f"{EXERCISE}.ipynb", Path(tmp) / "dist")
        folder = class_folder(built, Path(tmp) / "class", args.submissions)
        start_s = min(seconds_of(lambda: subprocess.run([sys.executable, "-c", "import torch, gptlora.model"],
                                                        check=True)) for _ in range(3))
        rows = []
        for jobs in [int(j) for j in args.jobs.split(",")]:
            out = Path(tmp) / f"scores-{jobs}.csv"
            seconds = seconds_of(lambda: teach.grade_folder(folder, EXERCISE, out, Limits(), unsafe, jobs))
            per = seconds / args.submissions
            rows.append([f"teach.py grade, {'--unsafe' if unsafe else 'bubblewrap'}, --jobs {jobs}",
                         f"{seconds:.1f}", f"{per:.2f}", f"{per / start_s:.1f}x"])
        if args.otter:
            from otter.api import grade_submission

            os.environ.setdefault("JUPYTER_PREFER_ENV_PATH", "1")
            solution = folder / "student00.ipynb"
            otter_s = min(seconds_of(lambda: grade_submission(str(solution), str(built / "autograder.zip"), quiet=True))
                          for _ in range(args.otter))
            rows.append(["otter run (old grader, unisolated), one solution", f"{otter_s:.1f}", f"{otter_s:.2f}",
                         f"{otter_s / start_s:.1f}x"])
        rows.append(["reference: python -c 'import torch, gptlora.model'", f"{start_s:.2f}", f"{start_s:.2f}", "1.0x"])
        print_table(f"Grading {args.submissions} submissions of {EXERCISE}",
                    ["grader", "seconds", "seconds per submission", "per submission / interpreter start"], rows)
        shutil.rmtree(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
