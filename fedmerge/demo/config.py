"""The demo's configuration: the world to build, the federation to run, the merges to compare.

The defaults *are* the demo (``fedmerge demo`` with no arguments); ``configs/demo.yaml`` spells
them out and a test keeps the two equal. Only the ``world`` section decides the cached world's
key, so changing strategies or evaluation settings reuses the models already built.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedmerge.configfile import CompressionSpec, load_config
from fedmerge.errors import FedmergeError

# Bump when the world's recipe changes in a way the config does not show (templates, layout).
WORLD_FORMAT = 3


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
    conditions_per_domain: int = Field(24, ge=4, description="conditions per domain asked by the test exams")
    validation_conditions: int = Field(8, ge=4, description="more conditions per domain, asked only by the validation splits")
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


def paper_merges() -> list[MergeEntry]:
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


def _default_merges() -> list[MergeEntry]:
    # The paper's six methods and its hierarchical rule, then the weights-only methods measured
    # best on this world (docs/strategies.md), on the same first-round contributions.
    return paper_merges() + [
        MergeEntry(label="ties d=1.0", method="ties", parameters={"weight": 0.5, "density": 1.0}),
        MergeEntry(label="iso_c alpha=0.75", method="iso_c", parameters={"alpha": 0.75}),
        MergeEntry(label="iso_c alpha=1.0", method="iso_c", parameters={"alpha": 1.0}),
        MergeEntry(label="tsv_m", method="tsv_m", parameters={"alpha": 1.0}),
    ]


class EvalSettings(_Strict):
    num_fewshot: int = Field(0, ge=0, description="exam items are sentence completions; shots would be other exam items")
    batch_size: int = Field(32, ge=1)
    seed: int = 1234


class LocalTraining(_Strict):
    """What each hospital does between rounds (its client's ``train_hook``, ``fedmerge.demo.localtrain``).

    From the current global model, on the hospital's own text, for a short budget (AdamW, warm-up
    then cosine decay). Before the first round a hospital holds no global model and contributes
    its fine-tune as it is.
    """

    steps: int = Field(20, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(16, ge=1)
    block_size: int = Field(128, ge=16)
    warmup_steps: int = Field(5, ge=0)
    general_share: bool = Field(True, description="a hospital's text holds its own share of general-medicine documents besides its specialty's")


class Candidate(_Strict):
    """One candidate merge of a round: a method of the registry and its parameters."""

    method: str
    parameters: dict[str, Any] = Field(default_factory=dict)


def _iso_c_grid() -> list[Candidate]:
    return [Candidate(method="iso_c", parameters={"alpha": a}) for a in (0.5, 0.75, 1.0, 1.25)]


class SelectionSettings(_Strict):
    """How the federation chooses its published model among candidate merges, without test labels.

    ``federated``: each hospital scores every candidate on its private validation split (general
    medicine and its own specialty) and returns only accuracies; ``central``: the coordinator
    scores them on the consortium's validation split; ``none``: the federation's ``method`` is
    published. ``rule``: ``mean`` over hospitals of each one's mean accuracy, or the ``worst``
    hospital's.
    """

    mode: Literal["none", "central", "federated"] = "federated"
    candidates: list[Candidate] = Field(default_factory=_iso_c_grid)
    rule: Literal["mean", "worst"] = "worst"
    max_candidates: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _fits(self) -> "SelectionSettings":
        if self.mode != "none" and not self.candidates:
            raise ValueError(f"mode {self.mode} needs at least one candidate")
        if len(self.candidates) > self.max_candidates:
            raise ValueError(f"{len(self.candidates)} candidates, more than max_candidates ({self.max_candidates}); "
                             "each is a merge and, in federated mode, a download and an evaluation at every hospital")
        return self


class FederationSettings(_Strict):
    rounds: int = Field(3, ge=1)
    seal: bool = Field(True, description="encrypt contributions to the coordinator as well as signing them")
    compression: CompressionSpec = Field("int4", description="how every delta travels (contributions, candidates, the pushed model): a codec spec, or none")
    reference: Literal["base", "global"] = Field("global", description="what contributions are deltas from: the base, or the last published model")
    method: str = Field("iso_c", description="the strategy the federation publishes when it selects nothing")
    parameters: dict[str, Any] = Field(default_factory=lambda: {"alpha": 0.75})
    local_training: LocalTraining | None = Field(default_factory=LocalTraining, description="null: hospitals send their fine-tunes every round")
    selection: SelectionSettings = Field(default_factory=SelectionSettings)


class DemoConfig(_Strict):
    world: WorldConfig = Field(default_factory=WorldConfig)
    evaluation: EvalSettings = Field(default_factory=EvalSettings)
    federation: FederationSettings = Field(default_factory=FederationSettings)
    merges: list[MergeEntry] = Field(default_factory=_default_merges, min_length=1)
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
