"""The demo's configuration: the world to build, the federation to run, the merges to compare.

The defaults *are* the demo (``fedmerge demo`` with no arguments); ``configs/demo.yaml`` spells
them out and a test keeps the two equal. Only the ``world`` section decides the cached world's
key, so changing strategies or evaluation settings reuses the models already built.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fedmerge.configfile import load_config
from fedmerge.errors import FedmergeError

# Bump when the world's recipe changes in a way the config does not show (templates, layout).
WORLD_FORMAT = 2


class DemoConfigError(FedmergeError):
    """The demo config file is missing, not YAML, or has a field that is not acceptable."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelShape(_Strict):
    """A tiny Mistral: same architecture as Mistral-7B (GQA, RoPE, SwiGLU, RMSNorm), far smaller."""

    hidden_size: int = Field(128, ge=16)
    intermediate_size: int = Field(384, ge=16)
    num_hidden_layers: int = Field(4, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    num_key_value_heads: int = Field(2, ge=1)
    vocab_size: int = Field(1024, ge=300, description="tokenizer vocabulary trained on the world's text")
    max_position_embeddings: int = Field(512, ge=64)


class Stage(_Strict):
    """One training run (AdamW, warm-up then cosine decay)."""

    steps: int = Field(ge=1)
    lr: float = Field(gt=0)
    batch_size: int = Field(16, ge=1)
    block_size: int = Field(128, ge=16)
    warmup_steps: int = Field(20, ge=0)


class WorldConfig(_Strict):
    seed: int = 0
    specialties: list[str] = Field(default_factory=lambda: ["cardiology", "oncology", "paediatrics"], min_length=2)
    conditions_per_domain: int = Field(24, ge=4)
    corpus_passes: int = Field(12, ge=1, description="shuffled passes over each domain's text")
    n_choices: int = Field(4, ge=2)
    model: ModelShape = Field(default_factory=ModelShape)
    pretrain: Stage = Field(default_factory=lambda: Stage(steps=300, lr=3e-3))
    finetune: Stage = Field(default_factory=lambda: Stage(steps=150, lr=1e-3))
    threads: int = Field(2, ge=1, description="torch threads while training")

    @field_validator("specialties")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v) or "general" in v:
            raise ValueError("specialties must be distinct and must not be 'general'")
        for name in v:
            if not name.replace("_", "").isalnum() or name != name.lower():
                raise ValueError(f"specialty {name!r}: use lower-case letters, digits and '_'")
        return v

    def key(self) -> str:
        """The cache key: a digest of everything that decides the world's bytes."""
        body = json.dumps({"format": WORLD_FORMAT, "world": self.model_dump(mode="json")}, sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:16]


class MergeEntry(_Strict):
    """One row of the comparison: a label and what the engine's ``MergeSpec`` gets."""

    label: str
    method: str
    parameters: dict[str, Any] = Field(default_factory=dict)


def _paper_merges() -> list[MergeEntry]:
    # The paper's hyper-parameters (Table II and section III-D). Its two-model alpha = 0.5 becomes a
    # weight of 0.5 per hospital for the task-vector methods; linear is the plain average.
    half = {"weight": 0.5}
    return [
        MergeEntry(label="linear", method="linear", parameters={}),
        MergeEntry(label="task_arithmetic", method="task_arithmetic", parameters=half),
        MergeEntry(label="ties", method="ties", parameters={**half, "density": 0.6}),
        MergeEntry(label="dare_ties", method="dare_ties", parameters={**half, "density": 0.6}),
        MergeEntry(label="della", method="della", parameters={**half, "density": 0.6, "epsilon": 0.05}),
        MergeEntry(label="breadcrumbs", method="breadcrumbs", parameters={**half, "density": 0.9, "gamma": 0.01}),
        MergeEntry(label="hierarchical", method="hierarchical", parameters={}),
    ]


class EvalSettings(_Strict):
    num_fewshot: int = Field(0, ge=0, description="exam items are sentence completions; shots would be other exam items")
    batch_size: int = Field(32, ge=1)
    seed: int = 1234


class FederationSettings(_Strict):
    rounds: int = Field(1, ge=1)
    seal: bool = Field(True, description="encrypt contributions to the coordinator as well as signing them")
    method: str = Field("task_arithmetic", description="the strategy the federation itself runs with")
    parameters: dict[str, Any] = Field(default_factory=lambda: {"weight": 0.5})


class DemoConfig(_Strict):
    world: WorldConfig = Field(default_factory=WorldConfig)
    evaluation: EvalSettings = Field(default_factory=EvalSettings)
    federation: FederationSettings = Field(default_factory=FederationSettings)
    merges: list[MergeEntry] = Field(default_factory=_paper_merges, min_length=1)
    density_sweep: list[float] = Field(default_factory=lambda: [0.6, 0.7, 0.8, 0.9, 0.95, 0.99])
    sweep_method: str = "dare_ties"
    sweep_parameters: dict[str, Any] = Field(default_factory=lambda: {"weight": 0.5})

    @field_validator("density_sweep")
    @classmethod
    def _densities(cls, v: list[float]) -> list[float]:
        if any(not 0.0 < d <= 1.0 for d in v):
            raise ValueError("every density must be in (0, 1]")
        return sorted(v)

    @field_validator("merges")
    @classmethod
    def _labels(cls, v: list[MergeEntry]) -> list[MergeEntry]:
        labels = [m.label for m in v]
        if len(set(labels)) != len(labels):
            raise ValueError(f"merge labels must be distinct: {labels}")
        return v


def load_demo_config(path: str | Path | None) -> DemoConfig:
    """The defaults when ``path`` is None; otherwise the YAML file, validated field by field."""
    if path is None:
        return DemoConfig()
    return load_config(path, DemoConfig, DemoConfigError, "a mapping with world / evaluation / federation / merges")
