"""Structured logs: one JSON object per line, carrying the job id where there is one."""

from __future__ import annotations

import json
import logging

from app.logs import setup_logging


def test_json_lines_carry_the_job_id(capsys):
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        setup_logging("json", "INFO")
        log = logging.LoggerAdapter(logging.getLogger("kdistill.worker"), {"job_id": "job_42", "worker": "w@h"})
        log.info("job %s succeeded", "job_42")
        logging.getLogger("kdistill.api").debug("not at INFO")
    finally:
        root.handlers[:] = saved_handlers  # pytest's own log capture lives there
        root.setLevel(saved_level)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1
    assert lines[0]["job_id"] == "job_42" and lines[0]["worker"] == "w@h"
    assert lines[0]["level"] == "INFO" and lines[0]["logger"] == "kdistill.worker"
    assert lines[0]["message"] == "job job_42 succeeded" and "time" in lines[0]
