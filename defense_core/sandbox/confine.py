"""What a contained child does to itself before it touches a model: kernel-enforced bounds.

Applied in this order, each one-way (nothing later can lift it):

1. ``PR_SET_PDEATHSIG`` = SIGKILL: the child dies with the process that started it.
2. resource limits (``setrlimit``): data segment (heap and anonymous mappings),
   CPU seconds, size of a file it writes, open files, no core dumps, and no new
   processes (``RLIMIT_NPROC`` is per user, so it is left to seccomp below).
3. ``PR_SET_NO_NEW_PRIVS``: no privilege gain through exec (needed by 4 and 5).
4. **Landlock** (Linux 5.13+): the filesystem view shrinks to read-only access
   to the interpreter, its libraries and the engine's own package, and
   read-write access to the job's scratch directory; with ABI 4 (Linux 6.7+)
   no TCP bind or connect; with ABI 6 (Linux 6.12+) no signals to processes
   outside the sandbox and no abstract UNIX sockets.
5. **seccomp** (libseccomp through ``pyseccomp``, when installed): ``socket``,
   ``execve``/``execveat``, ``fork``/``vfork`` (threads are still allowed),
   ``ptrace``, ``process_vm_readv``/``writev``, ``mount``, ``unshare``/``setns``,
   ``bpf``, ``perf_event_open``, ``io_uring_setup``, ``keyctl`` fail with EPERM.

What could not be applied (an old kernel, no libseccomp) is reported in the
``Confinement`` record, which the supervisor logs and returns; it never fails
silently.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import signal
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38

# Landlock's syscalls have the same numbers on every architecture.
_SYS_LANDLOCK_CREATE_RULESET = 444
_SYS_LANDLOCK_ADD_RULE = 445
_SYS_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1

_FS_EXECUTE = 1 << 0
_FS_WRITE_FILE = 1 << 1
_FS_READ_FILE = 1 << 2
_FS_READ_DIR = 1 << 3
_FS_REMOVE_DIR = 1 << 4
_FS_REMOVE_FILE = 1 << 5
_FS_MAKE_CHAR = 1 << 6
_FS_MAKE_DIR = 1 << 7
_FS_MAKE_REG = 1 << 8
_FS_MAKE_SOCK = 1 << 9
_FS_MAKE_FIFO = 1 << 10
_FS_MAKE_BLOCK = 1 << 11
_FS_MAKE_SYM = 1 << 12
_FS_REFER = 1 << 13  # ABI 2
_FS_TRUNCATE = 1 << 14  # ABI 3
_FS_IOCTL_DEV = 1 << 15  # ABI 5
_NET_BIND_TCP = 1 << 0  # ABI 4
_NET_CONNECT_TCP = 1 << 1
_SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
_SCOPE_SIGNAL = 1 << 1

_FILE_ONLY_RIGHTS = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV
_READ = _FS_READ_FILE | _FS_READ_DIR

# Syscalls refused by the seccomp filter (names as libseccomp knows them).
DENIED_SYSCALLS = (
    "socket", "socketpair", "execve", "execveat", "fork", "vfork", "ptrace",
    "process_vm_readv", "process_vm_writev", "mount", "umount2", "pivot_root", "chroot",
    "unshare", "setns", "bpf", "perf_event_open", "io_uring_setup", "keyctl", "add_key",
    "request_key", "kexec_load", "init_module", "finit_module", "userfaultfd",
)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


@dataclass(frozen=True)
class Bounds:
    """The child's resource limits (bytes, seconds, counts)."""

    memory_bytes: int
    cpu_seconds: int
    file_bytes: int
    open_files: int = 256

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class Confinement:
    """What was enforced in this child, and what could not be (with the reason)."""

    rlimits: dict[str, int] = field(default_factory=dict)
    landlock_abi: int = 0
    landlock: list[str] = field(default_factory=list)  # what Landlock enforces
    seccomp: bool = False
    missing: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, arg: int) -> None:
    if _libc().prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}) failed: {os.strerror(err)}")


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies (and now, if it already has)."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the line above
        os.kill(os.getpid(), signal.SIGKILL)


def set_rlimits(bounds: Bounds, report: Confinement) -> None:
    limits = {
        "RLIMIT_DATA": bounds.memory_bytes,
        "RLIMIT_CPU": bounds.cpu_seconds,
        "RLIMIT_FSIZE": bounds.file_bytes,
        "RLIMIT_NOFILE": bounds.open_files,
        "RLIMIT_CORE": 0,
    }
    for name, value in limits.items():
        which = getattr(resource, name)
        _, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(which, (value, value))
        report.rlimits[name] = value


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 when Landlock is unavailable."""
    if not sys.platform.startswith("linux"):
        return 0
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    version = libc.syscall(ctypes.c_long(_SYS_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0),
                           ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION))
    return max(0, int(version))


def _fs_rights(abi: int) -> int:
    rights = (1 << 13) - 1  # ABI 1: EXECUTE .. MAKE_SYM
    if abi >= 2:
        rights |= _FS_REFER
    if abi >= 3:
        rights |= _FS_TRUNCATE
    if abi >= 5:
        rights |= _FS_IOCTL_DEV
    return rights


def apply_landlock(*, read_only: Iterable[Path], read_write: Iterable[Path], report: Confinement,
                   devices: Iterable[Path] = ()) -> None:
    """Restrict this process's filesystem (and TCP, and signals) to what is listed.

    ``devices`` (GPU device files) are also open to ioctl.
    """
    abi = landlock_abi()
    report.landlock_abi = abi
    if abi < 1:
        report.missing.append("landlock: not offered by this kernel (Linux 5.13+ with landlock in the LSM list)")
        return
    handled_fs = _fs_rights(abi)
    attr = _RulesetAttr(handled_access_fs=handled_fs, handled_access_net=0, scoped=0)
    if abi >= 4:
        attr.handled_access_net = _NET_BIND_TCP | _NET_CONNECT_TCP
    if abi >= 6:
        attr.scoped = _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL
    size = ctypes.sizeof(_RulesetAttr) if abi >= 6 else (16 if abi >= 4 else 8)
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    ruleset = libc.syscall(ctypes.c_long(_SYS_LANDLOCK_CREATE_RULESET), ctypes.byref(attr),
                           ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"landlock_create_ruleset failed: {os.strerror(err)}")
    try:
        rw_rights = handled_fs & ~(_FS_EXECUTE | _FS_MAKE_CHAR | _FS_MAKE_BLOCK | _FS_MAKE_SOCK
                                   | _FS_MAKE_FIFO | _FS_IOCTL_DEV)
        device_rights = _FS_READ_FILE | _FS_WRITE_FILE | _FS_IOCTL_DEV
        rules = ([(p, _READ) for p in read_only] + [(p, rw_rights) for p in read_write]
                 + [(p, device_rights) for p in devices])
        for path, rights in rules:
            _add_path_rule(libc, ruleset, Path(path), rights & handled_fs)
        _prctl(_PR_SET_NO_NEW_PRIVS, 1)
        if libc.syscall(ctypes.c_long(_SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_int(ruleset),
                        ctypes.c_uint32(0)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"landlock_restrict_self failed: {os.strerror(err)}")
    finally:
        os.close(ruleset)
    report.landlock.append("filesystem: read-only interpreter and libraries, read-write scratch only")
    if abi >= 4:
        report.landlock.append("network: no TCP bind or connect")
    else:
        report.missing.append(f"landlock network rules need ABI 4 (this kernel: {abi})")
    if abi >= 6:
        report.landlock.append("scope: no signals outside the sandbox, no abstract UNIX sockets")
    else:
        report.missing.append(f"landlock signal/abstract-socket scoping needs ABI 6 (this kernel: {abi})")


def _add_path_rule(libc: ctypes.CDLL, ruleset: int, path: Path, rights: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return  # a path that does not exist on this host grants nothing
    try:
        if not path.is_dir():
            rights &= _FILE_ONLY_RIGHTS
        rule = _PathBeneathAttr(allowed_access=rights, parent_fd=fd)
        if libc.syscall(ctypes.c_long(_SYS_LANDLOCK_ADD_RULE), ctypes.c_int(ruleset),
                        ctypes.c_int(_LANDLOCK_RULE_PATH_BENEATH), ctypes.byref(rule),
                        ctypes.c_uint32(0)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"landlock_add_rule({path}) failed: {os.strerror(err)}")
    finally:
        os.close(fd)


_SECCOMP: Any = None
_SECCOMP_ERROR = "not loaded"


def preload_seccomp() -> None:
    """Load libseccomp while the filesystem is still open (finding it runs ``ldconfig``)."""
    global _SECCOMP, _SECCOMP_ERROR
    try:
        import pyseccomp
    except Exception as exc:  # not installed, or libseccomp missing from the host
        _SECCOMP_ERROR = f"{type(exc).__name__}: {exc}"
        return
    _SECCOMP = pyseccomp


def apply_seccomp(report: Confinement) -> None:
    """Refuse the syscalls in :data:`DENIED_SYSCALLS` with EPERM (others allowed)."""
    seccomp = _SECCOMP
    if seccomp is None:
        report.missing.append(f"seccomp: pyseccomp/libseccomp unavailable ({_SECCOMP_ERROR})")
        return
    filt = seccomp.SyscallFilter(seccomp.ALLOW)
    for name in DENIED_SYSCALLS:
        try:
            filt.add_rule(seccomp.ERRNO(errno.EPERM), name)
        except Exception:  # a syscall this architecture does not have (fork on aarch64)
            continue
    # clone() without CLONE_THREAD is a fork: refuse it, keep thread creation.
    try:
        filt.add_rule(seccomp.ERRNO(errno.EPERM), "clone",
                      seccomp.Arg(0, seccomp.MASKED_EQ, 0x00010000, 0))
        filt.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")  # glibc falls back to clone
    except Exception:
        report.missing.append("seccomp: clone could not be filtered")
    filt.load()
    report.seccomp = True


def library_paths() -> list[Path]:
    """Read-only paths the interpreter needs: the standard library, site-packages,
    the engine's own package and the system's shared libraries.

    Deliberately not ``sys.path`` as a whole nor the project folder: in a
    development checkout that folder also holds the embedded store and database.
    """
    import sysconfig

    import defense_core

    paths = {Path(v) for k, v in sysconfig.get_paths().items() if k in ("stdlib", "platstdlib", "purelib", "platlib")}
    paths.add(Path(sys.base_prefix) / "lib")  # libpython, when the interpreter links it
    paths.add(Path(defense_core.__file__).resolve().parent)
    for system in ("/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/local/lib",
                   "/etc/ld.so.cache", "/sys/devices/system/cpu", "/proc/cpuinfo", "/dev/urandom",
                   "/dev/null"):
        paths.add(Path(system))
    return sorted(paths)


def gpu_device_paths() -> list[str]:
    """Device files and driver folders a CUDA child needs (empty without NVIDIA devices)."""
    import glob

    paths = sorted(glob.glob("/dev/nvidia*")) + sorted(glob.glob("/dev/dri/*"))
    return paths + [p for p in ("/proc/driver/nvidia", "/sys/bus/pci", "/sys/devices") if os.path.exists(p)]
