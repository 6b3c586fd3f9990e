"""The one table of tensor dtypes: safetensors codes, torch names, sizes, and the spellings users type.

Every layer names dtypes the safetensors way (``F32``, ``BF16``...) in files and manifests and the
torch way (``float32``, ``bfloat16``) in configs; this module is the only place that maps one to
the other.
"""

from __future__ import annotations

from fedmerge.checkpoints.errors import CheckpointError

# safetensors code -> (torch name, bytes per element)
_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "BF16": ("bfloat16", 2), "F16": ("float16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U8": ("uint8", 1), "U16": ("uint16", 2), "U32": ("uint32", 4), "U64": ("uint64", 8),
    "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
}  # fmt: skip
SAFETENSORS_DTYPES = frozenset(_DTYPES)
FLOAT_DTYPES = frozenset({"F64", "F32", "BF16", "F16", "F8_E4M3", "F8_E5M2"})
# Short spellings people write in configs and on the command line.
_ALIASES = {"float": "float32", "fp32": "float32", "f32": "float32", "half": "float16", "fp16": "float16", "f16": "float16", "bf16": "bfloat16", "double": "float64", "fp64": "float64"}


def dtype_nbytes(dtype: str) -> int:
    try:
        return _DTYPES[dtype][1]
    except KeyError:
        raise CheckpointError(f"unknown safetensors dtype {dtype!r}") from None


def torch_name(dtype: str) -> str:
    """torch's name (``bfloat16``) for a safetensors code (``BF16``)."""
    try:
        return _DTYPES[dtype][0]
    except KeyError:
        raise CheckpointError(f"unknown safetensors dtype {dtype!r}") from None


def torch_dtype(dtype: str):
    """torch dtype for a safetensors code."""
    import torch

    return getattr(torch, torch_name(dtype))


def canonical_torch_name(name: str) -> str:
    """``bf16`` -> ``bfloat16``, ``torch.float16`` -> ``float16``; unknown names are returned as given."""
    n = str(name).strip().removeprefix("torch.")
    return _ALIASES.get(n.lower(), n.lower() if n.lower() in {t for t, _ in _DTYPES.values()} else n)


def safetensors_dtype(torch_dtype_or_name) -> str:
    """Safetensors code for a torch dtype, a torch name (``"bfloat16"``), an alias (``bf16``) or a code."""
    raw = str(torch_dtype_or_name).strip()
    if raw.upper() in _DTYPES:
        return raw.upper()
    name = canonical_torch_name(raw)
    for code, (tn, _) in _DTYPES.items():
        if tn == name:
            return code
    raise CheckpointError(f"dtype {torch_dtype_or_name!r} cannot be stored in safetensors")
