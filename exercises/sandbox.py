"""Run one submission's untrusted process: own temporary folder, own session, time and memory limits,
capped output and, where bubblewrap is installed, its own user, PID, network, IPC, cgroup and mount
namespaces with a read-only root and size-limited folders in memory, no nested user namespaces and a
seccomp filter (:mod:`seccomp_filter`). Run as root, the grader never hands root to a submission:
bubblewrap itself runs as :data:`SANDBOX_UID`, without groups or capabilities. What bounds its memory as
a whole is :func:`memory_bound`: a cgroup v1 group per run (as root, :mod:`cgroup_limits`), a systemd
scope (cgroup v2, without root), or one process only.

The process runs ``python -m gptlora.teaching.run_submission`` on the notebook and writes its
observations to a pipe (``/dev/fd/N``); :func:`run_submission` returns them as text lines for the
trusted side to parse. Nothing started by a submission survives :func:`run_submission`: with
bubblewrap the PID namespace dies with it; its process group and its control group are killed, and so
is every process that still carries the run's token in its environment.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import gptlora

import cgroup_limits
import seccomp_filter

OUTPUT_HEAD = 32_768  # bytes of a submission's printing kept (the rest is read and dropped)
OUTPUT_TAIL = 8_192
RESULTS_LIMIT = 16 * 1024 * 1024  # bytes of observations read back (from a pipe, in memory)
FILE_LIMIT = 64 * 1024 * 1024  # RLIMIT_FSIZE: the largest file a submission may write
FOLDER_LIMIT = 64 * 1024 * 1024  # bytes of its own folder (and of its /tmp), in memory, never the host disk
SHM_LIMIT = 16 * 1024 * 1024  # bytes of its /dev/shm
TOKEN_VARIABLE = "GPTLORA_GRADING_RUN"
SANDBOX_UID = 1_500_000  # as root, the sandbox runs as this uid outside: no account, file or group has it
GROUP_PREFIX = "gptlora-grade-"  # + the grader's process id + the run's token: whose groups these are
INSIDE = "/submission"  # the sandbox's own folder, as the submission sees it
DEADLINE_RUNS = 2.0  # a submission's runs together take at most this many --timeout (scoring.grade_one)
isolation_problems: list[str] = []  # what any teardown of this grading found wrong, printed first at the end
_running: set = set()  # the submission processes now running (bubblewrap or the child), for stop_all
_running_lock = threading.Lock()
_stopping = threading.Event()


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 180.0
    memory_mib: int = 4096
    python: str = sys.executable


@dataclass
class Run:
    """What one run of a submission left: its result lines, how it ended, and its printing (capped)."""

    lines: list[str]
    returncode: int | None  # None: killed at the timeout
    output_head: str = ""
    output_tail: str = ""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # what the teardown found wrong: limits changed, leftovers


def bwrap_path() -> str | None:
    return shutil.which("bwrap")


@functools.lru_cache(maxsize=None)
def _systemd_scope_works() -> bool:
    """Whether this (unprivileged) user may run a command in a systemd scope with a memory limit: cgroup v2
    with a delegated user subtree, the usual desktop Linux."""
    if not (shutil.which("systemd-run") and (cgroup_limits.ROOT / "cgroup.controllers").is_file()):
        return False
    probe = ["systemd-run", "--user", "--scope", "--quiet", "-p", "MemoryMax=64M", "-p", "TasksMax=8", "true"]
    try:
        return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def memory_bound(unsafe: bool) -> str:
    """What bounds a submission's memory as a whole: ``cgroup-v1`` (a group per run, as root),
    ``systemd-scope`` (cgroup v2 through systemd, without root), ``single-process`` (seccomp forbids new
    processes, so the per-process limit is the submission's), or ``per-process`` (nothing bounds the total)."""
    if cgroup_limits.available():
        return "cgroup-v1"
    if os.geteuid() != 0 and _systemd_scope_works():
        return "systemd-scope"
    if not unsafe and seccomp_filter.available():
        return "single-process"
    return "per-process"


def describe_isolation(unsafe: bool, limits: Limits) -> str:
    """The one line the grader prints first: which isolation it uses, and what is limited per what."""
    bound = memory_bound(unsafe)
    group = {
        "cgroup-v1": f"memory bounded per submission by a cgroup v1 group: {limits.memory_mib} MiB for all its processes "
                     f"together, at most {cgroup_limits.PIDS_MAX} processes, one equal CPU share, limits read back "
                     f"and the group frozen, killed and removed after each run",
        "systemd-scope": f"memory bounded per submission by a systemd scope (cgroup v2): MemoryMax {limits.memory_mib} "
                         f"MiB for all its processes together, at most {cgroup_limits.PIDS_MAX} tasks",
        "single-process": f"memory bounded per submission by allowing one process only (no cgroup here: seccomp "
                          f"refuses fork; threads share its {limits.memory_mib} MiB)",
        "per-process": "memory NOT bounded per submission (no cgroup and no seccomp here): only per process, and "
                       "the number of processes and the CPU share are not limited",
    }[bound]
    common = (f"{group}; per process: {limits.memory_mib} MiB of address space, files up to {FILE_LIMIT >> 20} MiB; "
              f"timeout {limits.timeout_s:g} s per run and {DEADLINE_RUNS:g} x that per submission, output kept up to "
              f"{OUTPUT_HEAD // 1024} KiB, everything it started killed after each run")
    if unsafe:
        return (f"isolation: NONE (--unsafe): submissions run as you and can read and change your files (the other "
                f"submissions, the solutions), fill your disk and reach the network; what remains: {common}")
    owner = (f"unprivileged uid {SANDBOX_UID} outside, never root" if os.geteuid() == 0 else "your user outside")
    seccomp = ("a seccomp filter (pyseccomp) refusing namespaces, mounts, ptrace, bpf, keyctl and the like"
               if seccomp_filter.available() else "NO seccomp filter (pyseccomp or libseccomp missing: pip install "
                                                  "pyseccomp)")
    return (f"isolation: bubblewrap ({bwrap_path()}): user nobody inside ({owner}), no capabilities, no nested user "
            f"namespaces (--disable-userns), {seccomp}; own PID, network, IPC, cgroup and mount namespaces, no /sys; "
            f"reads only /usr, the Python environment, gptlora and the tokenizer cache, all read-only; writes only "
            f"its own {FOLDER_LIMIT >> 20} MiB folder and /tmp, and a {SHM_LIMIT >> 20} MiB /dev/shm, all in memory; "
            f"{common}")


def _read_capped(stream, run: Run):
    """Read ``stream`` to its end, keeping its head and tail only (megabytes of printing cost no memory)."""
    head, tail = bytearray(), bytearray()
    while chunk := stream.read(65536):
        if len(head) < OUTPUT_HEAD:
            head += chunk[:OUTPUT_HEAD - len(head)]
        tail = (tail + chunk)[-OUTPUT_TAIL:]
    run.output_head, run.output_tail = head.decode(errors="replace"), tail.decode(errors="replace")


def _limited_prefix(memory_mib: int) -> list[str]:
    """util-linux's ``prlimit`` setting the memory, file-size and core limits of what follows it."""
    memory = memory_mib * 1024 * 1024
    return [shutil.which("prlimit"), f"--as={memory}", f"--fsize={FILE_LIMIT}", "--core=0", "--"]


def _bwrap_command(bound: list[Path], seen_as: list[Path], notebook_fd: int, seccomp_fd: int | None) -> list[str]:
    """bubblewrap with a read-only root holding /usr (and its links), the Python runtime and gptlora (each
    folder ``bound[i]`` seen inside at ``seen_as[i]``), and a size-limited tmpfs at :data:`INSIDE` with the
    notebook (read-only, from ``notebook_fd``): what a submission writes lands in memory, capped, never on
    the teacher's disk. The tmpfs on /tmp comes first and the environment is bound over it: a checkout or a
    virtual environment under /tmp (a CI job's temporary clone) stays visible."""
    command = [bwrap_path(), "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
               "--new-session", "--cap-drop", "ALL", "--uid", "65534", "--gid", "65534",
               "--proc", "/proc", "--dev", "/dev", "--size", str(SHM_LIMIT), "--tmpfs", "/dev/shm",
               "--size", str(FOLDER_LIMIT), "--tmpfs", "/tmp", "--ro-bind", "/usr", "/usr"]
    for name in ("bin", "lib", "lib64", "sbin"):
        path = Path("/") / name
        if path.is_symlink():
            command += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            command += ["--ro-bind", str(path), str(path)]
    for source, inside in zip(bound, seen_as):
        command += ["--ro-bind", str(source), str(inside)]
    command += ["--size", str(FOLDER_LIMIT), "--tmpfs", INSIDE,
                "--ro-bind-data", str(notebook_fd), f"{INSIDE}/submission.ipynb", "--chdir", INSIDE]
    if seccomp_fd is not None:
        command += ["--seccomp", str(seccomp_fd)]
    return command + ["--remount-ro", "/", "--"]


STAGE_SCRIPT = """set -e
stage=$1; count=$2; shift 2
mount -t tmpfs -o mode=0755,size=64k,nosuid,nodev gptlora-stage "$stage"
i=0
while [ "$i" -lt "$count" ]; do
  mkdir "$stage/$i"; mount --bind "$1" "$stage/$i"; mount -o remount,bind,ro,nosuid,nodev "$stage/$i"
  shift; i=$((i+1))
done
exec "$@"
"""


def _as_sandbox_user(stage: Path, folders: list[Path]) -> tuple[list[str], list[Path]]:
    """As root: the prefix that drops to :data:`SANDBOX_UID` (no groups, no capabilities, no new privileges)
    and where bubblewrap, then unprivileged, finds ``folders``. The Python environment may sit where that
    user cannot go (pyenv under /root, mode 700), so a private mount namespace made as root first binds each
    folder read-only under ``stage`` (a tmpfs it can cross); the host's mounts do not change."""
    ids = str(SANDBOX_UID)
    prefix = [shutil.which("unshare"), "--mount", "--propagation", "private", "/bin/sh", "-c", STAGE_SCRIPT, "sh",
              str(stage), str(len(folders))] + [str(f) for f in folders]
    prefix += [shutil.which("setpriv"), f"--reuid={ids}", f"--regid={ids}", "--clear-groups", "--inh-caps=-all",
               "--bounding-set=-all", "--no-new-privs"]
    return prefix, [stage / str(i) for i in range(len(folders))]


def _python_folders(limits: Limits) -> list[Path]:
    """What the child must see read-only: the interpreter and its libraries, gptlora, the tokenizer cache."""
    folders = {Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(), Path(gptlora.__file__).resolve().parent,
               Path(limits.python).resolve().parent}
    cache = os.environ.get("TIKTOKEN_CACHE_DIR")
    if cache and Path(cache).is_dir():
        folders.add(Path(cache).resolve())
    folders = {f for f in folders if not str(f).startswith("/usr/")}
    return sorted(f for f in folders if not any(f != other and f.is_relative_to(other) for other in folders))


def _child_environment(token: str) -> dict:
    """A small environment: none of the teacher's variables but those the child needs."""
    environment = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp",
                   "PYTHONPATH": str(Path(gptlora.__file__).resolve().parent.parent), "PYTHONDONTWRITEBYTECODE": "1",
                   "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg", "GPTLORA_OFFLINE": "1",
                   "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", TOKEN_VARIABLE: token}
    if os.environ.get("TIKTOKEN_CACHE_DIR"):
        environment["TIKTOKEN_CACHE_DIR"] = str(Path(os.environ["TIKTOKEN_CACHE_DIR"]).resolve())
    return environment


def kill_tagged_processes(token: str) -> int:
    """Kill every process whose environment carries ``token`` (what a submission left running); how many."""
    needle, killed = f"{TOKEN_VARIABLE}={token}".encode(), 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                os.kill(int(entry.name), signal.SIGKILL)
                killed += 1
        except (OSError, ValueError):
            continue  # gone already, or not ours
    return killed


def stop_all() -> None:
    """Kill every running submission now and start no other (Ctrl-C): their runs end at once and clean up."""
    _stopping.set()
    with _running_lock:
        for process in _running:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _start(notebook: bytes, folder: Path, box: Path, mode: str, limits: Limits, unsafe: bool, results_fd: int,
           group) -> tuple[list[str], list[int]]:
    """The command that runs the submission, and the descriptors it inherits (kept open until it starts)."""
    child = [os.path.abspath(limits.python), "-m", "gptlora.teaching.run_submission", "submission.ipynb", mode,
             f"/dev/fd/{results_fd}"]
    bound_mode = memory_bound(unsafe)
    if unsafe:
        (box / "submission.ipynb").write_bytes(notebook)
        command, descriptors = _limited_prefix(limits.memory_mib) + child, []
    else:
        notebook_fd = os.memfd_create("gptlora-notebook", 0)  # handed in from memory: no copy on the disk
        os.write(notebook_fd, notebook)
        os.lseek(notebook_fd, 0, os.SEEK_SET)
        bound = seen_as = _python_folders(limits)
        bound_by, descriptors = [], [notebook_fd]
        if os.geteuid() == 0:
            os.chmod(folder, 0o711)  # the unprivileged bubblewrap crosses it to the staged environment
            (folder / "stage").mkdir()
            bound_by, bound = _as_sandbox_user(folder / "stage", bound)
            os.fchown(results_fd, SANDBOX_UID, SANDBOX_UID)  # it reopens /dev/fd/N, a pipe the grader made
        seccomp_fd = seccomp_filter.filter_fd(bound_mode == "single-process") if seccomp_filter.available() else None
        descriptors += [] if seccomp_fd is None else [seccomp_fd]
        command = bound_by + _limited_prefix(limits.memory_mib) + _bwrap_command(bound, seen_as, notebook_fd,
                                                                                   seccomp_fd) + child
    if bound_mode == "systemd-scope":
        command = ["systemd-run", "--user", "--scope", "--quiet", "-p", f"MemoryMax={limits.memory_mib}M",
                   "-p", f"TasksMax={cgroup_limits.PIDS_MAX}", "--"] + command
    return (group.wrap(command) if group else command), descriptors


def _read_results(stream, run: Run) -> None:
    """The observations the run writes to its pipe, up to :data:`RESULTS_LIMIT` bytes (the rest is dropped)."""
    kept = bytearray()
    while chunk := stream.read(65536):
        if len(kept) < RESULTS_LIMIT:
            kept += chunk[:RESULTS_LIMIT - len(kept)]
    run.lines = kept.decode(errors="replace").splitlines()


def run_submission(notebook: bytes, tasks: list[dict], mode: str, limits: Limits, unsafe: bool) -> Run:
    """Run ``notebook`` (its bytes) once in a fresh sandbox in ``mode`` (``cells`` or ``definitions``).
    Its observations come back through a pipe, never a file on the host."""
    if _stopping.is_set():
        raise RuntimeError("grading was stopped")
    token = uuid.uuid4().hex
    with tempfile.TemporaryDirectory(prefix="gptlora-grade-") as folder:
        folder = Path(folder)
        box = folder / "box"
        box.mkdir()
        run, start = Run(lines=[], returncode=None), time.perf_counter()
        group = cgroup_limits.create(f"{GROUP_PREFIX}{os.getpid()}-{token}", limits.memory_mib)
        results_read, results_write = os.pipe()
        descriptors = []
        try:
            command, descriptors = _start(notebook, folder, box, mode, limits, unsafe, results_write, group)
            process = subprocess.Popen(command, cwd=box, env=_child_environment(token), stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                       pass_fds=[results_write] + descriptors)
        except BaseException:
            os.close(results_read)
            if group:
                group.teardown({})
            raise
        finally:
            for descriptor in [results_write] + descriptors:
                os.close(descriptor)
        with _running_lock:
            _running.add(process)
        readers = [threading.Thread(target=_read_capped, args=(process.stdout, run), daemon=True),
                   threading.Thread(target=_read_results, args=(os.fdopen(results_read, "rb"), run), daemon=True)]
        for reader in readers:
            reader.start()
        try:
            process.stdin.write(json.dumps(tasks).encode())
            process.stdin.close()
        except BrokenPipeError:
            pass  # it ended before reading its tasks; how is told by its exit status
        try:
            run.returncode = process.wait(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            run.returncode = None
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # the whole group, whatever the submission started in it
            except ProcessLookupError:
                pass
            process.wait()
            with _running_lock:
                _running.discard(process)
            if group:
                if group.ran_out_of_memory():
                    run.notes.append("memory")
                run.problems += group.teardown(cgroup_limits.expected_limits(limits.memory_mib))
            kill_tagged_processes(token)
            for reader in readers:
                reader.join(timeout=10)
        if not unsafe and run.returncode is not None and run.returncode > 128:
            run.returncode = 128 - run.returncode  # bubblewrap reports a child killed by signal N as 128 + N
        run.seconds = time.perf_counter() - start
        shutil.rmtree(box, ignore_errors=True)
    if run.problems:
        with _running_lock:
            isolation_problems.extend(run.problems)
    return run
