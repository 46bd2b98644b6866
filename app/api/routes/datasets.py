"""POST/GET/DELETE /v1/datasets: upload an archive or .npz (its classes and split sizes are read at upload; the
same file uploaded before is returned instead), read it, delete it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Query, Response, UploadFile
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app import retention
from app.models import Dataset, new_id
from app.storage import get_store

from ..deps import SessionDep, SettingsDep, TenantDep
from ..errors import get_owned, in_use, not_found
from ..pagination import page
from ..schemas import DatasetOut, ErrorOut, Page
from ..uploads import inspect_in_child, safe_filename, save_upload

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])
DEDUPE_DESCRIPTION = ("true (default): when this API key's tenant already has a dataset (not deleted) uploaded "
                      "from the same file (same sha256), answer 200 with that dataset and its Location instead "
                      "of storing a copy; false: always store a new dataset (201)")


@router.post("", status_code=201, response_model=DatasetOut, summary="Upload a dataset (zip, tar.gz or npz)",
             responses={200: {"model": DatasetOut, "description": "The same file was uploaded before (see `dedupe`): "
                              "the existing dataset, with `Location`"}})
async def upload_dataset(
    response: Response, session: SessionDep, settings: SettingsDep, tenant: TenantDep,
    file: Annotated[UploadFile, File(description="ImageFolder .zip/.tar.gz or .npz (x, y, x_val, ...)")],
    dedupe: Annotated[bool, Query(description=DEDUPE_DESCRIPTION)] = True,
) -> Dataset:
    path, size, digest = await save_upload(file, settings.tmp_dir, settings.max_dataset_bytes)
    try:
        if dedupe:  # before the inspection: answering a repeated upload costs its transfer and a query
            existing = await run_in_threadpool(_same_file, session, tenant.id, digest)
            if existing is not None:
                response.status_code = 200
                response.headers["Location"] = f"/v1/datasets/{existing.id}"
                return existing
        info = await run_in_threadpool(inspect_in_child, "dataset", {
            "path": str(path), "workdir": str(settings.tmp_dir),
            "limits": {"max_files": settings.max_dataset_files, "max_unpacked_bytes": settings.max_unpacked_bytes,
                       "max_decoded_bytes": settings.max_decoded_bytes},
        }, settings.inspect_timeout)
        dataset_id = new_id("ds")
        filename = safe_filename(file.filename, "dataset")
        key = f"datasets/{dataset_id}/{filename}"
        await run_in_threadpool(get_store(settings).put_file, key, path)
    finally:
        path.unlink(missing_ok=True)
    dataset = Dataset(id=dataset_id, tenant_id=tenant.id, filename=filename, format=info["format"],
                      classes=info["classes"], num_classes=info["num_classes"], num_train=info["num_train"],
                      num_val=info["num_val"], num_unlabeled=info["num_unlabeled"], channels=info["channels"],
                      image_size=list(info["image_size"]), val_source=info["val_source"],
                      num_test=info.get("num_test") or 0, test_source=info.get("test_source"), sha256=digest,
                      size_bytes=size, storage_key=key)
    session.add(dataset)
    session.commit()  # visible before the client gets its id, whenever the dependency's exit code runs
    response.headers["Location"] = f"/v1/datasets/{dataset.id}"
    return dataset


def _same_file(session: Session, tenant_id: str, digest: str) -> Dataset | None:
    """The tenant's newest live dataset uploaded from the file `digest`."""
    return session.scalars(select(Dataset).where(Dataset.tenant_id == tenant_id, Dataset.sha256 == digest,
                                                 Dataset.deleted_at.is_(None))
                           .order_by(Dataset.created_at.desc(), Dataset.id.desc()).limit(1)).first()


@router.get("", response_model=Page[DatasetOut], summary="List datasets, newest first")
def list_datasets(session: SessionDep, tenant: TenantDep, limit: Annotated[int, Query(ge=1, le=200)] = 50,
                  after: str | None = None) -> dict:
    items, cursor = page(session, select(Dataset).where(Dataset.deleted_at.is_(None)), Dataset, tenant_id=tenant.id,
                         limit=limit, after=after)
    return {"items": items, "next_cursor": cursor}


@router.get("/{dataset_id}", response_model=DatasetOut, summary="One dataset")
def get_dataset(dataset_id: str, session: SessionDep, tenant: TenantDep) -> Dataset:
    return get_owned(session, Dataset, dataset_id, tenant.id)


@router.delete("/{dataset_id}", status_code=204, response_class=Response, summary="Delete a dataset",
               description="Removes its file; it is then 404 everywhere. Jobs that used it keep their results. "
               "409 `dataset_in_use` (with `job_ids`) while a queued or running job or a running sweep uses it.",
               responses={409: {"model": ErrorOut, "description": "In use (`dataset_in_use`)"}})
def delete_dataset(dataset_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> Response:
    dataset = get_owned(session, Dataset, dataset_id, tenant.id)
    users = retention.delete_input(session, get_store(settings), dataset)
    if users is None:  # a concurrent DELETE got there first
        raise not_found("dataset", dataset_id)
    if users:
        raise in_use("dataset", dataset_id, users.job_ids, users.sweep_ids)
    return Response(status_code=204)
