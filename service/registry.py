"""The models the service serves: every ``MODEL_DIR/<name>/<version>/`` with a manifest. Manifests
only, no torch: networks are loaded where they run, by the runner's ``ModelPool``."""

from __future__ import annotations

import logging
from pathlib import Path

from service.errors import ModelNotFound
from training.manifest import CheckpointError, ModelEntry, read_manifest, version_folders

log = logging.getLogger(__name__)


class ModelRegistry:
    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self._entries: dict[str, dict[str, ModelEntry]] = {}
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
