"""Tiny real HF checkpoints shared by the engine-side merging tests (built once per session)."""

from __future__ import annotations

from pathlib import Path

from fedmerge.toymodels import TinyMistralSpec, build_tiny_mistral, perturb_checkpoint

SPEC = TinyMistralSpec(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def tiny_set(tmp_path_factory, n: int = 3) -> tuple[Path, list[Path]]:
    """(base, [ft1..ftn]): a float32 tiny Mistral and n seeded perturbations of it."""
    root = tmp_path_factory.getbasetemp() / "engine-tinyset"
    base = root / "base"
    if not base.exists():
        build_tiny_mistral(base, SPEC, seed=0)
    fts = []
    for i in range(n):
        ft = root / f"ft{i + 1}"
        if not ft.exists():
            perturb_checkpoint(base, ft, seed=i + 1, scale=0.05)
        fts.append(ft)
    return base, fts


def tensors(folder: Path) -> dict:
    from fedmerge.checkpoints import CheckpointReader

    r = CheckpointReader(folder)
    return {n: r.get(n) for n in r.names()}
