"""Is every value finite? Checked on the raw little-endian bytes of a chunk, at pack and on arrival."""

from __future__ import annotations


def has_non_finite(buf, dtype: str) -> bool:
    """True when the values in ``buf`` (safetensors dtype ``F32``, ``F16`` or ``BF16``) include a
    NaN or an infinity."""
    import numpy as np

    if not len(buf):
        return False
    if dtype == "F32":
        a = np.frombuffer(buf, dtype="<f4")
        # Fast path: a finite float32 sum means every value is finite (NaN and inf propagate);
        # only a non-finite sum (or an overflow of huge values) needs the exact, slower check.
        if np.isfinite(np.add.reduce(a, dtype=np.float32)):
            return False
        return not bool(np.isfinite(a).all())
    if dtype == "F16":
        return not bool(np.isfinite(np.frombuffer(buf, dtype="<f2")).all())
    # bfloat16: exponent bits all ones means inf or NaN.
    return bool(((np.frombuffer(buf, dtype="<u2") & 0x7F80) == 0x7F80).any())
