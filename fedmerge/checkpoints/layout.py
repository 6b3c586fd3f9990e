"""What a Hugging Face model folder is made of: its file names, and one tensor's description."""

from __future__ import annotations

from dataclasses import dataclass

from fedmerge.checkpoints.dtypes import dtype_nbytes

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
METADATA_NAME = "fedmerge.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Everything a loader needs beside the weights; copied from the base into every merged folder.
SIDECAR_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


def shard_name(index: int, count: int) -> str:
    """The file name of shard ``index`` (0-based) of ``count``, as transformers names them."""
    return SINGLE_NAME if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors spelling: F32, BF16, F16, ...

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_nbytes(self.dtype)
