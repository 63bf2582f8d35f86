"""`teach.py grade`'s sandbox holds when the grader runs as root (issue 26, part A).

- a submission never holds root outside and cannot get it back: every way back the issue found
  (``unshare -U -r``, ``unshare -m``, the ``unshare`` call, clone flags, mounting or writing cgroup
  files, the freezer, ptrace of a sibling, bpf, keyctl ...) is refused, and the honest and blank rows
  graded beside such a submission do not move;
- grading works with the Python environment under /tmp (a CI job's temporary clone);
- the trusted side reads the limits back, thaws and kills what is frozen, and removes its groups;
- a submission that hangs in every question costs about 2 x --timeout, not (1 + questions) x;
- without a control group, one process only: fork is refused, threads still run.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nbformat
import pytest

from conftest import REPO_ROOT, load_teach

EXERCISE_DIR = REPO_ROOT / "exercises"
teach = load_teach()
sys.path.insert(0, str(EXERCISE_DIR))
import cgroup_limits  # noqa: E402  (exercises/ is a folder of scripts, on the path since load_teach)
import sandbox  # noqa: E402
import seccomp_filter  # noqa: E402
from test_grading import ISOLATED, TIMEOUT, cell  # noqa: E402

AS_ROOT = os.geteuid() == 0
needs_isolation = pytest.mark.skipif(not ISOLATED, reason="bubblewrap cannot make its namespaces here")

# Every way back to root (or to the host's control groups) that issue 26 found, tried from inside a cell.
# Each prints "<NAME> allowed" or "<NAME> refused <why>".
ESCAPES = r'''
import ctypes, errno, os, subprocess
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def said(name, ok, why=""):
    print(name, "allowed" if ok else f"refused {why}")
def call(name, number, *args):
    ctypes.set_errno(0)
    ok = libc.syscall(number, *[ctypes.c_ulong(a) for a in args]) >= 0
    said(name, ok, errno.errorcode.get(ctypes.get_errno(), ctypes.get_errno()))
def run(name, argv):
    try:
        said(name, subprocess.run(argv, capture_output=True, timeout=20).returncode == 0, "status")
    except OSError as error:
        said(name, False, errno.errorcode.get(error.errno))
def write(name, path, text):
    try:
        with open(path, "w") as file:
            file.write(text)
        said(name, True)
    except OSError as error:
        said(name, False, errno.errorcode.get(error.errno))
run("UNSHARE_USER_ROOT", ["unshare", "-U", "-r", "true"])
run("UNSHARE_MOUNT", ["unshare", "-m", "true"])
run("UNSHARE_USER_MOUNT_CGROUP", ["unshare", "-U", "-r", "-m", "-C", "true"])
call("UNSHARE_CALL", 272, 0x10000000)                       # unshare(CLONE_NEWUSER), as os.unshare would
call("CLONE_NEWUSER", 56, 0x10000000 | 17, 0, 0, 0, 0)      # clone(CLONE_NEWUSER | SIGCHLD)
call("CLONE3", 435, 0, 0)
call("SETNS", 308, 0, 0)
call("MOUNT", 165, 0, 0, 0, 0, 0)
call("BPF", 321, 0, 0, 0)
call("KEYCTL", 250, 0, 0, 0, 0, 0)
call("PERF_EVENT_OPEN", 298, 0, 0, 0, 0, 0)
call("USERFAULTFD", 323, 0)
call("PERSONALITY", 135, 0x0008)
sibling = subprocess.Popen(["sleep", "30"])
call("PTRACE_SIBLING", 101, 16, sibling.pid, 0, 0)          # PTRACE_ATTACH
call("PROCESS_VM_READV", 310, sibling.pid, 0, 0, 0, 0, 0)
sibling.kill()
run("MOUNT_CGROUP", ["mount", "-t", "cgroup", "-o", "memory", "none", "/tmp"])
write("CGROUP_MEMORY_LIMIT", "/sys/fs/cgroup/memory/memory.limit_in_bytes", "-1")
write("CGROUP_CPU_SHARES", "/sys/fs/cgroup/cpu/cpu.shares", "262144")
write("CGROUP_FREEZER", "/sys/fs/cgroup/freezer/freezer.state", "FROZEN")
write("CGROUP_BLKIO", "/sys/fs/cgroup/blkio/blkio.throttle.read_bps_device", "8:0 1")
try:
    os.mkdir("/sys/fs/cgroup/freezer/gptlora-message-to-the-next-student")
    said("CGROUP_MKDIR", True)
except OSError as error:
    said("CGROUP_MKDIR", False, errno.errorcode.get(error.errno))
print("CAPABILITIES", [line.split()[1] for line in open("/proc/self/status") if line.startswith("CapEff")][0])
'''
ESCAPE_NAMES = re.findall(r'^(?:run|call|write)\("(\w+)"', ESCAPES, re.MULTILINE) + ["CGROUP_MKDIR"]


def notebook(*sources: str) -> bytes:
    nb = nbformat.v4.new_notebook()
    nb.cells = [cell(source) for source in sources]
    return json.dumps(nb).encode()


def said(run: sandbox.Run) -> dict:
    return dict(line.split(" ", 1) for line in run.output_head.splitlines() if " " in line)


@needs_isolation
def test_no_way_back_to_root_or_to_the_host_control_groups():
    """As root (CI, a container, Gradescope) bubblewrap ran as root outside and allowed nested user namespaces:
    `unshare -U -r -m -C` gave the cell every capability and the host's cgroup v1 files. Now all is refused."""
    runs, uids = [], set()
    worker = threading.Thread(target=lambda: runs.append(sandbox.run_submission(
        notebook(ESCAPES + "\nimport time; time.sleep(1)"), [], "cells", sandbox.Limits(timeout_s=120), unsafe=False)))
    worker.start()
    while worker.is_alive():  # seen from the host: the uid of every process inside the sandbox's PID namespace
        uids |= _uids_inside_sandboxes()
        time.sleep(0.1)
    run = runs[0]
    found = said(run)
    assert run.returncode == 0 and len(ESCAPE_NAMES) == 21, run.output_head
    assert {name: found.get(name, "missing").split()[0] for name in ESCAPE_NAMES} == \
        {name: "refused" for name in ESCAPE_NAMES}, run.output_head
    assert found["CAPABILITIES"] == "0000000000000000"
    if AS_ROOT:
        assert uids == {sandbox.SANDBOX_UID}, f"uids of the sandbox's processes outside: {uids}"
    assert not run.problems and not list(Path("/sys/fs/cgroup/freezer").glob("gptlora-message-*"))


@needs_isolation
@pytest.mark.skipif(not seccomp_filter.available(), reason="pyseccomp or libseccomp is missing")
def test_single_process_mode_refuses_fork_and_keeps_threads(monkeypatch):
    """Without a control group (a laptop without cgroup v2 delegation), five children of 1 GiB each drove the
    machine into the global OOM killer: there, seccomp refuses new processes and one address-space limit binds."""
    monkeypatch.setattr(cgroup_limits, "available", lambda: False)
    monkeypatch.setattr(sandbox, "_systemd_scope_works", lambda: False)
    assert sandbox.memory_bound(unsafe=False) == "single-process"
    assert "by allowing one process only" in sandbox.describe_isolation(False, sandbox.Limits())
    source = """
import os, subprocess, threading
def attempt(name, action):
    try:
        action()
        print(name, "allowed")
    except OSError as error:
        print(name, "refused", error.errno)
attempt("FORK", lambda: os.fork() == 0 and os._exit(0))
attempt("SUBPROCESS", lambda: subprocess.run(["true"]))
threading.Thread(target=print, args=("THREAD ran",)).start()
"""
    run = sandbox.run_submission(notebook(source), [], "cells", sandbox.Limits(timeout_s=120), unsafe=False)
    found = said(run)
    assert (found["FORK"], found["SUBPROCESS"], found["THREAD"]) == ("refused 1", "refused 1", "ran"), run.output_head


@pytest.mark.skipif(not (AS_ROOT and cgroup_limits.available()), reason="needs root and writable cgroup v1")
def test_teardown_reads_limits_back_thaws_kills_and_removes_its_groups():
    """A group's limits changed behind the grader's back, and a process frozen in it (which ignores SIGKILL while
    frozen): the teardown reports the change, thaws, kills and removes every folder it made."""
    group = cgroup_limits.create(f"gptlora-grade-test-{os.getpid()}", 512)
    process = subprocess.Popen(group.wrap(["sleep", "600"]))
    try:
        deadline = time.monotonic() + 10
        while not (group.folders[1] / "cgroup.procs").read_text().split() and time.monotonic() < deadline:
            time.sleep(0.05)
        (group.folders[1] / "pids.max").write_text("max")
        (group.folders[3] / "freezer.state").write_text("FROZEN")
        problems = group.teardown(cgroup_limits.expected_limits(512))
        assert problems == [f"pids limit changed to max (set {cgroup_limits.PIDS_MAX})"], problems
        assert process.wait(timeout=10) == -signal.SIGKILL
        assert not any(folder.exists() for folder in group.folders)
    finally:
        process.kill()


HANGS = """
def block_parameters(*args, **kwargs):
    while True: pass
def total_parameters(*args, **kwargs):
    while True: pass
def causal_attention_weights(*args, **kwargs):
    while True: pass
def set_dropout_rates(*args, **kwargs):
    while True: pass
while True: pass
"""


@pytest.mark.slow
def test_a_submission_that_hangs_everywhere_costs_about_two_timeouts(built):
    """It cost (1 + questions) x --timeout (15 minutes at the default): now one deadline covers all its runs."""
    import scoring

    master = EXERCISE_DIR / "01_gpt_model.ipynb"
    blank = (built(master) / "student" / master.name).read_bytes()
    nb = json.loads(blank)
    nb["cells"].append(nbformat.v4.new_code_cell(HANGS))
    questions, timeout = scoring.master_questions(master), 8
    expected = {q.name: scoring.Drawn(cases=[], answers=[]) for q in questions}  # never reached: it hangs
    start = time.monotonic()
    row = scoring.grade_one("hangs.ipynb", json.dumps(nb).encode(), "01_gpt_model", questions, expected,
                            sandbox.Limits(timeout_s=timeout), not ISOLATED)
    seconds = time.monotonic() - start
    assert row.total == 0 and seconds < sandbox.DEADLINE_RUNS * timeout + 5, (seconds, row.status)
    assert row.status[0].startswith(f"timeout: ran past {timeout} s while running its cells"), row.status
    # the deadline ends it: while its definitions run (a slow machine) or before the next question is asked
    assert row.status[-1].startswith((f"timeout: its runs used the 2 x {timeout} s a submission gets",
                                      "timeout: ran past")), row.status


@pytest.mark.slow
@needs_isolation
@pytest.mark.skipif(not AS_ROOT, reason="binds the virtual environment under /tmp in a private mount namespace (root)")
def test_grading_with_the_environment_under_tmp_and_an_escaping_neighbour(built, tmp_path):
    """A CI job's clone under /tmp: the sandbox's tmpfs on /tmp hid the environment ("bwrap: execvp .../python:
    No such file or directory") and nothing ran. Here the grader runs from a virtual environment under /tmp,
    beside a submission that tries every escape; the honest and blank rows keep 4 and 0, its own row keeps
    the 4 its answers deserve, and no group or process of the runs is left."""
    folder, submissions = built(EXERCISE_DIR / "01_gpt_model.ipynb"), tmp_path / "submissions"
    submissions.mkdir()
    solution = (folder / "autograder" / "01_gpt_model.ipynb").read_bytes()
    (submissions / "alice.ipynb").write_bytes(solution)
    (submissions / "bob.ipynb").write_bytes((folder / "student" / "01_gpt_model.ipynb").read_bytes())
    escaping = json.loads(solution)
    escaping["cells"].append(nbformat.v4.new_code_cell(ESCAPES))
    (submissions / "escaping.ipynb").write_text(json.dumps(escaping))
    out = tmp_path / "scores.csv"
    with tempfile.TemporaryDirectory(prefix="gptlora-env-under-tmp-", dir="/tmp") as under_tmp:
        venv = Path(under_tmp) / "venv"
        venv.mkdir()
        bind = ('mount --bind "$1" "$2" && "$2/bin/python" -c "import sys; print(sys.prefix)" && shift 2 && '
                'exec "$@"')
        command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", bind, "sh", sys.prefix, str(venv),
                   str(venv / "bin" / "python"), str(EXERCISE_DIR / "teach.py"), "grade", str(submissions), "--exercise", "01_gpt_model", "--out", str(out),
                   "--timeout", str(4 * TIMEOUT), "--jobs", "3", "--key-file", str(tmp_path / "grading-key")]
        grader = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stdout, stderr = grader.communicate(timeout=600)
    assert grader.returncode == 0, stderr
    assert stdout.startswith(str(venv)), f"the grader's environment is not under /tmp: {stdout}"
    assert "uid 1500000 outside, never root" in stderr.splitlines()[0]
    rows = {row["file"]: row for row in csv.DictReader(out.open())}
    assert {name: rows[name]["total"] for name in ("alice.ipynb", "bob.ipynb", "escaping.ipynb")} == \
        {"alice.ipynb": "4", "bob.ipynb": "0", "escaping.ipynb": "4"}, stderr
    assert rows["alice.ipynb"]["status"] == rows["escaping.ipynb"]["status"] == "graded"
    left = list(Path("/sys/fs/cgroup").glob(f"*/{sandbox.GROUP_PREFIX}{grader.pid}-*"))  # its own groups only
    assert not left, f"control groups were left: {left}"
    survivors = [pid for pid in _processes_of(sandbox.SANDBOX_UID)
                 if not _is_zombie(pid) and not _in_another_graders_group(pid, grader.pid)]
    assert not survivors, f"a process of the sandbox's user survived grading: {_describe(survivors)}"


def _processes_of(uid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and entry.stat().st_uid == uid:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _describe(pids: list[int]) -> list[str]:
    """State, parent and command line of each process, for a failure message."""
    described = []
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120]
            described.append(f"{pid} state {stat[0]} parent {stat[1]}: {command}")
        except OSError:
            described.append(f"{pid} (gone)")
    return described


def _is_zombie(pid: int) -> bool:
    """A process that has ended and waits to be reaped by PID 1 (this machine's init reaps with a delay): it
    runs nothing and holds no memory, so it has not survived the teardown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True  # gone meanwhile


def _in_another_graders_group(pid: int, grader_pid: int) -> bool:
    """Whether ``pid`` sits in a control group of another grader (one running beside this test, as on a
    shared machine): those are that grader's to clean up, not evidence against this one."""
    try:
        groups = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return False
    owners = {int(match) for match in re.findall(rf"{sandbox.GROUP_PREFIX}(\d+)-", groups)}
    return bool(owners) and grader_pid not in owners


def _uids_inside_sandboxes() -> set:
    """The owners of this test's processes (other graders may be running) that carry a grading run's token and
    live in another PID namespace than this one: the sandbox's own processes, seen from the host."""
    ours, found = os.readlink("/proc/self/ns/pid"), set()
    for entry in Path("/proc").iterdir():
        try:
            if (entry.name.isdigit() and os.readlink(entry / "ns" / "pid") != ours and _descends_from_us(entry) and
                    f"{sandbox.TOKEN_VARIABLE}=".encode() in (entry / "environ").read_bytes()):
                found.add(entry.stat().st_uid)
        except OSError:
            continue
    return found


def _descends_from_us(process: Path) -> bool:
    pid = int(process.name)
    for _ in range(64):
        if pid == os.getpid():
            return True
        if pid <= 1:
            return False
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return False


LAPTOP = """set -e
hold=$1; shift
if [ -n "$hold" ]; then  # the interpreter lies under /root (mode 700): show only it, read-only, in this namespace
  mount --bind -o ro "$(dirname "$hold")" "$TMPDIR_HOLD"
  mount -t tmpfs -o mode=0755 gptlora-test /root
  mkdir -p "$(dirname "$hold")"
  mount --bind "$TMPDIR_HOLD" "$(dirname "$hold")"
fi
exec setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all "$@"
"""


def _others_can_reach(path: Path) -> bool:
    """Whether every folder above ``path`` lets any user through (a clone in ``mktemp -d`` does not)."""
    return all(folder.stat().st_mode & 0o001 for folder in [path, *path.parents])


LAPTOP_READY = (AS_ROOT and seccomp_filter.available() and _others_can_reach(REPO_ROOT) and
                _others_can_reach(Path(sys.prefix)) and _others_can_reach(Path(os.environ.get("TIKTOKEN_CACHE_DIR", "/"))))


@pytest.mark.slow
@needs_isolation
@pytest.mark.skipif(not LAPTOP_READY, reason="runs the grader as an unprivileged user from root (setpriv): needs "
                    "root, pyseccomp, and the checkout, its venv and the tokenizer cache where any user can reach them")
def test_laptop_mode_without_root_bounds_the_submission_as_one_process(built):
    """A teacher's ordinary user, without a writable cgroup: five children of 1 GiB each drove the machine into
    the global OOM killer. Now the grader says which bound applies (here: one process only, the test machine
    has cgroup v1 and no user systemd), the children are refused, and the honest and blank rows keep 4 and 0."""
    folder = built(EXERCISE_DIR / "01_gpt_model.ipynb")
    solution = (folder / "autograder" / "01_gpt_model.ipynb").read_bytes()
    forking = json.loads(solution)
    forking["cells"].append(nbformat.v4.new_code_cell(
        "import subprocess, sys\nchildren = []\nfor _ in range(5):\n    try:\n"
        "        children.append(subprocess.Popen([sys.executable, '-c', 'b = bytearray(2**30); import time; "
        "time.sleep(60)']))\n    except OSError as error:\n        print('CHILD refused', error.errno)\n"))
    prefix = Path(sys.base_prefix).resolve()
    with tempfile.TemporaryDirectory(prefix="gptlora-laptop-") as work, \
            tempfile.TemporaryDirectory(prefix="gptlora-hold-") as hold:
        work = Path(work)
        os.chmod(work, 0o777)  # the teacher's own folder: the unprivileged grader reads and writes it
        submissions = work / "submissions"
        submissions.mkdir(mode=0o755)
        (submissions / "alice.ipynb").write_bytes(solution)
        (submissions / "bob.ipynb").write_bytes((folder / "student" / "01_gpt_model.ipynb").read_bytes())
        (submissions / "forking.ipynb").write_text(json.dumps(forking))
        for path in submissions.iterdir():
            os.chmod(path, 0o644)
        out = work / "scores.csv"
        command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", LAPTOP, "sh",
                   str(prefix / "bin") if str(prefix).startswith("/root/") else "", sys.executable,
                   str(EXERCISE_DIR / "teach.py"), "grade", str(submissions), "--exercise", "01_gpt_model",
                   "--out", str(out), "--timeout", str(4 * TIMEOUT), "--jobs", "3"]
        environment = dict(os.environ, TMPDIR_HOLD=hold, HOME=str(work))
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
        assert done.returncode == 0, done.stderr
        first = done.stderr.splitlines()[0]
        assert "user nobody inside (your user outside)" in first and "by allowing one process only" in first, first
        rows = {row["file"]: row for row in csv.DictReader(out.open())}
    assert {name: rows[name]["total"] for name in ("alice.ipynb", "bob.ipynb", "forking.ipynb")} == \
        {"alice.ipynb": "4", "bob.ipynb": "0", "forking.ipynb": "4"}, done.stderr


def test_a_teardown_problem_reaches_the_rows_status_and_the_first_warning(monkeypatch, tmp_path, capsys):
    """The row read "graded" while the run's groups were left behind: now what the teardown finds is said."""
    import scoring

    questions = scoring.master_questions(EXERCISE_DIR / "01_gpt_model.ipynb")
    problem = f"pids limit changed to max (set {cgroup_limits.PIDS_MAX})"
    monkeypatch.setattr(scoring, "run_submission", lambda *args: sandbox.Run(
        lines=['{"cells": "cells"}', '{"finished": true}'], returncode=0, problems=[problem]))
    nothing_drawn = {q.name: scoring.Drawn(cases=[], answers=[]) for q in questions}
    row = scoring.grade_one("x.ipynb", b'{"cells": []}', "01_gpt_model", questions, nothing_drawn, sandbox.Limits(), True)
    assert f"isolation: {problem}" in row.status

    def graded(*args, **keywords):
        sandbox.isolation_problems.append(problem)
        return questions, [row]

    monkeypatch.setattr(scoring, "grade_submissions", graded)
    (tmp_path / "x.ipynb").write_text("{}")
    teach.grade_folder(tmp_path, "01_gpt_model", tmp_path / "scores.csv", sandbox.Limits(), unsafe=True)
    printed = capsys.readouterr().err.splitlines()
    assert printed[1] == f"teach.py: WARNING: the sandbox's teardown found 1 problems (see the rows' status): {problem}"
