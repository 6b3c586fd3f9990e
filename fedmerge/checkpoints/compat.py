"""The one "can these be merged" check: architecture, vocabulary, tensor names and shapes.

A merge, an inspection report and a delta package all ask the same question of an input
against a base (or reference): does it describe the same network? ``CompatibilityCheck`` reads
the base once (shapes, ``config.json``, tokenizer) and ``compare`` answers for one input with a
``Compatibility`` record listing every difference. Callers decide what a difference means: the
merge engine refuses the first one with ``IncompatibleCheckpoint`` (``raise_first``), the
inspector reports them all, the security layer turns them into its own typed refusals.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Protocol, Sequence, Union, runtime_checkable

from fedmerge.checkpoints.errors import IncompatibleCheckpoint
from fedmerge.checkpoints.layout import TensorInfo

# Config keys that must agree between every input and the base for tensors to line up.
ARCH_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
)


@runtime_checkable
class TensorShapes(Protocol):
    """Anything that lists tensors and describes each (a ``CheckpointReader``, a delta source)."""

    def names(self) -> list[str]: ...

    def info(self, name: str) -> TensorInfo: ...


Shapes = Union[TensorShapes, Mapping[str, Sequence[int]]]


def shapes_of(x: Shapes) -> dict[str, tuple[int, ...]]:
    """name -> shape, in the source's order, from a mapping or from a ``TensorShapes``."""
    if isinstance(x, Mapping):
        return {str(n): tuple(int(d) for d in s) for n, s in x.items()}
    return {n: tuple(int(d) for d in x.info(n).shape) for n in x.names()}


def tokenizer_fingerprint(folder: str | os.PathLike[str]) -> str | None:
    """Digest of what decides token ids (vocabulary, merges, added tokens); None without tokenizer.json."""
    path = Path(folder) / "tokenizer.json"
    if not path.exists():
        return None
    try:
        tok = json.loads(path.read_text())
    except ValueError as exc:
        raise IncompatibleCheckpoint(f"{path}: not valid JSON ({exc})") from None
    model = tok.get("model") or {}
    key = {"vocab": model.get("vocab"), "merges": model.get("merges"), "added": [(t.get("id"), t.get("content")) for t in tok.get("added_tokens") or []]}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class Compatibility:
    """Every difference between one input and the base; ``ok`` when there is none."""

    architecture: tuple[tuple[str, Any, Any], ...]  # (config key, input's value, base's value)
    config_known: bool  # the input had a config to compare (adapters and deltas may not)
    tokenizer: str  # same | different | missing (either side lacks tokenizer.json) | n/a (not compared)
    missing: tuple[str, ...]  # base tensors the input lacks (only checked for complete inputs)
    extra: tuple[str, ...]  # input tensors the base does not have
    shapes: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]  # (name, input shape, base shape)
    input_tensors: int
    base_tensors: int

    @property
    def ok(self) -> bool:
        return not (self.architecture or self.tokenizer == "different" or self.missing or self.extra or self.shapes)

    def raise_first(self, where: str, base_folder: object, file_of: Callable[[str], object] | None = None, tokenizer_hint: str = "") -> None:
        """Raise ``IncompatibleCheckpoint`` for the first difference (architecture, tokenizer,
        missing, unknown, shape), naming ``where`` (the input), the base and the tensor;
        ``tokenizer_hint`` ends the message about a different tokenizer (what to do about it)."""
        for key, theirs, base in self.architecture:
            raise IncompatibleCheckpoint(
                f"{where}: config.json {key}={theirs!r} but the base {base_folder} has {base!r}; inputs must share the base's architecture"
            )
        if self.tokenizer == "different":
            hint = f" ({tokenizer_hint})" if tokenizer_hint else ""
            raise IncompatibleCheckpoint(f"{where}: tokenizer.json differs from the base's ({base_folder}); token ids would not line up{hint}")
        if self.missing:
            raise IncompatibleCheckpoint(f"{where}: has no tensor {self.missing[0]!r} that the base has ({len(self.missing)} missing)")
        if self.extra:
            raise IncompatibleCheckpoint(f"{where}: tensor {self.extra[0]!r} is not in the base {base_folder} ({len(self.extra)} unknown)")
        for name, theirs, base in self.shapes:
            file = file_of(name) if file_of is not None else where
            raise IncompatibleCheckpoint(f"{file}: tensor {name!r} has shape {list(theirs)}, the base has {list(base)}")


class CompatibilityCheck:
    """The base side of the check, read once: tensor shapes, ``config.json`` and tokenizer."""

    def __init__(self, base: Shapes, *, config: Mapping[str, Any] | None = None, folder: str | os.PathLike[str] | None = None):
        self.shapes = shapes_of(base)
        self.config = dict(config or {})
        self._folder = Path(folder) if folder is not None else None
        self._tokenizer: str | None = None
        self._tokenizer_read = False

    def _base_tokenizer(self) -> str | None:
        if not self._tokenizer_read:
            self._tokenizer = tokenizer_fingerprint(self._folder) if self._folder is not None else None
            self._tokenizer_read = True
        return self._tokenizer

    def compare(
        self,
        other: Shapes,
        *,
        complete: bool,
        config: Mapping[str, Any] | None = None,
        tokenizer_folder: str | os.PathLike[str] | None = None,
        relaxed: Collection[str] = (),
    ) -> Compatibility:
        """Compare one input with the base.

        ``complete``: the input must hold every base tensor (a full model); adapters, delta
        folders and packages name only the tensors they change. ``config``: the input's
        ``config.json`` (architecture keys are compared when both sides have one).
        ``tokenizer_folder``: compare the input's tokenizer with the base's. ``relaxed``:
        architecture keys allowed to differ (a merge that renumbers layers or remaps the
        vocabulary lets ``num_hidden_layers`` or ``vocab_size`` differ).
        """
        cfg = dict(config or {})
        arch: list[tuple[str, Any, Any]] = []
        if cfg and self.config:
            arch = [
                (k, cfg.get(k), self.config.get(k))
                for k in ARCH_KEYS
                if k not in relaxed and (k in cfg or k in self.config) and cfg.get(k) != self.config.get(k)
            ]
        tokenizer = "n/a"
        if tokenizer_folder is not None:
            theirs, base = tokenizer_fingerprint(tokenizer_folder), self._base_tokenizer()
            tokenizer = "missing" if theirs is None or base is None else ("same" if theirs == base else "different")
        shapes = shapes_of(other)
        missing = tuple(n for n in self.shapes if n not in shapes) if complete else ()
        extra = tuple(n for n in shapes if n not in self.shapes)
        bad = tuple((n, s, self.shapes[n]) for n, s in shapes.items() if n in self.shapes and s != self.shapes[n])
        return Compatibility(tuple(arch), bool(cfg), tokenizer, missing, extra, bad, len(shapes), len(self.shapes))
