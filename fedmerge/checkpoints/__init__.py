"""The bottom layer: model checkpoints on disk, for every other part of fedmerge.

Reading and writing safetensors folders in bounded memory (``reader``, ``writer``), the one dtype
table (``dtypes``), tensor bytes and content fingerprints (``fingerprint``), the names a model
folder is made of (``layout``) and files written whole or not at all (``atomic``). It imports
nothing of fedmerge but ``fedmerge.errors``; merging, security, eval, the client and the server
all build on it. Only safetensors are ever read here; pickled weights are refused, never loaded.
"""

from fedmerge.checkpoints.dtypes import FLOAT_DTYPES, dtype_nbytes, safetensors_dtype, torch_dtype, torch_name
from fedmerge.checkpoints.errors import CheckpointError, IncompatibleCheckpoint, MalformedSafetensors, MissingTensor, PickledWeightsRefused
from fedmerge.checkpoints.fingerprint import combine_digests, folder_fingerprint, model_fingerprint, state_dict_fingerprint, tensor_bytes, tensor_digest
from fedmerge.checkpoints.layout import INDEX_NAME, METADATA_NAME, PICKLE_SUFFIXES, SIDECAR_FILES, SINGLE_NAME, TensorInfo, shard_name
from fedmerge.checkpoints.reader import CheckpointReader, read_safetensors_header, require_safetensors_weights
from fedmerge.checkpoints.writer import CheckpointWriter

__all__ = [
    "CheckpointError", "CheckpointReader", "CheckpointWriter", "FLOAT_DTYPES", "INDEX_NAME", "IncompatibleCheckpoint",
    "METADATA_NAME", "MalformedSafetensors", "MissingTensor", "PICKLE_SUFFIXES", "PickledWeightsRefused", "SIDECAR_FILES",
    "SINGLE_NAME", "TensorInfo", "combine_digests", "dtype_nbytes", "folder_fingerprint", "model_fingerprint",
    "read_safetensors_header", "require_safetensors_weights", "safetensors_dtype", "shard_name", "state_dict_fingerprint",
    "tensor_bytes", "tensor_digest", "torch_dtype", "torch_name",
]  # fmt: skip
