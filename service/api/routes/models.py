"""``GET /v1/models`` and ``GET /v1/models/{name}``."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from service.api.auth import authenticated
from service.api.deps import RegistryDep, SettingsDep
from service.api.schemas import ErrorResponse, InputSpec, ModelDetail, ModelList, ModelSummary
from service.codecs.images import NPY_DTYPES

router = APIRouter(prefix="/v1/models", tags=["models"], dependencies=[Depends(authenticated)])


@router.get("", response_model=ModelList, responses={401: {"model": ErrorResponse}})
async def list_models(registry: RegistryDep) -> ModelList:
    models = []
    for name in registry.names():
        entry = registry.get(name)
        models.append(ModelSummary(name=name, version=entry.version, versions=registry.versions(name), classes=entry.classes))
    return ModelList(models=models)


@router.get("/{name}", response_model=ModelDetail, responses={401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}})
async def get_model(name: str, registry: RegistryDep, settings: SettingsDep, version: str | None = None) -> ModelDetail:
    entry = registry.get(name, version)
    m = entry.manifest
    return ModelDetail(
        name=name, version=entry.version, versions=registry.versions(name), classes=entry.classes,
        input=InputSpec(
            channels=entry.in_channels, dtype=["png8", "png16", "jpeg", *(f"npy-{d}" for d in NPY_DTYPES)],
            max_side=settings.max_side, max_pixels=settings.max_pixels, normalisation=m["normalisation"],
            sees_position=entry.sees_position,
        ),
        sha256=m["sha256"], metrics=m.get("metrics", {}), data=m.get("data", {}),
        training={k: v for k, v in m.get("training", {}).items() if k != "config"},
    )
