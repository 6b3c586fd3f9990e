"""PEFT LoRA adapters as delta sources: a hospital that fine-tuned with LoRA contributes like any other.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``. For each
adapted linear module PEFT stores ``base_model.model.<module>.lora_A.weight`` (r x in) and
``...lora_B.weight`` (out x r); merging the adapter adds

    delta = B @ A * scaling,   scaling = alpha / r   (alpha / sqrt(r) with ``use_rslora``)

to ``<module>.weight``, transposed when the base stores the weight as (in, out)
(``fan_in_fan_out``, GPT-2's Conv1D). ``rank_pattern`` / ``alpha_pattern`` override r and alpha
per module, matched as PEFT matches them: a pattern applies to a module whose full name ends in
it (after a dot, or as the whole name). Embedding adapters (``lora_embedding_A`` r x vocab,
``lora_embedding_B`` dim x r) give delta = (B @ A)^T * scaling. Full tensors saved beside the
adapter (``modules_to_save``, trained biases) replace the base's: their delta is saved - base.

DoRA and convolution adapters are refused with an error: their merged weight is not a low-rank
delta of this form.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmerge.checkpoints import CheckpointError, CheckpointReader, IncompatibleCheckpoint, TensorInfo
from fedmerge.checkpoints.delta import subtract_reference
from fedmerge.merging.source import DeltaSource

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.[^.]+)?\.weight$|^(?P<emodule>.+)\.(?P<epart>lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?$")


class LoraError(CheckpointError):
    """A LoRA adapter folder cannot be used as a merge input."""


def is_lora_adapter(path: str | os.PathLike[str]) -> bool:
    p = Path(path)
    return p.is_dir() and (p / ADAPTER_CONFIG).exists()


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rule for ``rank_pattern`` / ``alpha_pattern``: the first pattern that matches the end
    of the module's full name (as a regular expression, on a dot boundary) gives the value."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass
class _Module:
    module: str  # e.g. model.layers.0.self_attn.q_proj
    target: str  # the base tensor it changes, e.g. model.layers.0.self_attn.q_proj.weight
    a_key: str
    b_key: str
    scaling: float
    transpose: bool  # delta is (B @ A)^T
    embedding: bool


class LoraDelta(DeltaSource):
    """Delta source over a PEFT LoRA adapter, materializing one module's delta at a time."""

    kind = "lora"
    complete = False

    def __init__(self, adapter_folder: str | os.PathLike[str], base_reader: CheckpointReader, label: str | None = None):
        self.folder = Path(adapter_folder)
        self.base = base_reader
        self.label = label or self.folder.name
        cfg_path = self.folder / ADAPTER_CONFIG
        try:
            self.adapter_config: dict[str, Any] = json.loads(cfg_path.read_text())
        except FileNotFoundError:
            raise LoraError(f"{self.folder}: no {ADAPTER_CONFIG}; not a PEFT adapter folder") from None
        except ValueError as exc:
            raise LoraError(f"{cfg_path}: not valid JSON ({exc})") from None
        cfg = self.adapter_config
        if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
            raise LoraError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not supported; only LORA adapters are")
        if cfg.get("use_dora"):
            raise LoraError(f"{cfg_path}: DoRA adapters are not low-rank deltas; merge it with PEFT's merge_and_unload() and pass the merged model")
        weights = self.folder / ADAPTER_WEIGHTS
        if not weights.exists():
            pickled = [p.name for p in self.folder.glob("adapter_model.*")]
            hint = f" (found {', '.join(pickled)}: fedmerge never unpickles; re-save with save_pretrained(safe_serialization=True))" if pickled else ""
            raise LoraError(f"{self.folder}: no {ADAPTER_WEIGHTS}{hint}")
        self.weights = CheckpointReader(weights)
        self._modules: dict[str, _Module] = {}
        self._full: dict[str, str] = {}  # base tensor name -> adapter key holding its full value
        self._scan(cfg_path)

    def _target_name(self, key: str, suffix: str) -> str:
        stem = key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key
        return stem + suffix

    def _scan(self, cfg_path: Path) -> None:
        cfg = self.adapter_config
        r0 = int(cfg.get("r", 8))
        alpha0 = float(cfg.get("lora_alpha", r0))
        rank_pattern = cfg.get("rank_pattern") or {}
        alpha_pattern = cfg.get("alpha_pattern") or {}
        rslora = bool(cfg.get("use_rslora", False))
        fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
        parts: dict[str, dict[str, str]] = {}
        for key in self.weights.names():
            m = _LORA_KEY.match(key)
            if m is None:
                # PEFT also saves the full base layer of an adapted embedding (".base_layer."), in
                # case the vocabulary was resized: it counts as a full tensor, delta = saved - base.
                target = self._target_name(key.replace(".base_layer.", "."), "")
                if target not in self.base:
                    raise LoraError(f"{self.weights.path}: tensor {key!r} matches no base tensor ({target!r} is not in {self.base.path})")
                self._full[target] = key
                continue
            module = m.group("module") or m.group("emodule")
            part = m.group("part") or m.group("epart")
            parts.setdefault(module, {})[part] = key
        for module_key, p in parts.items():
            module = self._target_name(module_key, "")
            embedding = "lora_embedding_A" in p or "lora_embedding_B" in p
            a_key = p.get("lora_embedding_A" if embedding else "lora_A")
            b_key = p.get("lora_embedding_B" if embedding else "lora_B")
            if a_key is None or b_key is None:
                raise LoraError(f"{self.weights.path}: module {module!r} has only one of its two LoRA matrices")
            a, b = self.weights.info(a_key), self.weights.info(b_key)
            if len(a.shape) != 2 or len(b.shape) != 2:
                raise LoraError(f"{self.weights.path}: module {module!r} is not a linear or embedding LoRA (A {list(a.shape)}, B {list(b.shape)}); only those are supported")
            r = int(pattern_value(rank_pattern, module, r0))
            alpha = float(pattern_value(alpha_pattern, module, alpha0))
            if a.shape[0] != r or b.shape[1] != r:
                raise LoraError(f"{self.weights.path}: module {module!r} has rank {a.shape[0]} but {cfg_path.name} implies r={r}")
            scaling = alpha / math.sqrt(r) if rslora else alpha / r
            target = module + ".weight"
            if target not in self.base:
                raise LoraError(f"{self.weights.path}: adapted module {module!r} has no tensor {target!r} in the base {self.base.path}")
            out_in = (b.shape[0], a.shape[1])
            base_shape = tuple(self.base.info(target).shape)
            if embedding:
                transpose = True
            elif base_shape == out_in and not (fan_in_fan_out and base_shape == out_in[::-1]):
                transpose = False
            elif base_shape == out_in[::-1]:
                transpose = True
            else:
                raise IncompatibleCheckpoint(
                    f"{self.weights.path}: module {module!r} gives a {out_in[0]}x{out_in[1]} delta but base tensor "
                    f"{target!r} in {self.base.path} is {list(base_shape)}"
                )
            expected = out_in[::-1] if transpose else out_in
            if base_shape != expected:
                raise IncompatibleCheckpoint(f"{self.weights.path}: module {module!r} delta {list(expected)} does not fit base tensor {target!r} {list(base_shape)}")
            self._modules[target] = _Module(module, target, a_key, b_key, scaling, transpose, embedding)
        for target, key in self._full.items():
            if tuple(self.weights.info(key).shape) != tuple(self.base.info(target).shape):
                raise IncompatibleCheckpoint(f"{self.weights.path}: {key!r} is {list(self.weights.info(key).shape)}, base {target!r} is {list(self.base.info(target).shape)}")
        if not self._modules and not self._full:
            raise LoraError(f"{self.weights.path}: holds no LoRA matrices")

    # -- delta source ----------------------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        return {}

    def names(self) -> list[str]:
        """The base tensors this adapter changes (every other tensor has a zero delta)."""
        touched = set(self._modules) | set(self._full)
        return [n for n in self.base.names() if n in touched]

    def info(self, name: str) -> TensorInfo:
        if name not in self._modules and name not in self._full:
            raise CheckpointError(f"{self.folder}: adapter does not change tensor {name!r}")
        return self.base.info(name)

    def file_of(self, name: str) -> Path:
        return self.weights.path

    def scaling(self, name: str) -> float:
        return self._modules[name].scaling

    def get_delta(self, name: str, *, rows: tuple[int, int] | None = None, base=None):
        m = self._modules.get(name)
        if m is None:
            key = self._full.get(name)
            if key is None:
                return None
            if base is None:
                base = self.base.get(name, rows=rows)
            return subtract_reference(self.weights.get(key, rows=rows), base)
        full_key = self._full.get(name)
        a = self.weights.get(m.a_key).float()
        b = self.weights.get(m.b_key).float()
        if m.transpose:
            if rows is not None:
                a = a[:, rows[0] : rows[1]]
            delta = (b @ a).t().contiguous()
        else:
            if rows is not None:
                b = b[rows[0] : rows[1]]
            delta = b @ a
        delta.mul_(m.scaling)
        if full_key is not None:  # a saved base layer that differs from the base (resized vocabulary)
            if base is None:
                base = self.base.get(name, rows=rows)
            delta.add_(self.weights.get(full_key, rows=rows).float()).sub_(base)
        return delta

    def fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha256()
        for fname in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            with open(self.folder / fname, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        return "sha256:" + h.hexdigest()

    def describe(self) -> dict[str, Any]:
        return {"label": self.label, "kind": self.kind, "path": str(self.folder), "fingerprint": self.fingerprint()}
