"""The one delta subtraction: ``model.float() - reference.float()``, bit for bit, in one buffer.

Every delta in fedmerge (a task vector the merge engine streams, a package a hospital signs) is
computed here, so the coordinator merging a verified package and an offline merge of the same
fine-tune produce the same bytes by construction, not by keeping two copies of a formula alike.
"""

from __future__ import annotations

_HALF_OR_SINGLE = ("float32", "bfloat16", "float16")


def subtract_reference(model, reference, alloc=None):
    """``model.float() - reference.float()`` as a float32 tensor, computed with one float32 buffer.

    ``model`` is consumed: when it is already float32 it is overwritten (the checkpoint reader
    hands out fresh tensors, so callers pass what they just read). Widening bf16/fp16 to float32
    is exact, so a half-precision ``reference`` is subtracted as is (``sub_`` promotes it on the
    fly) instead of being copied to float32 first; any other dtype (float64, integers) is rounded
    to float32 first, as ``reference.float()`` would. ``alloc(shape, dtype)`` supplies the float32
    buffer a narrower ``model`` is widened into (default: a new one).
    """
    import torch

    if model.dtype == torch.float32:
        delta = model
    elif alloc is not None:
        delta = alloc(tuple(model.shape), torch.float32).copy_(model)
    else:
        delta = model.to(torch.float32)
    if str(reference.dtype).removeprefix("torch.") not in _HALF_OR_SINGLE:
        reference = reference.to(torch.float32)
    return delta.sub_(reference)
