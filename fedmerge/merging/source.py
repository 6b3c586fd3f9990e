"""The contract every merge input meets: a *delta source*.

``DeltaTensors`` is what any consumer of a delta needs, tensor by tensor: a ``label``, the tensor
``names()``, each tensor's ``info(name)`` and ``get_delta(name, *, rows=None, base=None)``, the
float32 CPU tensor model - reference (``None``: the source leaves that tensor unchanged, a zero
delta). ``rows=(a, b)`` asks for rows a..b-1 only; ``base=`` hands over the reference tensor (the
same rows, already read, float32) so that one read of the reference serves every input. Packing
a delta and saving one need no more than this.

``DeltaSource`` adds what the merge engine needs to check an input and to describe it: its
``kind``, whether it is ``complete`` (a whole model: it holds every tensor, and its
``config.json`` and tokenizer are its own), its ``folder`` and ``config``, the file holding each
tensor (``file_of``, for error messages), the full ``weight`` it holds for a tensor (for
vocabulary remapping, which works on weights, not deltas), ``describe()`` for the output's
metadata, and ``record_digests(enabled)``, which asks a source that reads raw checkpoint bytes
to hash them as they stream so ``describe()`` can name its fingerprint without a second pass.

The engine requires the whole contract up front (``require_delta_source``): an input missing a
member, or whose ``get_delta`` does not take ``rows=`` and ``base=``, is refused with
``NotADeltaSource`` naming the input and what it lacks, before anything is read. The built-in
sources (``TaskVector``, ``DeltaCheckpoint``, ``LoraDelta``, ``AdaptedModel``) subclass
``DeltaSource`` and inherit the defaults of ``weight``, ``describe`` and ``record_digests``; any
other class may implement the members itself.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from fedmerge.checkpoints import TensorInfo
from fedmerge.errors import FedmergeError


class NotADeltaSource(FedmergeError):
    """An object given as a merge input does not implement the ``DeltaSource`` contract."""


@runtime_checkable
class DeltaTensors(Protocol):
    """The tensors of a delta, one at a time (see the module docstring)."""

    label: str

    def names(self) -> list[str]: ...

    def info(self, name: str) -> TensorInfo: ...

    def get_delta(self, name: str, *, rows: tuple[int, int] | None = None, base=None): ...


@runtime_checkable
class DeltaSource(DeltaTensors, Protocol):
    """What the merge engine requires of every input (see the module docstring)."""

    kind: str
    complete: bool
    folder: Path | None
    config: dict[str, Any]

    def file_of(self, name: str) -> Path: ...

    def weight(self, name: str, reference):
        """The full weight this input holds for ``name`` (float32): ``reference`` plus its delta.

        A complete model overrides this to read its own tensor, which may have other rows than
        the reference (a model with a different vocabulary)."""
        d = self.get_delta(name, base=reference)
        return reference.clone() if d is None else d.add_(reference)

    def describe(self) -> dict[str, Any]:
        """The input as the output's ``fedmerge.json`` lists it."""
        folder = self.folder
        return {"label": self.label, "kind": self.kind, "path": None if folder is None else str(folder), "fingerprint": None}

    def record_digests(self, enabled: bool) -> None:
        """Hash what ``get_delta`` reads, for ``describe()``'s fingerprint (a no-op by default)."""

    # Optional: ``use_buffers(pool)``, where a source may take the buffers of whole tensors it
    # reads from a ``fedmerge.checkpoints.buffers.BufferPool`` (the engine gives back the deltas
    # it was handed once the tensor is merged). Sources without it allocate as usual.


_MEMBERS = ("label", "kind", "complete", "folder", "config", "names", "info", "file_of", "get_delta", "weight", "describe", "record_digests")
_DELTA_KEYWORDS = ("rows", "base")


def require_delta_source(obj: Any, where: str) -> DeltaSource:
    """``obj`` itself when it implements ``DeltaSource``; otherwise ``NotADeltaSource`` naming
    ``where`` (the input's position or label) and every member it lacks."""
    missing = [m for m in _MEMBERS if not hasattr(obj, m)]
    if "label" not in missing:
        where = f"{where} ({obj.label})"
    if missing:
        raise NotADeltaSource(f"{where}: {type(obj).__name__} is not a delta source; it lacks {', '.join(missing)} (see fedmerge.merging.source.DeltaSource)")
    try:
        params = inspect.signature(obj.get_delta).parameters
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check against
        return obj
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    lacking = [k for k in _DELTA_KEYWORDS if not takes_any and (k not in params or params[k].kind is inspect.Parameter.POSITIONAL_ONLY)]
    if lacking:
        raise NotADeltaSource(
            f"{where}: {type(obj).__name__}.get_delta does not take {', '.join(k + '=' for k in lacking)}; "
            "a delta source computes row slices and takes the reference tensor (get_delta(name, *, rows=None, base=None))"
        )
    return obj


__all__ = ["DeltaSource", "DeltaTensors", "NotADeltaSource", "require_delta_source"]
