"""POST/GET /v1/datasets: upload an archive or .npz; its classes and split sizes are read at upload."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Query, UploadFile
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from app.models import Dataset, new_id
from app.storage import get_store

from ..deps import SessionDep, SettingsDep, TenantDep
from ..errors import get_owned
from ..pagination import page
from ..schemas import DatasetOut, Page
from ..uploads import inspect_in_child, safe_filename, save_upload

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


@router.post("", status_code=201, response_model=DatasetOut, summary="Upload a dataset (zip, tar.gz or npz)")
async def upload_dataset(
    session: SessionDep, settings: SettingsDep, tenant: TenantDep,
    file: Annotated[UploadFile, File(description="ImageFolder .zip/.tar.gz or .npz (x, y, x_val, ...)")],
) -> Dataset:
    path, size, digest = await save_upload(file, settings.tmp_dir, settings.max_dataset_bytes)
    try:
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
    return dataset


@router.get("", response_model=Page[DatasetOut], summary="List datasets, newest first")
def list_datasets(session: SessionDep, tenant: TenantDep, limit: Annotated[int, Query(ge=1, le=200)] = 50,
                  after: str | None = None) -> dict:
    items, cursor = page(session, select(Dataset), Dataset, tenant_id=tenant.id, limit=limit, after=after)
    return {"items": items, "next_cursor": cursor}


@router.get("/{dataset_id}", response_model=DatasetOut, summary="One dataset")
def get_dataset(dataset_id: str, session: SessionDep, tenant: TenantDep) -> Dataset:
    return get_owned(session, Dataset, dataset_id, tenant.id)
