"""Creating a job: the checks a request must pass and its queued record, one way for `POST /v1/jobs` and for
the trials of a sweep (app.searches), so that a trial is an ordinary job."""

from __future__ import annotations

from pydantic import ValidationError
from sqlalchemy.orm import Session

from worker.distill.errors import ConfigError, DistillError, StudentError
from worker.distill.feature_distill import check_feature_teacher
from worker.distill.label_map import match_classes
from worker.distill.spec import InputSpec, config_error_from
from worker.distill.students import check_input_size, model_info

from . import lifecycle, webhooks
from .api.errors import ApiError, get_owned
from .api.schemas import JobCreate
from .jobs import request_hash
from .models import Dataset, Job, Teacher, new_id
from .queue import default_queue
from .settings import Settings, get_settings


def check_request(session: Session, tenant_id: str, body: JobCreate,
                  settings: Settings | None = None) -> tuple[Teacher, Dataset]:
    """The tenant's teacher and dataset of `body`, once the request is known to be runnable; raises ApiError
    (404 for another tenant's or a made-up id, 422 with the field otherwise). `settings` (default: the
    environment's) say whether callback_url may name a private address."""
    teacher = get_owned(session, Teacher, body.teacher_id, tenant_id, "teacher_id")
    dataset = get_owned(session, Dataset, body.dataset_id, tenant_id, "dataset_id")
    if teacher.classes:
        # matched by name: a teacher may know more classes than the dataset, never fewer
        try:
            match_classes(teacher.classes, dataset.classes)
        except DistillError as e:
            raise ApiError(422, e.code, e.message, "dataset_id") from None
    elif teacher.num_classes != dataset.num_classes:
        raise ApiError(422, "class_count_mismatch", f"the teacher predicts {teacher.num_classes} classes but the "
                       f"dataset has {dataset.num_classes} ({', '.join(dataset.classes[:5])}...); upload the "
                       "teacher with `classes` (the names of its outputs) to distill a subset", "dataset_id")
    try:
        model_info(body.student.arch)
        size = body.student.input_size or teacher.input_size[0]
        check_input_size(body.student.arch, (size, size))
        if body.student.mean is not None or body.student.std is not None:
            InputSpec(channels=teacher.input_channels, size=size, mean=body.student.mean, std=body.student.std)
    except StudentError as e:
        raise ApiError(422, e.code, e.message, "student.arch" if e.code == "unknown_architecture" else
                       "student.input_size") from None
    except ValidationError as e:
        err = config_error_from(e, prefix="student")
        raise ApiError(422, "invalid_input_spec", err.message, err.field) from None
    try:
        check_feature_teacher(body.hyperparameters.feature_distillation, teacher.format)
    except ConfigError as e:
        raise ApiError(422, e.code, e.message, e.field) from None
    if body.hyperparameters.class_weights not in (None, "auto") and \
            len(body.hyperparameters.class_weights) != dataset.num_classes:
        raise ApiError(422, "invalid_hyperparameter", f"class_weights has {len(body.hyperparameters.class_weights)}"
                       f" values; the dataset has {dataset.num_classes} classes", "hyperparameters.class_weights")
    if body.callback_url is not None:  # last: it may wait on DNS
        webhooks.check_callback_url(body.callback_url, settings or get_settings())
    return teacher, dataset


def new_job(session: Session, settings: Settings, tenant_id: str, body: JobCreate, *,
            idempotency_key: str | None = None, sweep_id: str | None = None, sweep_trial: int | None = None) -> Job:
    """Check `body` and add its job, queued; the caller commits, then hands it to the broker (lifecycle.send)."""
    check_request(session, tenant_id, body, settings)
    request = body.model_dump(mode="json")
    job = Job(id=new_id("job"), tenant_id=tenant_id, teacher_id=body.teacher_id, dataset_id=body.dataset_id,
              status="queued", queue=body.queue or default_queue(session, settings), request=request,
              idempotency_key=idempotency_key, request_hash=request_hash(request),
              sweep_id=sweep_id, sweep_trial=sweep_trial)
    session.add(job)
    lifecycle.submitted(session, job)
    return job
