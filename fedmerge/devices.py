"""Choosing where tensors are computed: CUDA when present, the CPU otherwise; how many CPU threads."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from fedmerge.errors import FedmergeError


def resolve_device(spec: str | None = "auto") -> str:
    """Turn ``auto``/``cpu``/``cuda``/``cuda:N`` into a device string torch accepts.

    ``auto`` picks the first CUDA device when one is usable and the CPU otherwise, so the same
    config runs on a GPU coordinator and on a laptop.
    """
    import torch

    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise FedmergeError(f"device {spec!r} was asked for but no CUDA device is available; use 'cpu' or 'auto'")
        return "cuda:0" if spec == "cuda" else spec
    if spec == "cpu":
        return "cpu"
    raise FedmergeError(f"unknown device {spec!r}: expected auto, cpu, cuda or cuda:N")


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op CPU threads set to ``n`` inside the block (None or 0: left as they are),
    and put back when it ends, however it ends.

    The setting is process-wide, so whoever changes it for one job restores it for the rest. On a
    shared or oversubscribed CPU torch's threads spin against each other: fewer can be faster.
    """
    import torch

    old = torch.get_num_threads()
    if n and n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)
