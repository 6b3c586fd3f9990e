"""Choosing where tensors are computed: CUDA when present, the CPU otherwise."""

from __future__ import annotations

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
