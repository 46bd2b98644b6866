"""A checkpoint belongs to one run: the fingerprint follows the inputs' contents, not their paths."""

from __future__ import annotations

import pytest

from worker.distill.errors import ConfigError
from worker.distill.runner import fingerprint
from worker.distill.spec import DataSpec, Hyperparameters, JobSpec, StudentSpec, TeacherSpec, parse_model


def spec_for(teacher, data, weights=None, **hp) -> JobSpec:
    return JobSpec(teacher=TeacherSpec(path=str(teacher), arch="resnet8"),
                   student=StudentSpec(arch="resnet8", weights=str(weights) if weights else None),
                   data=DataSpec(path=str(data)), hyperparameters=Hyperparameters(**hp))


@pytest.fixture()
def files(tmp_path):
    (tmp_path / "t.safetensors").write_bytes(b"teacher v1")
    (tmp_path / "d.npz").write_bytes(b"data v1")
    (tmp_path / "w.safetensors").write_bytes(b"weights v1")
    return tmp_path


def test_same_contents_elsewhere_is_the_same_run(files, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere")
    for name in ("t.safetensors", "d.npz"):
        (other / name).write_bytes((files / name).read_bytes())
    assert fingerprint(spec_for(files / "t.safetensors", files / "d.npz")) == \
        fingerprint(spec_for(other / "t.safetensors", other / "d.npz"))


@pytest.mark.parametrize("changed", ["t.safetensors", "d.npz", "w.safetensors"])
def test_new_contents_under_the_same_path_are_another_run(files, changed):
    spec = spec_for(files / "t.safetensors", files / "d.npz", files / "w.safetensors")
    before = fingerprint(spec)
    (files / changed).write_bytes(b"retrained")
    assert fingerprint(spec) != before


def test_a_dataset_folder_counts_by_its_files(files):
    folder = files / "folder"
    (folder / "train" / "a").mkdir(parents=True)
    (folder / "train" / "a" / "1.png").write_bytes(b"x")
    spec = spec_for(files / "t.safetensors", folder)
    before = fingerprint(spec)
    (folder / "train" / "a" / "1.png").write_bytes(b"y")
    assert fingerprint(spec) != before


def test_settings_that_change_training_change_the_run(files):
    base = spec_for(files / "t.safetensors", files / "d.npz")
    assert fingerprint(base) != fingerprint(spec_for(files / "t.safetensors", files / "d.npz", seed=1))
    assert fingerprint(base) != fingerprint(base.model_copy(update={
        "data": base.data.model_copy(update={"test_fraction": 0.1})}))
    assert fingerprint(base) != fingerprint(base.model_copy(update={
        "teacher": base.teacher.model_copy(update={"classes": ["a", "b"]})}))


@pytest.mark.parametrize("seed", [-1, 2**31])
def test_seed_out_of_range_is_a_config_error_naming_the_field(seed):
    with pytest.raises(ConfigError) as err:
        parse_model(Hyperparameters, {"seed": seed}, prefix="hyperparameters")
    assert err.value.field == "hyperparameters.seed" and err.value.code == "invalid_hyperparameter"


def test_zero_class_weight_is_refused():
    with pytest.raises(ConfigError) as err:
        parse_model(Hyperparameters, {"class_weights": [1.0, 0.0]}, prefix="hyperparameters")
    assert err.value.field == "hyperparameters.class_weights" and "class 1 has 0.0" in err.value.message


def test_test_and_val_fractions_must_leave_training_data():
    with pytest.raises(ConfigError) as err:
        parse_model(DataSpec, {"path": "x", "val_fraction": 0.5, "test_fraction": 0.5}, prefix="data")
    assert err.value.field == "data.test_fraction" and "below 1" in err.value.message
