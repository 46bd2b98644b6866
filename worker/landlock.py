"""Landlock (Linux 5.13+) through ctypes: limit this process and its future children to a set of paths.

Why ctypes and not a package: the PyPI bindings checked were `landlock` (only dev releases, 1.0.0.dev5),
`py-landlock` 0.1.1 and `landlockpy` 0.2.0 (young, one author each, no release history). The kernel
interface is three system calls and two structs, stable and versioned by an ABI number; a hundred lines here
are easier to audit than a dependency, and they need nothing but the C library.

Use: `abi_version()` tells what the kernel offers (0: nothing); `restrict(rules, ...)` builds a ruleset that
handles every right the running ABI knows (rights of a newer ABI are left out, rights an older ABI lacks are
not asked for), adds one rule per existing path, sets no_new_privs and restricts the calling thread. Call it
while the process has one thread: a restriction applies to the caller and the processes and threads it
starts afterwards, not to threads already running. What older ABIs cannot restrict: before ABI 2, moving or
linking a file into another folder is always refused; before ABI 3, truncate(2) is not checked (the seccomp
filter of worker.sandbox refuses it then); before ABI 4, TCP is not covered (seccomp is); before ABI 5,
ioctl on devices is not covered; before ABI 6, abstract UNIX sockets and signals are not scoped.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import stat
from collections.abc import Iterable

# System call numbers: the same on every architecture (they were added after the tables were unified).
SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446
CREATE_RULESET_VERSION = 1 << 0
RULE_PATH_BENEATH = 1
PR_SET_NO_NEW_PRIVS = 38

# Filesystem rights (include/uapi/linux/landlock.h).
EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
READ_FILE = 1 << 2
READ_DIR = 1 << 3
REMOVE_DIR = 1 << 4
REMOVE_FILE = 1 << 5
MAKE_CHAR = 1 << 6
MAKE_DIR = 1 << 7
MAKE_REG = 1 << 8
MAKE_SOCK = 1 << 9
MAKE_FIFO = 1 << 10
MAKE_BLOCK = 1 << 11
MAKE_SYM = 1 << 12
REFER = 1 << 13  # ABI 2
TRUNCATE = 1 << 14  # ABI 3
IOCTL_DEV = 1 << 15  # ABI 5
# Network rights (ABI 4): handled with no rule, they refuse every TCP bind and connect.
NET_BIND_TCP = 1 << 0
NET_CONNECT_TCP = 1 << 1
# Scopes (ABI 6): no abstract UNIX socket or signal reaches a process outside the sandbox.
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0
SCOPE_SIGNAL = 1 << 1

FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1, 5: (1 << 16) - 1}
# The rights a rule on a file (not a folder) may carry; others make landlock_add_rule fail with EINVAL.
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV

# What the sandbox grants, by kind of path.
READ = READ_FILE | READ_DIR
EXEC = READ | EXECUTE
# A job folder: files and folders may be made, written, removed and renamed inside it; no symlinks, FIFOs,
# sockets or device nodes, which the supervisor could trip over when it reads the folder afterwards.
WRITE = READ | WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE_DIR | MAKE_REG | REFER | TRUNCATE
DEVICE = READ_FILE | WRITE_FILE | IOCTL_DEV


class LandlockError(OSError):
    pass


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def abi_version() -> int:
    """The Landlock ABI this kernel offers: 0 when it has none, or it is switched off, or a container's
    seccomp profile refuses the system call."""
    if platform.system() != "Linux":
        return 0
    libc = _libc()
    n = libc.syscall(ctypes.c_long(SYS_CREATE_RULESET), None, ctypes.c_size_t(0),
                     ctypes.c_uint32(CREATE_RULESET_VERSION))
    return max(int(n), 0)


def fs_rights(abi: int) -> int:
    return FS_BY_ABI[min(abi, 5)] if abi >= 1 else 0


def restrict(rules: Iterable[tuple[str, int]], *, deny_tcp: bool = True, scope: bool = True,
             abi: int | None = None) -> int:
    """Allow only `rules` ((path, rights) pairs; missing paths are skipped) from now on, for this thread and
    what it starts; refuse TCP bind/connect (ABI 4+) and scope abstract UNIX sockets and signals (ABI 6+).
    `abi` caps the ABI used (as on an older kernel). Returns the ABI used. Raises LandlockError when the
    kernel has no Landlock or a step fails."""
    abi = min(abi_version(), abi or 1 << 30)
    if abi < 1:
        raise LandlockError(errno.ENOSYS, "Landlock is not available on this kernel")
    handled = fs_rights(abi)
    attr = _RulesetAttr(handled, 0, 0)
    size = 8
    if abi >= 4:
        attr.handled_access_net = NET_BIND_TCP | NET_CONNECT_TCP if deny_tcp else 0
        size = 16
    if abi >= 6:
        attr.scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if scope else 0
        size = 24
    libc = _libc()
    fd = libc.syscall(ctypes.c_long(SYS_CREATE_RULESET), ctypes.byref(attr), ctypes.c_size_t(size),
                      ctypes.c_uint32(0))
    if fd < 0:
        e = ctypes.get_errno()
        raise LandlockError(e, f"landlock_create_ruleset: {os.strerror(e)}")
    try:
        merged: dict[str, int] = {}
        for path, rights in rules:
            merged[path] = merged.get(path, 0) | rights
        for path, rights in merged.items():
            _add_rule(libc, fd, path, rights & handled)
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            e = ctypes.get_errno()
            raise LandlockError(e, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(e)}")
        if libc.syscall(ctypes.c_long(SYS_RESTRICT_SELF), ctypes.c_int(fd), ctypes.c_uint32(0)) != 0:
            e = ctypes.get_errno()
            raise LandlockError(e, f"landlock_restrict_self: {os.strerror(e)}")
    finally:
        os.close(fd)
    return abi


def _add_rule(libc: ctypes.CDLL, ruleset_fd: int, path: str, rights: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # e.g. /lib64 on arm64, or a device this host lacks
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            rights &= FILE_RIGHTS
        if not rights:
            return
        rule = _PathBeneathAttr(rights, fd)
        if libc.syscall(ctypes.c_long(SYS_ADD_RULE), ctypes.c_int(ruleset_fd), ctypes.c_int(RULE_PATH_BENEATH),
                        ctypes.byref(rule), ctypes.c_uint32(0)) != 0:
            e = ctypes.get_errno()
            raise LandlockError(e, f"landlock_add_rule({path}): {os.strerror(e)}")
    finally:
        os.close(fd)
