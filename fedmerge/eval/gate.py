"""The publication gate: refuse a round whose model scores clearly worse than what came before.

``decide`` is a pure function of the candidate's scores and the reference scores (the previous
published model and/or the base model). ``Gate.check`` fetches those references from the
results store, decides, and records the decision and its reason in the store, so every refusal
(and every publication) can be audited afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field

from fedmerge.eval.store import GateRecord, ResultsStore


class GateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    margin: float = Field(0.02, ge=0, description="allowed drop, in absolute metric units (0.02 = 2 accuracy points)")
    metric: str = "acc"
    compare_to: Literal["previous", "base", "both"] = "both"
    aggregate: Literal["mean", "each"] = Field("mean", description="mean over tasks, or every task on its own")
    tasks: list[str] | None = Field(None, description="tasks the gate looks at; None = all the candidate has")


@dataclass(frozen=True)
class GateDecision:
    publish: bool
    reason: str
    metric: str
    score: float | None  # the candidate's (mean) score on the tasks compared
    reference: float | None  # the reference it was held against (the failing one when refused)
    reference_kind: str  # previous | base | none
    margin: float


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def decide(
    candidate: Mapping[str, float],
    previous: Mapping[str, float] | None,
    base: Mapping[str, float] | None,
    config: GateConfig = GateConfig(),
) -> GateDecision:
    """Publish unless the candidate falls more than ``margin`` below a reference.

    Scores are ``{task: value}`` of ``config.metric``. Only tasks present in both the candidate
    and a reference are compared; with no reference at all the candidate is published.
    """
    tasks = [t for t in (config.tasks or list(candidate)) if t in candidate]
    if not tasks:
        return GateDecision(False, f"the candidate has no {config.metric} score on the gated tasks {config.tasks}", config.metric, None, None, "none", config.margin)
    refs: list[tuple[str, Mapping[str, float]]] = []
    if config.compare_to in ("previous", "both") and previous:
        refs.append(("previous", previous))
    if config.compare_to in ("base", "both") and base:
        refs.append(("base", base))
    cand_mean = _mean([candidate[t] for t in tasks])
    if not refs:
        return GateDecision(True, f"no reference to compare with; published at mean {config.metric} {cand_mean:.4f}", config.metric, cand_mean, None, "none", config.margin)
    checked = []
    for kind, ref in refs:
        common = [t for t in tasks if t in ref]
        if not common:
            continue
        if config.aggregate == "each":
            for t in common:
                if candidate[t] < ref[t] - config.margin:
                    return GateDecision(
                        False,
                        f"{t}: {config.metric} {candidate[t]:.4f} is {ref[t] - candidate[t]:.4f} below the {kind} model's "
                        f"{ref[t]:.4f}, more than the margin {config.margin:.4f}",
                        config.metric, candidate[t], ref[t], kind, config.margin,
                    )
            checked.append((kind, _mean([ref[t] for t in common])))
        else:
            c = _mean([candidate[t] for t in common])
            r = _mean([ref[t] for t in common])
            if c < r - config.margin:
                return GateDecision(
                    False,
                    f"mean {config.metric} over {len(common)} task(s) {c:.4f} is {r - c:.4f} below the {kind} model's "
                    f"{r:.4f}, more than the margin {config.margin:.4f}",
                    config.metric, c, r, kind, config.margin,
                )
            checked.append((kind, r))
    if not checked:
        return GateDecision(True, "no task in common with any reference; published", config.metric, cand_mean, None, "none", config.margin)
    # Report the tightest reference (the highest one) as the one the candidate was held to.
    kind, r = max(checked, key=lambda kr: kr[1])
    against = ", ".join(f"{k} {v:.4f}" for k, v in checked)
    return GateDecision(True, f"mean {config.metric} {cand_mean:.4f} within {config.margin:.4f} of (or above) {against}", config.metric, cand_mean, r, kind, config.margin)


class Gate:
    """Decides with references from a ``ResultsStore`` and records every decision there."""

    def __init__(self, store: ResultsStore, config: GateConfig = GateConfig()):
        self.store = store
        self.config = config

    def _scores_of_run(self, run_id: str | None) -> dict[str, float] | None:
        if run_id is None:
            return None
        per_task = self.store.run_scores(run_id)
        out = {t: m[self.config.metric][0] for t, m in per_task.items() if self.config.metric in m and m[self.config.metric][0] is not None}
        return out or None

    def references(self) -> tuple[dict[str, float] | None, dict[str, float] | None]:
        """(previous published model's scores, base model's scores), each None when absent."""
        last = self.store.last_published()
        previous = self._scores_of_run(last.run_id) if last else None
        base = self._scores_of_run(self.store.latest_run(role="base"))
        return previous, base

    def check(self, result, *, record: bool = True) -> GateDecision:
        """Decide on an ``EvalResult`` and (by default) record the decision in the store."""
        previous, base = self.references()
        decision = decide(result.accuracies(self.config.metric), previous, base, self.config)
        if record:
            self.store.record_gate(
                GateRecord(
                    published=decision.publish, reason=decision.reason, round=result.round, label=result.label,
                    fingerprint=result.fingerprint, run_id=result.run_id, metric=decision.metric, score=decision.score,
                    reference=decision.reference, reference_kind=decision.reference_kind, margin=decision.margin,
                )
            )
        return decision
