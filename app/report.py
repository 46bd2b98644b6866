"""What the CLI shows: a job's metrics as a person reads them (accuracy with its interval and the gain, then
size and speed), the lists of jobs, teachers, datasets and sweeps, and a job's progress as one plain line."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any

from rich.console import Console
from rich.table import Column, Table

# Columns a piped table would otherwise cut at 80: no limit but this, so ids and statuses reach `grep` whole
UNLIMITED_WIDTH = 100_000


def stdout_console() -> Console:
    """A console on stdout: the terminal's width on a terminal, else no width limit."""
    return Console(width=None if sys.stdout.isatty() else UNLIMITED_WIDTH)


def stderr_console() -> Console:
    """A console on stderr (messages, progress): the terminal's width on a terminal, else no width limit."""
    return Console(stderr=True, width=None if sys.stderr.isatty() else UNLIMITED_WIDTH)


def _whole(name: str, min_width: int | None = None) -> Column:
    """A column never cut with an ellipsis: on a terminal too narrow its values fold onto a second line."""
    return Column(name, no_wrap=True, overflow="fold", min_width=min_width)


def jobs_table(jobs: Iterable[dict[str, Any]]) -> Table:
    """`kdistill jobs`: one row per job."""
    table = Table(_whole("id", 28), _whole("status", 9), "student", "progress", "student acc", "created")
    for job in jobs:
        acc = (job.get("metrics") or {}).get("student_accuracy")
        table.add_row(job["id"], job["status"], job["request"]["student"]["arch"],
                      f"{100 * ((job.get('progress') or {}).get('fraction') or 0):.0f}%",
                      f"{acc:.4f}" if isinstance(acc, float) else "", _when(job["created_at"]))
    return table


def teachers_table(teachers: Iterable[dict[str, Any]]) -> Table:
    """`kdistill teachers`: one row per teacher."""
    table = Table(_whole("id", 28), "file", "format", "arch", "classes", "input", "size", "created")
    for t in teachers:
        size = t.get("input_size") or []
        shape = f"{t['input_channels']}x{size[0]}x{size[-1]}" if size else str(t["input_channels"])
        table.add_row(t["id"], t["filename"], t["format"], t.get("arch") or "-", str(t["num_classes"]), shape,
                      _bytes(t.get("size_bytes")), _when(t["created_at"]))
    return table


def datasets_table(datasets: Iterable[dict[str, Any]]) -> Table:
    """`kdistill datasets`: one row per dataset, with its splits."""
    table = Table(_whole("id", 28), "file", "format", "classes", "train", "val", "test", "unlabeled", "size",
                  "created")
    for d in datasets:
        table.add_row(d["id"], d["filename"], d["format"], str(d["num_classes"]), str(d["num_train"]),
                      str(d["num_val"]), str(d.get("num_test") or 0), str(d["num_unlabeled"]),
                      _bytes(d.get("size_bytes")), _when(d["created_at"]))
    return table


def sweeps_table(sweeps: Iterable[dict[str, Any]]) -> Table:
    """`kdistill sweep list`: one row per sweep."""
    table = Table(_whole("id", 28), _whole("status", 9), "student", "trials", "best", "created")
    for s in sweeps:
        table.add_row(s["id"], s["status"], s["request"]["student"]["arch"], f"{s['trials_started']}/{s['max_trials']}",
                      f"{s['best_value']:.4f}" if s.get("best_value") is not None else "", _when(s["created_at"]))
    return table


def progress_line(job: dict[str, Any]) -> str:
    """A job's state as one plain line, e.g. `job_x running student epoch 3/10 41% loss 0.4321 eta 0:12`."""
    parts = [job["id"], job["status"]]
    if job.get("phase") and job["phase"] != job["status"]:
        parts.append(f"({job['phase']})")
    p = job.get("progress") or {}
    if p.get("epochs"):
        parts.append(f"{p.get('run') or 'student'} epoch {p.get('epoch', 0)}/{p['epochs']}")
    if job["status"] == "running" or p.get("fraction"):
        parts.append(f"{100 * (p.get('fraction') or 0):.0f}%")
    if p.get("loss") is not None:
        parts.append(f"loss {p['loss']:.4f}")
    if p.get("eta_seconds") is not None and job["status"] == "running":
        parts.append(f"eta {duration(p['eta_seconds'])}")
    return " ".join(parts)


def duration(seconds: float | None) -> str:
    """Seconds as m:ss, or h:mm:ss from an hour on."""
    if seconds is None:
        return ""
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _when(t: Any) -> str:
    return str(t)[:19]


def result_tables(metrics: dict[str, Any]) -> list[Table]:
    """Tables for a finished job's metrics (scores, size and speed, the rest); plain rows while it runs."""
    if "accuracy_split" not in metrics or "student_accuracy_ci" not in metrics:
        return [_plain(metrics)] if metrics else []
    tables = [_scores(metrics)]
    if metrics.get("efficiency"):
        tables.append(_efficiency(metrics["efficiency"]))
    tables.append(_plain({k: metrics.get(k) for k in ("best_epoch", "epochs", "train_loss", "resumed_from_epoch")
                          if metrics.get(k) is not None} | _check(metrics.get("teacher_check"))))
    return tables


def _scores(m: dict[str, Any]) -> Table:
    split = m["accuracy_split"]
    n = (m.get(split) or {}).get("n")
    note = "" if split == "test" else " (no test split: validation also picked the epoch, so this is optimistic)"
    table = Table("model", "accuracy", "95% interval", title=f"accuracy on the {split} split, {n} samples{note}")
    for who in ("student", "teacher", "baseline"):
        if m.get(f"{who}_accuracy") is not None:
            lo, hi = m.get(f"{who}_accuracy_ci") or (None, None)
            label = {"baseline": "student on labels alone"}.get(who, who)
            table.add_row(label, _num(m[f"{who}_accuracy"]), _interval(lo, hi))
    if m.get("gain") is not None:
        lo, hi = m.get("gain_ci") or (None, None)
        table.add_row("gain from distillation", f"{m['gain']:+.4f}", _interval(lo, hi, signed=True))
        if m.get("gain_p_value") is not None:
            table.caption = f"gain: paired bootstrap interval; McNemar's test p = {m['gain_p_value']:.2g}"
    return table


def _efficiency(e: dict[str, Any]) -> Table:
    t, s = e.get("teacher") or {}, e.get("student") or {}
    runtime = f"{e.get('runtime')}, {e.get('threads')} CPU threads"
    table = Table("", "teacher", "student", "teacher / student", title=f"size and speed ({runtime})")
    table.add_row("parameters", _count(t.get("parameters")), _count(s.get("parameters")), _ratio(e.get("compression")))
    table.add_row("MACs per image", _count(t.get("macs")), _count(s.get("macs")),
                  _ratio(_div(t.get("macs"), s.get("macs"))))
    table.add_row("file size", _bytes(t.get("file_size_bytes")), _bytes(s.get("file_size_bytes")),
                  _ratio(e.get("size_ratio")))
    for batch in ("batch_1", "batch_32"):
        table.add_row(f"latency, {batch.replace('_', ' ')}", _ms((t.get("latency_ms") or {}).get(batch)),
                      _ms((s.get("latency_ms") or {}).get(batch)), _ratio((e.get("speedup") or {}).get(batch)))
    for note in e.get("notes") or []:
        table.caption = (table.caption + "; " if table.caption else "") + str(note)
    return table


def _check(check: dict[str, Any] | None) -> dict[str, Any]:
    if not check:
        return {}
    return {"teacher check": f"{check['accuracy']:.4f} on {check['n']} labelled samples"}


def _plain(metrics: dict[str, Any]) -> Table:
    table = Table("metric", "value")
    for k, v in _rows(metrics):
        table.add_row(k, v)
    return table


def _rows(metrics: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for k, v in metrics.items():
        if not isinstance(v, dict | list):
            yield k, _num(v) if isinstance(v, float) else str(v)


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _interval(lo: float | None, hi: float | None, *, signed: bool = False) -> str:
    if lo is None or hi is None:
        return "-"
    return f"{lo:+.4f} to {hi:+.4f}" if signed else f"{lo:.4f} to {hi:.4f}"


def _count(v: int | None) -> str:
    if v is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if v >= size:
            return f"{v / size:.2f}{unit}"
    return str(v)


def _bytes(v: int | None) -> str:
    if v is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if v >= size:
            return f"{v / size:.2f} {unit}"
    return f"{v} B"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f} ms"


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"
