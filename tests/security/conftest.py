"""Shared fixtures: one tiny base model and one fine-tune, identities and a trust store."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fedmerge.security.keys import generate_identity
from fedmerge.security.trust import TrustStore
from fedmerge.toymodels import TinyMistralSpec, build_tiny_mistral, perturb_checkpoint

SPEC = TinyMistralSpec(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
CHUNK = 2048  # small, so every weight matrix spans several chunks


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    base = build_tiny_mistral(root / "base", SPEC, seed=0, tokenizer=False)
    ft = perturb_checkpoint(base, root / "ft", seed=1, scale=0.05)
    return base, ft


@pytest.fixture(scope="session")
def fingerprint(models) -> str:
    from fedmerge.checkpoints import CheckpointReader, model_fingerprint

    return model_fingerprint(CheckpointReader(models[0]))


@pytest.fixture(scope="session")
def ids(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("keys")
    return {n: generate_identity(n, root) for n in ("hosp-a", "hosp-b", "hosp-x", "coord", "coord-2")}


@pytest.fixture
def trust(ids, tmp_path) -> TrustStore:
    """hosp-a, hosp-b enrolled; coord and coord-2 coordinators; hosp-x unknown."""
    store = TrustStore(path=tmp_path / "trust.json")  # built in memory: trusted as the test that built it
    store.add(ids["hosp-a"].public)
    store.add(ids["hosp-b"].public)
    store.add(ids["coord"].public, role="coordinator")
    store.add(ids["coord-2"].public, role="coordinator")
    store.save()
    return store


@pytest.fixture(scope="session")
def packages(models, fingerprint, ids, tmp_path_factory) -> dict[str, Path]:
    """Pristine packages from hosp-a, round 3: plain and sealed to coord. Copy before changing."""
    from fedmerge.security.pack import pack_delta

    base, ft = models
    root = tmp_path_factory.mktemp("pkgs")
    return {
        "plain": pack_delta(ft, base, root / "plain", ids["hosp-a"], 3, fingerprint, chunk_bytes=CHUNK),
        "sealed": pack_delta(ft, base, root / "sealed", ids["hosp-a"], 3, fingerprint, seal_to=ids["coord"].public, chunk_bytes=CHUNK),
    }


@pytest.fixture
def copy_pkg(packages, tmp_path):
    def _copy(kind: str) -> Path:
        dst = tmp_path / f"{kind}-copy"
        shutil.copytree(packages[kind], dst)
        return dst

    return _copy
