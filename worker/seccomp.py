"""A small seccomp filter (classic BPF, installed through ctypes): no network, no io_uring, no metadata changes.

Why not a binding: the official libseccomp Python bindings are not on PyPI (`pip download seccomp` finds
nothing; Debian's python3-seccomp is built for the system interpreter, not this virtualenv), and `pyseccomp`
(0.1.2, January 2021, unmaintained) is a ctypes wrapper that needs libseccomp.so.2 at run time. The filter
needed here is a dozen comparisons; written out it has no dependency, loads in microseconds, and can be read
whole. It knows x86_64 and aarch64; elsewhere `available()` is False and the sandbox says so.

The filter is a deny list on top of Landlock, not an allow list: torch, onnxruntime and the Python runtime
make system calls that change between releases, and an allow list that misses one kills a training job.
What it refuses (errno, never a kill, so the code sees an ordinary OSError):
- socket()/socketpair() for every address family but AF_UNIX (EACCES): no TCP, UDP, raw, netlink or vsock;
  torch and onnxruntime keep working, and they use AF_UNIX only.
- io_uring (EPERM): its IORING_OP_SOCKET would make sockets without calling socket().
- chmod/chown and extended attribute writes (EPERM): Landlock does not cover file metadata, so a same-uid
  child could otherwise chmod a file it cannot open (the database, say).
- truncate(2) by path when Landlock is older than ABI 3 or missing (EPERM): those ABIs do not check it.
- optionally, new processes (fork, vfork, clone without CLONE_THREAD: EPERM; clone3: ENOSYS, so that the C
  library falls back to clone, whose flags the filter can read): for a child that stays root, which
  RLIMIT_NPROC does not bound. Threads are still allowed.
Any other architecture's system calls (a 32-bit binary, x32) kill the process.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from dataclasses import dataclass

AF_UNIX = 1
CLONE_THREAD = 0x00010000
PR_SET_NO_NEW_PRIVS, PR_GET_SECCOMP, PR_SET_SECCOMP = 38, 21, 22
SECCOMP_MODE_FILTER, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC = 2, 1, 1
RET_KILL_PROCESS, RET_ERRNO, RET_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000
LD_ABS_W, JEQ_K, JGE_K, JSET_K, RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
OFF_NR, OFF_ARCH, OFF_ARG0 = 0, 4, 16  # struct seccomp_data; the low half of args[0] (little-endian)


@dataclass(frozen=True)
class Arch:
    name: str
    audit: int
    seccomp_nr: int
    socket: tuple[int, ...]
    io_uring: tuple[int, ...]
    metadata: tuple[int, ...]
    truncate: int
    fork: tuple[int, ...]  # fork and vfork, where the architecture has them
    clone: int
    clone3: int
    x32_bit: int = 0  # x86_64: system calls with this bit set are x32's


ARCHES = {
    "x86_64": Arch(
        "x86_64", 0xC000003E, 317, socket=(41, 53), io_uring=(425, 426, 427),
        # chmod fchmod chown fchown lchown setxattr lsetxattr fsetxattr removexattr lremovexattr
        # fremovexattr fchownat fchmodat fchmodat2 setxattrat removexattrat
        metadata=(90, 91, 92, 93, 94, 188, 189, 190, 197, 198, 199, 260, 268, 452, 463, 466),
        truncate=76, fork=(57, 58), clone=56, clone3=435, x32_bit=0x40000000),
    "aarch64": Arch(
        "aarch64", 0xC00000B7, 277, socket=(198, 199), io_uring=(425, 426, 427),
        # fchmod fchmodat fchownat fchown setxattr lsetxattr fsetxattr removexattr lremovexattr fremovexattr
        # fchmodat2 setxattrat removexattrat
        metadata=(52, 53, 54, 55, 5, 6, 7, 14, 15, 16, 452, 463, 466),
        truncate=45, fork=(), clone=220, clone3=435),
}


class SeccompError(OSError):
    pass


def arch() -> Arch | None:
    machine = platform.machine().lower()
    return ARCHES.get({"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine))


def available() -> bool:
    """A known architecture and a kernel with seccomp filters (not already in strict mode)."""
    if platform.system() != "Linux" or arch() is None:
        return False
    try:
        with open("/proc/self/status") as f:
            if not any(line.startswith("Seccomp:") for line in f):
                return False
    except OSError:
        return False
    return ctypes.CDLL(None, use_errno=True).prctl(PR_GET_SECCOMP, 0, 0, 0, 0) == 0


class _Insn(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_Insn))]


def program(a: Arch, *, deny_truncate: bool, deny_processes: bool) -> list[tuple[int, int, int, int]]:
    """The filter as (code, jt, jf, k) tuples. Jump targets are written as label names and resolved here."""
    code: list[tuple[int, int | str, int | str, int]] = []
    labels: dict[str, int] = {}

    def label(name: str) -> None:
        labels[name] = len(code)

    def ld(offset: int) -> None:
        code.append((LD_ABS_W, 0, 0, offset))

    def jump(op: int, k: int, jt: int | str, jf: int | str = 0) -> None:
        code.append((op, jt, jf, k))

    def ret(value: int) -> None:
        code.append((RET_K, 0, 0, value))

    ld(OFF_ARCH)
    jump(JEQ_K, a.audit, 0, "kill")
    ld(OFF_NR)
    if a.x32_bit:
        jump(JGE_K, a.x32_bit, "kill")
    for nr in a.socket:
        jump(JEQ_K, nr, "socket")
    for nr in (*a.io_uring, *a.metadata, *((a.truncate,) if deny_truncate else ())):
        jump(JEQ_K, nr, "eperm")
    if deny_processes:
        for nr in a.fork:
            jump(JEQ_K, nr, "eperm")
        jump(JEQ_K, a.clone3, "enosys")
        jump(JEQ_K, a.clone, "clone")
    ret(RET_ALLOW)
    label("socket")
    ld(OFF_ARG0)
    jump(JEQ_K, AF_UNIX, "allow", "eacces")
    if deny_processes:
        label("clone")
        ld(OFF_ARG0)
        jump(JSET_K, CLONE_THREAD, "allow", "eperm")
    label("allow")
    ret(RET_ALLOW)
    label("eacces")
    ret(RET_ERRNO | errno.EACCES)
    label("eperm")
    ret(RET_ERRNO | errno.EPERM)
    label("enosys")
    ret(RET_ERRNO | errno.ENOSYS)
    label("kill")
    ret(RET_KILL_PROCESS)

    out: list[tuple[int, int, int, int]] = []
    for i, (op, jt, jf, k) in enumerate(code):
        jt_, jf_ = (labels[t] - i - 1 if isinstance(t, str) else t for t in (jt, jf))
        if not (0 <= jt_ < 256 and 0 <= jf_ < 256):
            raise ValueError("seccomp program: a jump is out of range")
        out.append((op, jt_, jf_, k))
    return out


def install(*, deny_truncate: bool = False, deny_processes: bool = False) -> str:
    """Install the filter on this process (every thread); returns the architecture's name."""
    a = arch()
    if a is None or not available():
        raise SeccompError(errno.ENOSYS, f"no seccomp filter for {platform.machine()} on this kernel")
    insns = program(a, deny_truncate=deny_truncate, deny_processes=deny_processes)
    array = (_Insn * len(insns))(*[_Insn(*t) for t in insns])
    prog = _Prog(len(insns), array)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        e = ctypes.get_errno()
        raise SeccompError(e, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(e)}")
    rc = libc.syscall(ctypes.c_long(a.seccomp_nr), ctypes.c_uint(SECCOMP_SET_MODE_FILTER),
                      ctypes.c_uint(SECCOMP_FILTER_FLAG_TSYNC), ctypes.byref(prog))
    if rc != 0:
        e = ctypes.get_errno()
        if rc > 0:  # TSYNC: the id of a thread that could not be synchronised
            raise SeccompError(errno.EBUSY, f"seccomp: thread {rc} could not take the filter")
        if e != errno.ENOSYS or libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
            e = ctypes.get_errno()
            raise SeccompError(e, f"seccomp: {os.strerror(e)}")
    return a.name
