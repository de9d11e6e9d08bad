"""Typed dependencies: what routes take from the app's state."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.config import Settings
from service.metrics import Metrics
from service.registry import ModelRegistry
from service.segmentation import Segmenter


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


def get_segmenter(request: Request) -> Segmenter:
    return request.app.state.segmenter


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
SegmenterDep = Annotated[Segmenter, Depends(get_segmenter)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
