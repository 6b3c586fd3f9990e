"""Shared fixtures for the federation tests: one set of tiny models per session, fresh state per test."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def toy_models(tmp_path_factory):
    """A tiny base and four seeded fine-tunes, built once (tokenizer training dominates the cost)."""
    from fedmerge.federation.toy import ToyFederation, institution_names
    from fedmerge.toymodels import TinyMistralSpec, build_tiny_mistral, perturb_checkpoint

    root = tmp_path_factory.mktemp("toy-models")
    base = build_tiny_mistral(root / "base", TinyMistralSpec(), seed=0)
    fts = {n: perturb_checkpoint(base, root / n, seed=101 + i, scale=0.05) for i, n in enumerate(institution_names(4))}
    return ToyFederation(root, Path(base), {k: Path(v) for k, v in fts.items()}, None, {}, None, None, None)


@pytest.fixture
def make_federation(tmp_path, toy_models):
    from fedmerge.federation.toy import build_toy_federation

    def make(n: int = 3, **kw):
        return build_toy_federation(tmp_path / "fed", n, models_from=toy_models, **kw)

    return make
