"""The networks of the registry's models on one device: loaded (hash-checked) once, then shared."""

from __future__ import annotations

import logging
import threading

import torch

from service.errors import ModelNotFound
from service.registry import ModelRegistry
from training.checkpoint import LoadedModel, load_model

log = logging.getLogger(__name__)


class ModelPool:
    def __init__(self, registry: ModelRegistry, device: torch.device) -> None:
        self.registry, self.device = registry, device
        self._loaded: dict[tuple[str, str], LoadedModel] = {}
        self._lock = threading.Lock()

    def get(self, name: str, version: str) -> LoadedModel:
        """Raises ModelNotFound for a model or version the registry does not have."""
        key = (name, version)
        with self._lock:
            if key not in self._loaded:
                entry = self.registry.get(name, version)
                self._loaded[key] = load_model(entry.path, self.device)
                log.info("loaded %s v%s on %s", name, version, self.device)
            return self._loaded[key]

    def load_latest(self, names: list[str]) -> None:
        """Load the latest version of each model now, so that ready means ready."""
        unknown = sorted(set(names) - set(self.registry.names()))
        if unknown:
            raise ModelNotFound(f"models {unknown} are not in {self.registry.model_dir}")
        for name in names:
            self.get(name, self.registry.get(name).version)
