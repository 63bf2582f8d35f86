"""Run one submission's untrusted process: own temporary copy, own session, time and memory limits,
capped output, (where bubblewrap is installed) its own user, PID, network and mount namespaces with a
read-only root and size-limited folders in memory, and (where cgroup v1 is writable) one control group
per run limiting the memory, process count and CPU share of all its processes together.

The process runs ``python -m gptlora.teaching.run_submission`` on a copy of the notebook and writes
its observations to a file in its folder; :func:`run_submission` returns them as text lines for the
trusted side to parse. Nothing started by a submission survives :func:`run_submission`: with
bubblewrap the PID namespace dies with it; without, its process group is killed, and so is every
process that still carries the run's token in its environment.
"""

from __future__ import annotations

import json
import os
import resource
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

OUTPUT_HEAD = 32_768  # bytes of a submission's printing kept (the rest is read and dropped)
OUTPUT_TAIL = 8_192
RESULTS_LIMIT = 16 * 1024 * 1024  # bytes of observations read back
FILE_LIMIT = 64 * 1024 * 1024  # RLIMIT_FSIZE: the largest file a submission may write
FOLDER_LIMIT = 64 * 1024 * 1024  # bytes of its own folder (and of its /tmp), in memory, never the host disk
SHM_LIMIT = 16 * 1024 * 1024  # bytes of its /dev/shm
TOKEN_VARIABLE = "GPTLORA_GRADING_RUN"
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


def bwrap_path() -> str | None:
    return shutil.which("bwrap")


def describe_isolation(unsafe: bool, limits: Limits) -> str:
    """The one line the grader prints first: which isolation it uses, and what is limited per what."""
    if cgroup_limits.available():
        group = (f"per submission (cgroup v1): memory {limits.memory_mib} MiB for all its processes together, "
                 f"at most {cgroup_limits.PIDS_MAX} processes, one equal CPU share")
    else:
        group = ("no cgroup (cgroup v1 not writable here): memory, process count and CPU share are not limited per "
                 "submission, only per process")
    common = (f"{group}; per process: {limits.memory_mib} MiB of address space, files up to {FILE_LIMIT >> 20} MiB; "
              f"timeout {limits.timeout_s:g} s per run, output kept up to {OUTPUT_HEAD // 1024} KiB, "
              f"everything it started killed after each run")
    if not unsafe:
        owner = "root outside, without capabilities" if os.geteuid() == 0 else "your user outside"
        return (f"isolation: bubblewrap ({bwrap_path()}): user nobody inside its own user namespace ({owner}), own PID, "
                f"network and mount namespaces; reads only /usr, the Python environment, gptlora and the tokenizer "
                f"cache, all read-only; writes only its own {FOLDER_LIMIT >> 20} MiB folder and /tmp, and a "
                f"{SHM_LIMIT >> 20} MiB /dev/shm, all in memory; {common}")
    return (f"isolation: NONE (--unsafe): submissions run as you and can read and change your files (the other "
            f"submissions, the solutions), fill your disk and reach the network; what remains: {common}")


def _read_capped(stream, run: Run):
    """Read ``stream`` to its end, keeping its head and tail only (megabytes of printing cost no memory)."""
    head, tail = bytearray(), bytearray()
    while chunk := stream.read(65536):
        if len(head) < OUTPUT_HEAD:
            head += chunk[:OUTPUT_HEAD - len(head)]
        tail = (tail + chunk)[-OUTPUT_TAIL:]
    run.output_head, run.output_tail = head.decode(errors="replace"), tail.decode(errors="replace")


def _limited(command: list[str], memory_mib: int) -> tuple[list[str], object]:
    """``command`` under the memory, file-size and core limits: through util-linux's ``prlimit`` (safe with
    the grader's threads), else set between fork and exec."""
    memory = memory_mib * 1024 * 1024
    if shutil.which("prlimit"):
        return [shutil.which("prlimit"), f"--as={memory}", f"--fsize={FILE_LIMIT}", "--core=0", "--"] + command, None

    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return command, apply


def _bwrap_command(box: Path, bound: list[Path]) -> list[str]:
    """bubblewrap with a read-only root holding /usr (and its links), the Python runtime, gptlora and, at
    ``box``'s path, a size-limited tmpfs with the notebook (read-only) and the results file (writable) only:
    what a submission writes lands in memory, capped, not on the teacher's disk."""
    command = [bwrap_path(), "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
               "--uid", "65534", "--gid", "65534", "--ro-bind", "/usr", "/usr"]
    for name in ("bin", "lib", "lib64", "sbin"):
        path = Path("/") / name
        if path.is_symlink():
            command += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            command += ["--ro-bind", str(path), str(path)]
    for path in bound:
        command += ["--ro-bind", str(path), str(path)]
    return command + ["--proc", "/proc", "--dev", "/dev", "--size", str(SHM_LIMIT), "--tmpfs", "/dev/shm",
                      "--size", str(FOLDER_LIMIT), "--tmpfs", "/tmp", "--size", str(FOLDER_LIMIT), "--tmpfs", str(box),
                      "--ro-bind", str(box / "submission.ipynb"), str(box / "submission.ipynb"),
                      "--bind", str(box / "results.jsonl"), str(box / "results.jsonl"),
                      "--chdir", str(box), "--remount-ro", "/", "--"]


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


def run_submission(notebook: bytes, tasks: list[dict], mode: str, limits: Limits, unsafe: bool) -> Run:
    """Run ``notebook`` (its bytes) once in a fresh sandbox in ``mode`` (``cells`` or ``definitions``)."""
    if _stopping.is_set():
        raise RuntimeError("grading was stopped")
    token = uuid.uuid4().hex
    with tempfile.TemporaryDirectory(prefix="gptlora-grade-") as folder:
        box = Path(folder) / "box"
        box.mkdir()
        os.chmod(box, 0o777)  # the sandbox's user (nobody) writes its results here
        (box / "submission.ipynb").write_bytes(notebook)
        (box / "results.jsonl").touch(mode=0o666)
        os.chmod(box / "results.jsonl", 0o666)
        child = [limits.python, "-m", "gptlora.teaching.run_submission", "submission.ipynb", mode,
                 str(box / "results.jsonl")]
        command, preexec = _limited(child if unsafe else _bwrap_command(box, _python_folders(limits)) + child,
                                    limits.memory_mib)
        group = cgroup_limits.create(f"gptlora-grade-{token}", limits.memory_mib)
        command = group.wrap(command) if group else command
        run, start = Run(lines=[], returncode=None), time.perf_counter()
        process = subprocess.Popen(command, cwd=box, env=_child_environment(token), stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=preexec)
        with _running_lock:
            _running.add(process)
        reader = threading.Thread(target=_read_capped, args=(process.stdout, run), daemon=True)
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
                group.kill_and_remove()
            kill_tagged_processes(token)
            reader.join(timeout=10)
        if not unsafe and run.returncode is not None and run.returncode > 128:
            run.returncode = 128 - run.returncode  # bubblewrap reports a child killed by signal N as 128 + N
        run.seconds = time.perf_counter() - start
        results = box / "results.jsonl"
        if results.is_file() and not results.is_symlink():
            with open(results, "rb") as file:
                run.lines = file.read(RESULTS_LIMIT).decode(errors="replace").splitlines()
        shutil.rmtree(box, ignore_errors=True)
    return run
