"""POST/GET/DELETE /v1/teachers: upload a checkpoint, which is inspected in a child process before it is kept
(or the same upload made before is returned), read it, delete it."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, Response, UploadFile
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app import retention
from app.models import Teacher, new_id
from app.storage import get_store
from worker.distill.label_map import parse_class_names
from worker.distill.spec import InputSpec, TeacherFormat, TeacherSpec, config_error_from

from ..deps import SessionDep, SettingsDep, TenantDep
from ..errors import ApiError, get_owned, in_use, not_found
from ..pagination import page
from ..schemas import ErrorOut, Page, TeacherOut
from ..uploads import inspect_in_child, safe_filename, save_upload

router = APIRouter(prefix="/v1/teachers", tags=["teachers"])
DEDUPE_DESCRIPTION = ("true (default): when this API key's tenant already has a teacher (not deleted) uploaded "
                      "from the same file (same sha256) with the same form fields (arch, num_classes, format, "
                      "input_channels, input_size, mean, std, classes), answer 200 with that teacher and its "
                      "Location instead of storing a copy; false: always store a new teacher (201)")


@router.post("", status_code=201, response_model=TeacherOut, summary="Upload a teacher checkpoint",
             responses={200: {"model": TeacherOut, "description": "The same upload was made before (see `dedupe`): "
                              "the existing teacher, with `Location`"}})
async def upload_teacher(
    response: Response, session: SessionDep, settings: SettingsDep, tenant: TenantDep,
    file: Annotated[UploadFile, File(description="safetensors, .pt state dict, ONNX or TorchScript")],
    arch: Annotated[str | None, Form(description="architecture name; required for state dicts")] = None,
    num_classes: Annotated[int | None, Form(ge=2)] = None,
    format: Annotated[TeacherFormat | None, Form(description="default: detected from the content")] = None,
    input_channels: Annotated[int, Form(ge=1, le=4)] = 3,
    input_size: Annotated[int, Form(ge=1, le=4096)] = 224,
    mean: Annotated[str | None, Form(description="comma-separated floats, one per channel")] = None,
    std: Annotated[str | None, Form(description="comma-separated floats, one per channel")] = None,
    classes: Annotated[str | None, Form(
        description="names of the outputs 0..N-1, comma-separated or a JSON list; default: read from the file "
                    "(ONNX metadata_props, safetensors metadata or TorchScript classes.json) when it has them")] = None,
    dedupe: Annotated[bool, Query(description=DEDUPE_DESCRIPTION)] = True,
) -> Teacher:
    try:
        spec_input = InputSpec(channels=input_channels, size=input_size, mean=mean, std=std)
    except ValidationError as e:
        err = config_error_from(e)
        raise ApiError(422, "invalid_input_spec", err.message, err.field) from None
    names = _class_names(classes, num_classes)
    # the fields as given (defaults filled, lists parsed): an upload is the same as another only if these match
    form = {"arch": arch, "num_classes": num_classes, "format": format, "input": spec_input.model_dump(mode="json"),
            "classes": names}
    path, size, digest = await save_upload(file, settings.tmp_dir, settings.max_teacher_bytes)
    try:
        if dedupe:  # before the inspection: answering a repeated upload costs its transfer and a query
            existing = await run_in_threadpool(_same_upload, session, tenant.id, digest, form,
                                               settings.allow_torchscript)
            if existing is not None:
                response.status_code = 200
                response.headers["Location"] = f"/v1/teachers/{existing.id}"
                return existing
        spec = TeacherSpec(path=str(path), format=format, arch=arch, num_classes=num_classes, input=spec_input,
                           classes=names)
        # When the outputs disagree in number with the names (teacher.classes) or with num_classes (the
        # teacher as a whole), the field at fault is the one the user gave, else the file's own metadata.
        blame = {"teacher.classes": "classes" if names is not None else "file",
                 "teacher": "num_classes" if num_classes is not None else "file"}
        info = await run_in_threadpool(inspect_in_child, "teacher", {
            "spec": spec.model_dump(mode="json"), "allow_torchscript": settings.allow_torchscript,
        }, settings.inspect_timeout, blame)
        found = info.get("classes")
        if names is not None and found is None:
            found = names
        if found is not None and len(found) != info["num_classes"]:  # the engine checks too; never keep a misfit
            raise ApiError(422, "class_count_mismatch", f"the teacher has {info['num_classes']} outputs but "
                           f"{len(found)} class names; give one name per output, in output order",
                           "classes" if names is not None else "file")
        teacher_id = new_id("tch")
        filename = safe_filename(file.filename, "teacher")
        key = f"teachers/{teacher_id}/{filename}"
        await run_in_threadpool(get_store(settings).put_file, key, path)
    finally:
        path.unlink(missing_ok=True)
    described = info["input"]
    teacher = Teacher(id=teacher_id, tenant_id=tenant.id, filename=filename, format=info["format"],
                      arch=info.get("arch"), num_classes=info["num_classes"], input_channels=described["channels"],
                      input_size=described["size"], mean=described["mean"], std=described["std"], sha256=digest,
                      size_bytes=size, storage_key=key, details={"parameters": info.get("parameters"), "form": form},
                      classes=found)
    session.add(teacher)
    session.commit()  # visible before the client gets its id, whenever the dependency's exit code runs
    response.headers["Location"] = f"/v1/teachers/{teacher.id}"
    return teacher


def _same_upload(session: Session, tenant_id: str, digest: str, form: dict[str, Any],
                 allow_torchscript: bool) -> Teacher | None:
    """The tenant's newest live teacher uploaded from the file `digest` with the form fields `form`. A TorchScript
    one counts only while this server takes TorchScript: otherwise the upload gets its `torchscript_disabled`."""
    query = select(Teacher).where(Teacher.tenant_id == tenant_id, Teacher.sha256 == digest,
                                  Teacher.deleted_at.is_(None))
    if not allow_torchscript:
        query = query.where(Teacher.format != "torchscript")
    candidates = session.scalars(query.order_by(Teacher.created_at.desc(), Teacher.id.desc()))
    return next((t for t in candidates if (t.details or {}).get("form") == form), None)


def _class_names(value: str | None, num_classes: int | None) -> list[str] | None:
    """The `classes` form field as a list of names; a bad list is the upload's 422, never the inspector's."""
    if value is None or not value.strip():
        return None
    try:
        names = parse_class_names(value)
    except ValueError as e:
        raise ApiError(422, "invalid_classes", str(e), "classes") from None
    if num_classes is not None and len(names) != num_classes:
        raise ApiError(422, "class_count_mismatch", f"classes has {len(names)} names but num_classes is "
                       f"{num_classes}; give one name per output", "classes")
    return names


@router.get("", response_model=Page[TeacherOut], summary="List teachers, newest first")
def list_teachers(session: SessionDep, tenant: TenantDep, limit: Annotated[int, Query(ge=1, le=200)] = 50,
                  after: str | None = None) -> dict:
    items, cursor = page(session, select(Teacher).where(Teacher.deleted_at.is_(None)), Teacher, tenant_id=tenant.id,
                         limit=limit, after=after)
    return {"items": items, "next_cursor": cursor}


@router.get("/{teacher_id}", response_model=TeacherOut, summary="One teacher")
def get_teacher(teacher_id: str, session: SessionDep, tenant: TenantDep) -> Teacher:
    return get_owned(session, Teacher, teacher_id, tenant.id)


@router.delete("/{teacher_id}", status_code=204, response_class=Response, summary="Delete a teacher",
               description="Removes its file; it is then 404 everywhere. Jobs that used it keep their results. "
               "409 `teacher_in_use` (with `job_ids`) while a queued or running job or a running sweep uses it.",
               responses={409: {"model": ErrorOut, "description": "In use (`teacher_in_use`)"}})
def delete_teacher(teacher_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> Response:
    teacher = get_owned(session, Teacher, teacher_id, tenant.id)
    users = retention.delete_input(session, get_store(settings), teacher)
    if users is None:  # a concurrent DELETE got there first
        raise not_found("teacher", teacher_id)
    if users:
        raise in_use("teacher", teacher_id, users.job_ids, users.sweep_ids)
    return Response(status_code=204)

