"""Compressed deltas: registered, composable codecs that every part may use.

The hospital encodes (``fedmerge.security.pack``), the coordinator checks the encoded bytes
(``fedmerge.security.verify``) and the merge engine decodes them a row chunk at a time
(``fedmerge.merging.taskvector.DeltaCheckpoint``): the codecs sit in the bottom layer so none of
those parts imports another. See ``registry`` for the table of codecs and how specs are spelled,
``pipeline`` for how a spec is applied to a tensor.
"""

from fedmerge.checkpoints.codecs.hashing import derive_seed
from fedmerge.checkpoints.codecs.pipeline import Compression, TensorCodec, canonical_spec, parse_compression
from fedmerge.checkpoints.codecs.registry import CODECS, NONE, Codec, describe_codecs, valid_specs

__all__ = ["CODECS", "NONE", "Codec", "Compression", "TensorCodec", "canonical_spec", "derive_seed", "describe_codecs", "parse_compression", "valid_specs"]
