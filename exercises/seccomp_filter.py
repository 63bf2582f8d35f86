"""The system calls a sandboxed submission may not make: a seccomp filter built with libseccomp.

bubblewrap applies the filter (``--seccomp FD``) to the submission's process just before it runs
Python; every process it starts inherits it, and no process can remove it. What it refuses, and why:

- new namespaces: ``unshare``, ``setns`` and ``clone`` with any ``CLONE_NEW*`` flag. A new user
  namespace would give the submission every capability inside it (the attack of issue 26:
  ``unshare -U -r -m -C`` then mounting the host's cgroup v1 controllers). ``clone3`` passes its
  flags in memory, where a filter cannot read them, so it is refused with ``ENOSYS``: the C library
  then falls back to ``clone``, whose flags are checked;
- mounts of any kind (``mount``, ``umount2``, ``pivot_root``, ``chroot`` and the new mount API);
- looking at or steering other processes: ``ptrace``, ``process_vm_readv``/``writev``, ``kcmp``,
  ``pidfd_getfd``, ``perf_event_open``;
- the kernel's less-travelled paths that have carried escapes: ``bpf``, ``userfaultfd``,
  ``keyctl``/``add_key``/``request_key``, ``open_by_handle_at``, ``io_uring_*``, kernel modules,
  ``kexec``, ``personality`` changes, swap, reboot, the kernel log, accounting, quotas, I/O ports.

Each is answered ``EPERM`` (``ENOSYS`` for ``clone3``): Python sees an ordinary ``OSError``. In
*single-process* mode (a grader that cannot make a control group, see ``sandbox.memory_bound``) it
also refuses ``fork``, ``vfork`` and ``clone`` without ``CLONE_THREAD``: threads share one address
space, so the per-process memory limit then bounds the whole submission.

Needs ``pyseccomp`` (ctypes bindings to the system's ``libseccomp.so.2``); :func:`available` says
whether both are here, and the grader refuses to claim a filter it cannot build.
"""

from __future__ import annotations

import errno
import functools
import os

REFUSED = (
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "fsopen", "fsconfig", "fsmount", "fspick",
    "move_mount", "open_tree", "mount_setattr", "ptrace", "process_vm_readv", "process_vm_writev", "kcmp",
    "pidfd_getfd", "perf_event_open", "bpf", "userfaultfd", "keyctl", "add_key", "request_key",
    "open_by_handle_at", "name_to_handle_at", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "swapon", "swapoff", "reboot",
    "syslog", "acct", "quotactl", "iopl", "ioperm", "lookup_dcookie", "vhangup", "settimeofday", "clock_settime",
    "adjtimex", "clock_adjtime",
)
CLONE_NAMESPACE_FLAGS = {  # from <linux/sched.h>
    "CLONE_NEWNS": 0x00020000, "CLONE_NEWCGROUP": 0x02000000, "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000, "CLONE_NEWUSER": 0x10000000, "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000, "CLONE_NEWTIME": 0x00000080,
}
CLONE_THREAD = 0x00010000
PERSONALITY_QUERY = 0xFFFFFFFF  # personality(0xffffffff) only reads the current one: allowed


@functools.lru_cache(maxsize=None)
def _library():
    try:
        import pyseccomp
        pyseccomp.SyscallFilter(pyseccomp.ALLOW)  # loads libseccomp.so.2: a missing library fails here
        return pyseccomp
    except (ImportError, OSError, RuntimeError):
        return None


def available() -> bool:
    """Whether a filter can be built here (``pyseccomp`` installed and ``libseccomp.so.2`` found)."""
    return _library() is not None


def _add(library, rules, action, name: str, *args) -> None:
    try:
        rules.add_rule(action, name, *args)
    except (OSError, RuntimeError, ValueError):  # a call this kernel/libseccomp does not know: nothing to refuse
        pass


def filter_fd(single_process: bool) -> int:
    """A file descriptor (a memfd at offset 0) holding the compiled BPF program for ``bwrap --seccomp``."""
    library = _library()
    if library is None:
        raise RuntimeError("pyseccomp or libseccomp.so.2 is missing: pip install pyseccomp "
                           "(in the teach extra) and apt-get install libseccomp2")
    refuse, rules = library.ERRNO(errno.EPERM), library.SyscallFilter(library.ALLOW)
    for name in REFUSED:
        _add(library, rules, refuse, name)
    _add(library, rules, library.ERRNO(errno.ENOSYS), "clone3")
    for flag in CLONE_NAMESPACE_FLAGS.values():  # rules of one call are OR-ed: any such flag refuses
        _add(library, rules, refuse, "clone", library.Arg(0, library.MASKED_EQ, flag, flag))
    _add(library, rules, refuse, "personality", library.Arg(0, library.NE, PERSONALITY_QUERY))
    if single_process:
        for name in ("fork", "vfork"):
            _add(library, rules, refuse, name)
        _add(library, rules, refuse, "clone", library.Arg(0, library.MASKED_EQ, CLONE_THREAD, 0))
    descriptor = os.memfd_create("gptlora-seccomp", 0)  # inherited by bwrap only, never on disk
    with os.fdopen(os.dup(descriptor), "wb") as file:
        rules.export_bpf(file)
    os.lseek(descriptor, 0, os.SEEK_SET)
    return descriptor
