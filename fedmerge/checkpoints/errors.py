"""Errors of the checkpoint layer; each names the file, and where it applies the tensor."""

from __future__ import annotations

from fedmerge.errors import FedmergeError


class CheckpointError(FedmergeError):
    """A model folder cannot be read or written as asked."""


class PickledWeightsRefused(CheckpointError):
    """The folder holds only pickled weights, which fedmerge never loads."""


class MissingTensor(CheckpointError):
    """A tensor named by the index or asked for by a merge is not in the checkpoint."""


class MalformedSafetensors(CheckpointError):
    """A safetensors file breaks the format's rules (header, offsets, dtypes); it is never read further."""


class IncompatibleCheckpoint(CheckpointError):
    """Two checkpoints cannot be merged: architecture, names, shapes or vocabulary differ."""


class CodecError(CheckpointError):
    """A compression spec, or a compressed tensor, is not one fedmerge can use."""


class UnknownCompression(CodecError):
    """A compression spec names a codec that is not registered, or gives it a bad argument."""


class EncodedDataInvalid(CodecError):
    """Compressed bytes do not fit their codec's layout, or would decode to non-finite values."""
