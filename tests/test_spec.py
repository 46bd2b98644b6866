"""Job specs: out-of-range settings become ConfigErrors with a stable code and the offending field."""

import json

import pytest

from worker.distill.errors import ConfigError
from worker.distill.spec import Hyperparameters, InputSpec, JobSpec, load_spec, parse_model

BASE = {"teacher": {"path": "t.safetensors", "arch": "resnet20"}, "student": {"arch": "resnet8"},
        "data": {"path": "d.npz"}}


@pytest.mark.parametrize(("field", "value"), [
    ("temperature", 0), ("temperature", -1.0), ("alpha", 1.01), ("alpha", -0.5), ("epochs", 0),
    ("batch_size", 0), ("learning_rate", 0.0), ("label_smoothing", 1.0), ("optimizer", "lbfgs"),
    ("scheduler", "plateau"), ("distillation", "medium"), ("weight_decay", -1e-4), ("grad_clip", 0),
    ("device", "tpu"), ("precision", "fp8"), ("momentum", 1.0),
])
def test_out_of_range_hyperparameters_name_the_field(field, value):
    with pytest.raises(ConfigError) as err:
        parse_model(JobSpec, {**BASE, "hyperparameters": {field: value}})
    assert err.value.code == "invalid_hyperparameter"
    assert err.value.field == f"hyperparameters.{field}"
    assert field in err.value.message


def test_warmup_must_end_before_training_does():
    with pytest.raises(ConfigError) as err:
        parse_model(JobSpec, {**BASE, "hyperparameters": {"epochs": 3, "warmup_epochs": 3}})
    assert "warmup_epochs" in err.value.message


def test_unknown_keys_are_refused_rather_than_ignored():
    with pytest.raises(ConfigError) as err:
        parse_model(JobSpec, {**BASE, "hyperparameters": {"temprature": 3}})
    assert err.value.field == "hyperparameters.temprature"


def test_missing_teacher_is_invalid_config():
    with pytest.raises(ConfigError) as err:
        parse_model(JobSpec, {k: v for k, v in BASE.items() if k != "teacher"})
    assert err.value.code == "invalid_config"
    assert err.value.field == "teacher"


def test_input_spec_accepts_csv_and_square_sizes():
    spec = InputSpec(channels=3, size=32, mean="0.5, 0.4,0.3", std="0.2,0.2,0.2")
    assert spec.size == (32, 32)
    assert spec.resolved_mean() == (0.5, 0.4, 0.3)
    grey = InputSpec(channels=1, size=(8, 8))
    assert grey.resolved_mean() == (0.5,) and grey.resolved_std() == (0.5,)


@pytest.mark.parametrize("bad", [{"mean": "0.1,0.2"}, {"std": "0,1,1"}, {"mean": "a,b,c"}, {"channels": 5}])
def test_input_spec_refuses_bad_normalisation(bad):
    with pytest.raises(ConfigError):
        parse_model(InputSpec, {"channels": 3, **bad})


def test_defaults_follow_the_contract():
    hp = Hyperparameters()
    assert (hp.temperature, hp.alpha, hp.distillation, hp.optimizer, hp.scheduler) == (4.0, 0.9, "soft", "sgd",
                                                                                         "cosine")


def test_load_spec_resolves_paths_from_the_spec_folder(tmp_path):
    (tmp_path / "job.json").write_text(json.dumps(BASE))
    spec = load_spec(tmp_path / "job.json")
    assert spec.teacher.path == str(tmp_path / "t.safetensors")
    assert spec.data.path == str(tmp_path / "d.npz")
    assert spec.output_dir == str(tmp_path / "artifacts")


def test_load_spec_reports_unreadable_files(tmp_path):
    (tmp_path / "job.yaml").write_text("teacher: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_spec(tmp_path / "job.yaml")
    with pytest.raises(ConfigError) as err:
        load_spec(tmp_path / "missing.yaml")
    assert err.value.code == "spec_not_found"
