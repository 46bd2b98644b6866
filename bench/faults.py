"""Fault figures: runs the fault suite (tests/faults: real uvicorn, `kdistill worker`s, PostgreSQL and a
private Redis at production default timings) and prints one Markdown line per fault: recovery seconds, jobs,
lost, duplicate runs and a note. The exit status is pytest's.

    python bench/faults.py                   # every fault test
    python bench/faults.py -k redis          # extra arguments go to pytest
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests" / "faults"), str(REPO / "tests")]

from harness import markdown_table  # noqa: E402  (needs the path above)


def main(argv: list[str] | None = None) -> int:
    extra = sys.argv[1:] if argv is None else argv
    with tempfile.TemporaryDirectory(prefix="kdistill-faults-") as tmp:
        report = Path(tmp) / "faults.json"
        env = {**os.environ, "KDISTILL_FAULTS_REPORT": str(report)}
        code = subprocess.call([sys.executable, "-m", "pytest", "tests/faults", "-q", "-p", "no:cacheprovider",
                                *extra], cwd=REPO, env=env)
        rows = json.loads(report.read_text()) if report.exists() else []
    print()
    print(markdown_table(rows) if rows else "no fault figures were recorded")
    return code


if __name__ == "__main__":
    sys.exit(main())
