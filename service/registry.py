"""The models the service serves: every ``MODEL_DIR/<name>/<version>/`` with a manifest. The
API only reads manifests; networks are loaded (once, cached) where they run, in the worker."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

from service.errors import ModelNotFound
from training.checkpoint import CheckpointError, LoadedModel, ModelEntry, load_model, read_manifest, version_folders

log = logging.getLogger(__name__)


class ModelRegistry:
    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self._entries: dict[str, dict[str, ModelEntry]] = {}
        self._loaded: dict[tuple[str, str, str], LoadedModel] = {}
        self._lock = threading.Lock()
        self.scan()

    def scan(self) -> None:
        entries: dict[str, dict[str, ModelEntry]] = {}
        if not self.model_dir.is_dir():
            log.warning("model dir %s does not exist; serving no models", self.model_dir)
        for model_path in sorted(p for p in self.model_dir.glob("*") if p.is_dir()):
            for folder in version_folders(model_path):
                try:
                    manifest = read_manifest(folder)
                except CheckpointError as exc:
                    log.error("skipping %s: %s", folder, exc)
                    continue
                entries.setdefault(model_path.name, {})[folder.name] = ModelEntry(model_path.name, folder.name, folder, manifest)
        self._entries = entries

    def names(self) -> list[str]:
        return sorted(self._entries)

    def versions(self, name: str) -> list[str]:
        if name not in self._entries:
            raise ModelNotFound(f"no model named {name!r}; available: {self.names()}")
        return sorted(self._entries[name], key=int)

    def get(self, name: str, version: str | None = None) -> ModelEntry:
        versions = self.versions(name)
        chosen = version or versions[-1]
        if chosen not in self._entries[name]:
            raise ModelNotFound(f"model {name!r} has no version {chosen!r}; available: {versions}")
        return self._entries[name][chosen]

    def load(self, name: str, version: str, device: torch.device) -> LoadedModel:
        """The networks of one version on ``device``, loaded and hash-checked once."""
        key = (name, version, str(device))
        with self._lock:
            if key not in self._loaded:
                entry = self.get(name, version)
                self._loaded[key] = load_model(entry.path, device)
                log.info("loaded %s v%s on %s", name, version, device)
            return self._loaded[key]
