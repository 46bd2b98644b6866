"""The distillation methods and export formats at the API's edge: what is refused, with which field, and
what a valid request echoes."""

from __future__ import annotations

import pytest
from api_support import GREY8, Env, Uploaded, created, job_body


@pytest.fixture(scope="module")
def onnx_teacher(env: Env, onnx_file: bytes) -> Uploaded:
    return created(env.upload_teacher(onnx_file, "tiny.onnx", **GREY8), onnx_file)


def test_feature_distillation_with_an_onnx_teacher_is_422_naming_the_field(env: Env, onnx_teacher: Uploaded,
                                                                           dataset_a: Uploaded) -> None:
    body = job_body(onnx_teacher.id, dataset_a.id, hyperparameters={"epochs": 1,
                                                                   "feature_distillation": "attention"})
    resp = env.client.post("/v1/jobs", headers=env.auth("a"), json=body)
    assert resp.status_code == 422, resp.text
    err = resp.json()
    assert err["code"] == "feature_distillation_unsupported"
    assert err["field"] == "hyperparameters.feature_distillation"
    assert "onnx" in err["message"] and "state dict" in err["message"]


@pytest.mark.parametrize(("hyperparameters", "field"), [
    ({"distillation": "hard", "standardize": True}, "hyperparameters.standardize"),
    ({"distillation": "dkd", "dkd_beta": -1}, "hyperparameters.dkd_beta"),
    ({"distillation": "crd"}, "hyperparameters.distillation"),
    ({"feature_distillation": "fitnets"}, "hyperparameters.feature_distillation"),
])
def test_bad_method_settings_are_422_naming_the_field(env: Env, teacher_a: Uploaded, dataset_a: Uploaded,
                                                      hyperparameters: dict, field: str) -> None:
    body = job_body(teacher_a.id, dataset_a.id, hyperparameters=hyperparameters)
    resp = env.client.post("/v1/jobs", headers=env.auth("a"), json=body)
    assert resp.status_code == 422, resp.text
    assert resp.json()["field"] == field


def test_the_new_methods_and_formats_are_accepted_and_echoed(env: Env, teacher_a: Uploaded,
                                                             dataset_a: Uploaded) -> None:
    body = job_body(teacher_a.id, dataset_a.id,
                    hyperparameters={"epochs": 1, "distillation": "dkd", "standardize": True,
                                     "feature_distillation": "attention"},
                    data={"augment": "consistent"}, export_formats=["onnx_int8", "onnx_fp16"],
                    max_export_accuracy_drop=0.02)
    resp = env.client.post("/v1/jobs", headers=env.auth("a"), json=body)
    assert resp.status_code == 202, resp.text
    request = resp.json()["request"]
    assert request["hyperparameters"]["distillation"] == "dkd" and request["hyperparameters"]["standardize"]
    assert request["data"]["augment"] == "consistent"
    assert request["export_formats"] == ["onnx_int8", "onnx_fp16"] and request["max_export_accuracy_drop"] == 0.02
    bad = env.client.post("/v1/jobs", headers=env.auth("a"), json=body | {"data": {"augment": "strong"}})
    assert bad.status_code == 422 and bad.json()["field"].startswith("data.augment")
