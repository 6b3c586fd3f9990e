"""Helpers the federation tests share (models compared byte by byte, offline merges)."""

from __future__ import annotations

from pathlib import Path

import torch


def load_tensors(model_dir) -> dict:
    from fedmerge.checkpoints import CheckpointReader

    with CheckpointReader(model_dir) as r:
        return {n: r.get(n).clone() for n in r.names()}


def offline_merge(base, finetunes: list, out, strategy: dict):
    """The same inputs merged without any federation: the engine on task vectors (fine-tune minus base)."""
    from fedmerge.merging.engine import MergeSpec, merge
    from fedmerge.merging.taskvector import TaskVector

    inputs = [TaskVector(ft, base, label=Path(ft).name) for ft in finetunes]
    merge(base, inputs, out, MergeSpec(**strategy), progress=False)
    return Path(out)


def assert_same_tensors(a_dir, b_dir) -> int:
    a, b = load_tensors(a_dir), load_tensors(b_dir)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert a[name].view(-1).view(dtype=torch.uint8).equal(b[name].view(-1).view(dtype=torch.uint8)), f"{name} differs"
    return len(a)
