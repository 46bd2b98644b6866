"""What a caller may ask for: who it is (/v1/me) and the student architectures (/v1/students)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from worker.distill.students import cheap_params, list_models, model_info

from ..deps import SettingsDep, TenantDep

router = APIRouter(prefix="/v1", tags=["catalog"])
# Each timm model is counted by a build on the meta device (up to a second on a large one): a filter that matches
# hundreds must not keep the API busy for minutes, so their counts are given only for a narrower filter.
TIMM_COUNTED = 25


class TenantOut(BaseModel):
    id: str
    name: str


class MeOut(BaseModel):
    tenant: TenantOut
    auth: Literal["disabled", "api_key"] = Field(description="disabled: the server takes calls without a key")


class StudentArch(BaseModel):
    arch: str = Field(description="the name to give as student.arch")
    family: str
    parameters: int | None = Field(description="with a head for num_classes classes; null where counting would "
                                   "build the whole model (torchvision's RegNets)")
    default_input_size: int | None = Field(description="null where parameters is null for a timm model (the same "
                                           "meta build tells it)")
    min_input_size: int | None


class StudentList(BaseModel):
    items: list[StudentArch]
    truncated: bool = Field(False, description="more names match: narrow the filter")


@router.get("/me", response_model=MeOut, summary="The caller: its tenant, and whether the server needs keys")
def me(tenant: TenantDep, settings: SettingsDep) -> dict[str, Any]:
    return {"tenant": {"id": tenant.id, "name": tenant.name},
            "auth": "disabled" if settings.auth == "disabled" else "api_key"}


@router.get("/students", response_model=StudentList, summary="Student architectures, with parameter counts",
            description="torchvision's classifiers and the small-input family; timm's (`timm:<name>`, where timm is "
            "installed) only when `filter` narrows the list, as there are over a thousand.")
async def students(
    filter: Annotated[str | None, Query(max_length=100, description="part of the name, e.g. mobile")] = None,
    family: Literal["torchvision", "small", "timm"] | None = None,
    num_classes: Annotated[int, Query(ge=2, le=100_000)] = 10,
    limit: Annotated[int, Query(ge=1, le=500)] = 200,
) -> dict[str, Any]:
    def build() -> dict[str, Any]:
        names = list_models(filter=filter, family=family, include_timm=bool(filter and filter.strip()))
        count_timm = sum(n.startswith("timm:") for n in names[:limit]) <= TIMM_COUNTED
        items = []
        for name in names[:limit]:  # each count builds the model on the meta device (twice), then is cached
            if not (count_timm or not name.startswith("timm:")):
                items.append({"arch": name, "family": "timm", "parameters": None, "default_input_size": None,
                              "min_input_size": None})
                continue
            info = model_info(name)
            items.append({"arch": name, "family": info.family, "parameters": cheap_params(name, num_classes),
                          "default_input_size": info.default_input_size, "min_input_size": info.min_input_size})
        return {"items": items, "truncated": len(names) > limit}

    return await run_in_threadpool(build)
