"""`python -m worker.with_parent PARENT_PID PROGRAM [ARGS...]`: run PROGRAM so that it dies with PARENT_PID.

PR_SET_PDEATHSIG survives exec, so it is set here and the program is exec'd in this process's place. That
gives a launcher's children the die-with-parent guarantee without running Python between fork and exec in
the parent (a pre-exec hook, which can deadlock in a parent that has threads).
"""

from __future__ import annotations

import os
import sys

from worker.sandbox import die_with_parent


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[0].isdigit():
        print("usage: python -m worker.with_parent PARENT_PID PROGRAM [ARGS...]", file=sys.stderr)
        return 2
    die_with_parent()
    if os.getppid() != int(argv[0]):  # the parent died before the signal was armed: nobody wants us
        return 1
    os.execvp(argv[1], argv[1:])
    return 1  # not reached: execvp replaces this process or raises


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
