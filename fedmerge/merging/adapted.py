"""A model with a LoRA adapter applied: mergekit's ``model: MODEL+ADAPTER`` input.

``AdaptedModel(model_folder, adapter_folder)`` reads like the model PEFT's
``merge_and_unload()`` would save, without writing it anywhere: each tensor the adapter changes
is ``W + delta`` (``delta`` from ``fedmerge.merging.lora.LoraDelta``: ``B @ A * scaling``,
transposed for fan-in/fan-out layers, saved full tensors replacing the model's), every other tensor
is the model's own. It serves both as a merge input (``get_delta(name, base=...)`` = its weight
minus the reference) and as a reference model itself (``base_model: MODEL+ADAPTER``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from fedmerge.checkpoints import CheckpointReader, TensorInfo
from fedmerge.merging.lora import LoraDelta
from fedmerge.merging.source import DeltaSource


class AdaptedModel(DeltaSource):
    kind = "model+lora"
    complete = True

    def __init__(self, model_folder: str | os.PathLike[str], adapter_folder: str | os.PathLike[str], label: str | None = None):
        self.model = CheckpointReader(model_folder)
        self.adapter = LoraDelta(adapter_folder, self.model)
        self.folder = self.model.folder
        self.path = self.model.path
        self.label = label or f"{self.model.folder.name}+{Path(adapter_folder).name}"
        self._changed = set(self.adapter.names())

    # -- reader side (used as a reference) -----------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        return self.model.config

    def names(self) -> list[str]:
        return self.model.names()

    def __contains__(self, name: str) -> bool:
        return name in self.model

    def info(self, name: str) -> TensorInfo:
        return self.model.info(name)

    def file_of(self, name: str) -> Path:
        return self.adapter.file_of(name) if name in self._changed else self.model.file_of(name)

    def get(self, name: str, rows: tuple[int, int] | None = None):
        """The adapted weight in the model's dtype, as ``merge_and_unload()`` stores it."""
        raw = self.model.get(name, rows=rows)
        if name not in self._changed:
            return raw
        w = raw.float()
        return w.add_(self.adapter.get_delta(name, rows=rows, base=w)).to(raw.dtype)

    # -- delta-source side (used as an input) ---------------------------------------------------------
    def weight(self, name: str, reference):
        return self.get(name).float()

    def get_delta(self, name: str, *, rows: tuple[int, int] | None = None, base=None):
        w = self.get(name, rows=rows).float()
        if base is None:
            raise ValueError(f"{self.label}: a delta needs the reference tensor for {name!r}")
        return w.sub_(base)

    def fingerprint(self) -> str:
        """SHA-256 over the model's files and the adapter's fingerprint."""
        h = hashlib.sha256()
        for f in self.model.files():
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        h.update(self.adapter.fingerprint().encode())
        return "sha256:" + h.hexdigest()

    def describe(self) -> dict[str, Any]:
        return {"label": self.label, "kind": self.kind, "path": str(self.folder), "adapter": str(self.adapter.folder), "fingerprint": self.fingerprint()}


__all__ = ["AdaptedModel"]
