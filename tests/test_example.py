"""`kdistill example` writes what README.md shows, and the README's commands on it train a good student.

The README is parsed, not copied: its `kdistill example` and `kdistill run` lines are run as given (from a
temporary folder), its job-spec block is compared with the job.yaml written, and the files it says
`kdistill run` writes are looked for. Changing one side without the other fails here.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from app.cli import cli

README = Path(__file__).resolve().parents[1] / "README.md"


def first_distillation() -> str:
    """The README's "A first distillation" section (up to the next level-2 heading)."""
    text = README.read_text()
    start = text.index("\n## A first distillation\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


def readme_command(verb: str) -> tuple[list[str], str]:
    """The section's one `kdistill VERB` line: its arguments after `kdistill`, and its trailing comment."""
    lines = [line for line in first_distillation().splitlines() if re.match(rf"^\S*kdistill {verb}\b", line)]
    assert len(lines) == 1, f"README.md: expected one `kdistill {verb}` line, found {lines}"
    command, _, comment = lines[0].partition(" #")
    return shlex.split(command)[1:], comment


def readme_job_spec() -> str:
    blocks = re.findall(r"```yaml\n(.*?)```", first_distillation(), flags=re.S)
    assert len(blocks) == 1, f"README.md: expected one yaml block in 'A first distillation', found {len(blocks)}"
    return blocks[0]


def invoke(args: list[str]) -> None:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, f"kdistill {shlex.join(args)} exited {result.exit_code}:\n{result.output}" + (
        f"\n{result.exception!r}" if result.exception and not isinstance(result.exception, SystemExit) else "")


def test_example_writes_the_job_spec_the_readme_shows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from worker.distill.spec import load_spec

    monkeypatch.chdir(tmp_path)
    args, comment = readme_command("example")
    invoke([*args, "--epochs", "1"])  # a 1-epoch teacher: only the files are checked here, not its accuracy
    dest = Path(args[1])

    written, shown = (dest / "job.yaml").read_text(), readme_job_spec()
    assert yaml.safe_load(written) == yaml.safe_load(shown)
    assert written == shown  # comments and layout too: the README shows the file as it is
    listed = re.findall(r"(\S+/[\w.]+)", comment)
    assert listed, comment
    for name in listed:
        assert Path(name).is_file(), f"README.md says `kdistill example` writes {name}"

    spec = load_spec(dest / "job.yaml")  # valid for `kdistill run`, its paths taken from its folder
    assert Path(spec.teacher.path) == (dest / "teacher.safetensors").resolve()
    assert Path(spec.data.path).is_file()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Torch on one thread: these models are tiny, and two threads on two cores shared with other test runs
    made this test take minutes instead of ~15 s."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_the_readme_commands_distil_a_student_that_beats_chance_and_its_baseline(tmp_path: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch):
    import onnxruntime as ort

    from worker.distill.spec import load_spec

    monkeypatch.chdir(tmp_path)
    example, _ = readme_command("example")
    run, _ = readme_command("run")
    invoke(example)  # as the README gives it: the real teacher
    invoke(run)

    out = Path(run[run.index("--out") + 1]) if "--out" in run else Path(load_spec(Path(run[1])).output_dir)
    section = first_distillation()
    said = section[section.index("kdistill run"):section.index("```yaml")]
    files = re.findall(r"`((?:student|metadata)\.[\w.]+)`", said)
    assert "student.onnx" in files and "metadata.json" in files, said
    for name in files:
        assert (out / name).is_file(), f"README.md says `kdistill run` writes {name}"

    m = json.loads((out / "metadata.json").read_text())["metrics"]
    print({k: v for k, v in m.items() if k not in ("per_class", "confusion")})
    assert m["student_accuracy"] >= 0.9, m  # 10 classes: chance is 0.1
    # the confusion matrix is of the split the top-level figures come from: its diagonal is that accuracy
    confusion = np.array(m["confusion"]["matrix"])
    assert m["confusion"]["split"] == m["accuracy_split"] == "test" and confusion.shape == (10, 10)
    assert confusion.sum() == m["test"]["n"]
    assert np.trace(confusion) / confusion.sum() == pytest.approx(m["student_accuracy"])
    assert [c["support"] for c in m["per_class"]] == confusion.sum(axis=1).tolist()
    assert m["student_accuracy"] > m["baseline_accuracy"], m  # distillation beats the same student on labels alone

    # the exported file on the 540 held-out images no run has seen
    test = np.load(Path(example[1]) / "digits_test.npz")
    x = (test["x"][:, None].astype(np.float32) / 255 - 0.3) / 0.37
    session = ort.InferenceSession(str(out / "student.onnx"))
    held_out = float((session.run(None, {session.get_inputs()[0].name: x})[0].argmax(1) == test["y"]).mean())
    assert held_out >= 0.9, held_out
