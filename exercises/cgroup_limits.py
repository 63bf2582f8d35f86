"""Per-submission limits that hold for all of a submission's processes together: a control group.

``setrlimit`` limits one process: a submission that forks ten children gets ten times its memory, as
many processes as it likes (``RLIMIT_NPROC`` does not bind root, and counts every process of the
user), and, with many busy children, most of the machine's CPU time against its neighbours. A control
group accounts for all its processes at once: ``memory.limit_in_bytes`` (their memory together),
``pids.max`` (how many there may be), and an equal ``cpu.shares`` (each submission, however many
processes it runs, gets one share of the CPU, as its neighbours do).

This is the cgroup v1 layout (one mounted hierarchy per controller, under ``/sys/fs/cgroup/<name>``),
used where the grader may create groups there (as root). Elsewhere :func:`create` answers ``None`` and
the grader says so in its isolation line (on cgroup v2 without root it asks systemd for a scope instead:
``sandbox.memory_bound``). Only this trusted side writes the groups: the submission runs as an
unprivileged user that cannot create namespaces or mount (``seccomp_filter``), and ``/sys`` is not
mounted in its sandbox. After each run :meth:`Group.teardown` reads the limits back, freezes the group
so that nothing in it can fork while it is killed, kills, thaws (a frozen process dies only once
thawed), and removes every folder it made; whatever it could not do is returned, for the row's status.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("memory", "pids", "cpu", "freezer")
PIDS_MAX = 256  # processes and threads of one submission together (torch starts a few threads)
CPU_SHARES = "1024"  # the default share: every submission gets the same


def available() -> bool:
    """Whether the v1 hierarchies are mounted and this process may create groups in each."""
    return all(os.access(ROOT / name, os.W_OK) and (ROOT / name / "cgroup.procs").is_file() for name in CONTROLLERS)


@dataclass
class Group:
    """One submission run's group in each controller's hierarchy."""

    folders: list[Path]

    def wrap(self, command: list[str]) -> list[str]:
        """``command`` started inside the group: a shell puts itself in each folder, then becomes it."""
        script = 'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 125; shift; n=$((n-1)); done; exec "$@"'
        procs = [str(folder / "cgroup.procs") for folder in self.folders]
        return ["/bin/sh", "-c", script, "sh", str(len(procs))] + procs + command

    def limits_now(self) -> dict:
        """The limits as the kernel holds them now, read back from the group's files."""
        return {"memory": _read(self.folders[0] / "memory.limit_in_bytes").strip(),
                "pids": _read(self.folders[1] / "pids.max").strip(), "cpu": _read(self.folders[2] / "cpu.shares").strip()}

    def ran_out_of_memory(self) -> bool:
        """Whether the kernel killed one of its processes for the group's memory limit."""
        for line in _read(self.folders[0] / "memory.oom_control").splitlines():
            if line.startswith("oom_kill ") and int(line.split()[1]) > 0:
                return True
        return _read(self.folders[0] / "memory.failcnt").strip() not in ("", "0")

    def teardown(self, expected: dict) -> list[str]:
        """Check the limits against ``expected``, then freeze, kill every process, thaw, and remove the folders.
        Returns what went wrong (a changed limit, a process or a folder left), empty when all is clean."""
        problems = [f"{name} limit changed to {value} (set {expected[name]})"
                    for name, value in self.limits_now().items() if value != expected.get(name, value)]
        freezer = self.folders[3] / "freezer.state"
        _write(freezer, "FROZEN")  # no fork can outrun the kill
        for _ in range(100):
            pids = [int(p) for p in _read(self.folders[1] / "cgroup.procs").split()]
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _write(freezer, "THAWED")  # a frozen process acts on SIGKILL only once thawed
            time.sleep(0.02)
        left = _read(self.folders[1] / "cgroup.procs").split()
        if left:
            problems.append(f"{len(left)} processes survived the teardown")
        for folder in self.folders:
            for _ in range(50):
                try:
                    folder.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:  # EBUSY while the last process is reaped
                    time.sleep(0.02)
            if folder.exists():
                problems.append(f"control group {folder} left behind")
        return problems


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError:
        pass


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def create(name: str, memory_mib: int) -> Group | None:
    """A new group ``name`` limited to ``memory_mib`` MiB (swap included, where the kernel accounts it) and
    :data:`PIDS_MAX` processes, with the default CPU share; ``None`` where groups cannot be made here."""
    if not available():
        return None
    folders = [ROOT / controller / name for controller in CONTROLLERS]
    try:
        for folder in folders:
            folder.mkdir()
        memory = folders[0]
        (memory / "memory.limit_in_bytes").write_text(str(memory_mib * 1024 * 1024))
        if (memory / "memory.memsw.limit_in_bytes").exists():
            (memory / "memory.memsw.limit_in_bytes").write_text(str(memory_mib * 1024 * 1024))
        (folders[1] / "pids.max").write_text(str(PIDS_MAX))
        (folders[2] / "cpu.shares").write_text(CPU_SHARES)
    except OSError:
        Group(folders).teardown({})
        return None
    return Group(folders)


def expected_limits(memory_mib: int) -> dict:
    """What :func:`create` set, as :meth:`Group.limits_now` reads it back."""
    return {"memory": str(memory_mib * 1024 * 1024), "pids": str(PIDS_MAX), "cpu": CPU_SHARES}
