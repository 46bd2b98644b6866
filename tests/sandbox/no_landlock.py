"""`python no_landlock.py COMMAND...`: run COMMAND where the Landlock system calls fail with ENOSYS.

A kernel without Landlock, made real for one process tree: a seccomp filter (inherited across exec) answers
landlock_create_ruleset, landlock_add_rule and landlock_restrict_self with ENOSYS.
"""

import ctypes
import errno
import os
import sys

from worker.seccomp import JEQ_K, LD_ABS_W, OFF_ARCH, OFF_NR, RET_ALLOW, RET_ERRNO, RET_K, _Insn, _Prog, arch

a = arch()
assert a is not None, "no seccomp support for this architecture"
program = [
    (LD_ABS_W, 0, 0, OFF_ARCH),
    (JEQ_K, 0, 4, a.audit),  # another architecture's call: allow
    (LD_ABS_W, 0, 0, OFF_NR),
    (JEQ_K, 3, 0, 444),
    (JEQ_K, 2, 0, 445),
    (JEQ_K, 1, 0, 446),
    (RET_K, 0, 0, RET_ALLOW),
    (RET_K, 0, 0, RET_ERRNO | errno.ENOSYS),
]
insns = (_Insn * len(program))(*[_Insn(*t) for t in program])
prog = _Prog(len(program), insns)
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:  # NO_NEW_PRIVS, SECCOMP
    raise OSError(ctypes.get_errno(), "could not install the filter")
os.execvp(sys.argv[1], sys.argv[1:])
