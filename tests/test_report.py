"""The CLI's result tables: scores with intervals, then teacher-vs-student size and speed."""

from __future__ import annotations

from rich.console import Console

from app.report import result_tables

FINAL = {
    "accuracy_split": "test", "test": {"n": 540}, "student_accuracy": 0.987, "student_accuracy_ci": [0.9735, 0.9937],
    "teacher_accuracy": 0.9833, "teacher_accuracy_ci": [0.9686, 0.9912], "baseline_accuracy": 0.9481,
    "baseline_accuracy_ci": [0.9261, 0.9639], "gain": 0.0389, "gain_ci": [0.0222, 0.0574], "gain_p_value": 1.9e-5,
    "best_epoch": 12, "epochs": 20, "teacher_check": {"n": 500, "accuracy": 0.992},
    "efficiency": {"runtime": "onnxruntime", "threads": 2, "compression": 3.501, "size_ratio": 3.177,
                   "speedup": {"batch_1": 2.397, "batch_32": 3.197}, "notes": ["the teacher ran in chunks of 1"],
                   "teacher": {"parameters": 272186, "macs": 2532992, "file_size_bytes": 1106120,
                               "latency_ms": {"batch_1": 0.088, "batch_32": 0.819}},
                   "student": {"parameters": 77754, "macs": 763520, "file_size_bytes": 348114,
                               "latency_ms": {"batch_1": 0.037, "batch_32": 0.256}}},
}


def render(metrics: dict) -> str:
    console = Console(record=True, width=80)
    for table in result_tables(metrics):
        console.print(table)
    return console.export_text()


def test_a_finished_job_shows_its_split_intervals_gain_and_size_and_speed():
    text = render(FINAL)
    assert "accuracy on the test split, 540 samples" in text
    assert "0.9735 to 0.9937" in text and "+0.0222 to +0.0574" in text and "p = 1.9e-05" in text
    assert "272.19k" in text and "3.50x" in text and "0.819 ms" in text and "3.20x" in text
    assert "the teacher ran in chunks of 1" in text
    assert "0.9920 on 500 labelled samples" in text


def test_validation_scores_say_they_are_optimistic():
    m = dict(FINAL, accuracy_split="validation", validation={"n": 100}, efficiency=None)
    text = render(m)
    assert "validation split, 100 samples" in text and "optimistic" in text and "latency" not in text


def test_a_running_job_shows_plain_rows():
    text = render({"student_accuracy": 0.91, "epoch": 3, "accuracy_split": "validation"})
    assert "0.9100" in text and "epoch" in text and "95% interval" not in text
    assert render({}) == ""
