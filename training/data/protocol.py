"""What every data source is: indexable ``Case`` objects that know their classes and channels."""

from __future__ import annotations

from typing import Protocol

from training.data.cases import Case


class Dataset(Protocol):
    @property
    def classes(self) -> tuple[str, ...]: ...
    @property
    def in_channels(self) -> int: ...
    @property
    def description(self) -> dict[str, object]: ...
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> Case: ...
