"""A round's record: what the coordinator decided, typed, one JSON file per round.

The record is the round's whole story, written atomically after every decision: who was
expected, who was late, who contributed, who was rejected and why, who dropped out and at which
stage, the merge, the evaluation, the gate's decision and the publication. ``fedmerge status``
reads it; the round loop resumes from it.

Statuses: ``open`` (collecting) -> [``selecting`` (candidates built and scored, with
``selection:``)] -> ``merged`` (model on disk, not yet published) ->
``completed`` (signed and pushed) or ``refused`` (the gate refused it: neither signed nor
pushed). ``failed``: no quorum; a restarted coordinator tries the round again.

Records written by fedmerge before this format (an untyped mapping without ``format``) are not
read: they raise ``RecordFormatError``; move such a state_dir aside and start again.
"""

from __future__ import annotations

import time
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator

RECORD_FORMAT = "fedmerge-round/2"


class RoundStatus(str, Enum):
    OPEN = "open"
    SELECTING = "selecting"  # contributions settled; candidates being built and scored
    MERGED = "merged"
    COMPLETED = "completed"
    REFUSED = "refused"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        """The loop moves on to the next round (a failed round is tried again on restart)."""
        return self in (RoundStatus.COMPLETED, RoundStatus.REFUSED)


class InstitutionState(str, Enum):
    CONTRIBUTED = "contributed"
    REJECTED = "rejected"
    DROPPED = "dropped"
    LATE = "late"  # expected, not connected when the round opened
    NOT_SAMPLED = "not sampled"
    EXCLUDED = "excluded"  # connected but not eligible (revoked, not enrolled)
    PENDING = "pending"  # in the round, nothing decided yet


class EventKind(str, Enum):
    OPENED = "opened"
    LATE = "late"
    EXCLUDED = "excluded"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    DROPPED = "dropped"
    FAILED = "failed"
    MERGED = "merged"
    EVALUATED = "evaluated"
    GATED = "gated"
    SIGNED = "signed"
    INSTALLED = "installed"
    COMPLETED = "completed"
    REFUSED = "refused"
    RETRIED = "retried"
    CANDIDATE = "candidate"  # a candidate merge built (selection)
    SCORED = "scored"  # a scorer's accuracies on the candidates recorded
    NOT_SCORED = "not scored"  # a scorer dropped from the selection, with its reason
    SELECTED = "selected"  # the candidate to publish chosen by the rule (or the fallback)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RoundEvent(_Model):
    """One decision, as it was made; handed to ``on_event`` and kept in the record."""

    round: int
    kind: EventKind
    at: float = Field(default_factory=time.time)
    institution: str | None = None
    node: int | None = None
    detail: str = ""


class Reference(_Model):
    kind: Literal["base", "global"]
    path: str
    fingerprint: str
    round: int | None = None  # the published round it is, for reference: global


class Contribution(_Model):
    institution: str
    node: int
    package_id: str  # SHA-256 of the signed manifest
    bytes: int
    sealed: bool
    delta_dir: str
    accepted_at: float = Field(default_factory=time.time)


class Rejection(_Model):
    institution: str | None  # the institution the node is bound to (None: bound to none)
    node: int
    error: str  # the typed error's name
    reason: str
    at: float = Field(default_factory=time.time)


class Drop(_Model):
    institution: str
    node: int
    stage: Literal["open", "transfer", "install"]
    reason: str
    at: float = Field(default_factory=time.time)


class Absence(_Model):
    institution: str
    reason: str
    at: float = Field(default_factory=time.time)


class Exclusion(_Model):
    node: int
    institution: str | None
    reason: str


class MergeOutcome(_Model):
    method: str
    contributors: list[str]
    seconds: float
    model_dir: str
    fingerprint: str


class Evaluation(_Model):
    scores: dict[str, dict[str, float | None]] = Field(default_factory=dict)  # task -> metric -> value
    run_id: str | None = None
    fingerprint: str | None = None
    seconds: float | None = None
    error: str | None = None


class GateOutcome(_Model):
    publish: bool
    reason: str
    metric: str | None = None
    score: float | None = None
    reference: float | None = None
    reference_kind: str = "none"
    margin: float | None = None


class Publication(_Model):
    signer: str
    round: int
    fingerprint: str
    model_bytes: int
    targets: list[str] = Field(default_factory=list)  # bound, enrolled institutions connected at push time
    installed: list[str] = Field(default_factory=list)
    failures: list[Drop] = Field(default_factory=list)


# -- candidate selection -----------------------------------------------------------------------
CENTRAL_SCORER = "central"  # the scorer's name in ``Selection.scores`` for mode: central


class Candidate(_Model):
    """One candidate merge of the round's contributions, as built."""

    id: str  # c1, c2... in the config's order
    label: str  # method and parameters, for people
    strategy: dict[str, Any]  # the MergeSpec fields it was built with
    fingerprint: str
    model_dir: str
    seconds: float
    package_bytes: int | None = None  # federated: its signed delta package, sent to each hospital


class ScoreFailure(_Model):
    scorer: str  # an institution, or ``central``
    node: int | None = None
    reason: str  # scrubbed of the hospital's paths
    at: float = Field(default_factory=time.time)


class Selection(_Model):
    """How the published model was chosen among the candidates, with every score it rests on."""

    mode: Literal["central", "federated"]
    rule: Literal["mean", "worst"]
    candidates: list[Candidate] = Field(default_factory=list)
    unbuilt: dict[str, str] = Field(default_factory=dict)  # candidate id -> why it could not be built
    asked: list[str] = Field(default_factory=list)  # scorers asked for scores
    # scorer (institution, or ``central``) -> candidate id -> task -> accuracy
    scores: dict[str, dict[str, dict[str, float]]] = Field(default_factory=dict)
    failures: list[ScoreFailure] = Field(default_factory=list)
    bytes_sent: dict[str, int] = Field(default_factory=dict)  # institution -> candidate bytes pushed to it
    values: dict[str, float] = Field(default_factory=dict)  # candidate id -> the rule's value
    chosen: str | None = None  # the published candidate (None: the configured strategy, see fallback)
    fallback: bool = False  # no scorer scored every candidate: the configured strategy was published
    reason: str | None = None

    def candidate(self, cid: str) -> Candidate:
        for c in self.candidates:
            if c.id == cid:
                return c
        raise KeyError(cid)


class RoundRecord(_Model):
    format: Literal["fedmerge-round/2"] = RECORD_FORMAT
    round: int
    federation: str
    status: RoundStatus = RoundStatus.OPEN
    attempts: int = 1
    started_at: float = Field(default_factory=time.time)
    finished_at: float | None = None
    updated_at: float | None = None
    strategy: dict[str, Any]
    reference: Reference
    expected: list[str] = Field(default_factory=list)  # enrolled institutions with a bound node
    sampled: dict[str, int] = Field(default_factory=dict)  # institution -> node asked to contribute
    late: list[Absence] = Field(default_factory=list)
    not_sampled: list[str] = Field(default_factory=list)
    excluded: list[Exclusion] = Field(default_factory=list)
    contributions: dict[str, Contribution] = Field(default_factory=dict)
    rejections: list[Rejection] = Field(default_factory=list)
    drops: list[Drop] = Field(default_factory=list)
    bytes_received: dict[str, int] = Field(default_factory=dict)
    merge: MergeOutcome | None = None
    selection: Selection | None = None
    evaluation: Evaluation | None = None
    gate: GateOutcome | None = None
    publication: Publication | None = None
    failure: str | None = None
    events: list[RoundEvent] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _drop_derived(cls, data: Any) -> Any:
        # ``contributors`` is written for readers of the JSON; it is derived, never read back.
        if isinstance(data, dict) and "contributors" in data:
            data = {k: v for k, v in data.items() if k != "contributors"}
        return data

    @computed_field  # type: ignore[prop-decorator]
    @property
    def contributors(self) -> list[str]:
        return sorted(self.contributions)

    def institution_states(self) -> dict[str, tuple[InstitutionState, str]]:
        """Each institution the round knows of, with its state and what explains it."""
        out: dict[str, tuple[InstitutionState, str]] = {}
        for inst in self.expected:
            out[inst] = (InstitutionState.PENDING, "")
        for e in self.excluded:
            if e.institution is not None:
                out[e.institution] = (InstitutionState.EXCLUDED, e.reason)
        for inst in self.not_sampled:
            out[inst] = (InstitutionState.NOT_SAMPLED, "not in this round's sample")
        for a in self.late:
            out[a.institution] = (InstitutionState.LATE, a.reason)
        for d in self.drops:
            out[d.institution] = (InstitutionState.DROPPED, f"{d.stage}: {d.reason}")
        for r in self.rejections:
            if r.institution is not None:
                out[r.institution] = (InstitutionState.REJECTED, f"{r.error}: {r.reason}")
        for inst, c in self.contributions.items():
            out[inst] = (InstitutionState.CONTRIBUTED, f"node {c.node}, {c.bytes} bytes{', sealed' if c.sealed else ''}")
        return dict(sorted(out.items()))

    def outcome_of(self, institution: str) -> str:
        """The one word a hospital is told about its part in the round."""
        state, _ = self.institution_states().get(institution, (InstitutionState.LATE, ""))
        return state.value
