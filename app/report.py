"""A job's metrics as a person reads them: accuracy with its interval and the gain, then size and speed."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from rich.table import Table


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
