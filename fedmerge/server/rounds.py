"""The coordinator's round loop: choose, collect, merge, evaluate, gate, sign, push.

Works on any Flower ``Grid``: the real one the SuperLink hands the ServerApp, the one of
Flower's simulation engine, or the in-process one of the tests and ``fedmerge simulate``. Each
stage is a class of its own (``Membership``, ``Collection``, ``Push``) and every decision is saved
in the round's typed record (``RoundRecord``) before it is announced to ``on_event``. All state
lives on disk, so the loop can be stopped anywhere and started again: it resumes at the first
round not done and never asks again for a contribution it already accepted.

What a caller injects:

- ``directory``: which institution each node is bound to (default: the config's
  ``superlink.supernode_public_keys``, matched against the keys the SuperLink registered);
- ``evaluate_fn`` / ``gate_fn``: score the round's model and decide whether it is published
  (default: from the config's ``evaluator`` section; none when there is none);
- ``validate_fn``: with ``selection: {mode: central}``, score one candidate on validation data
  (default: the evaluator on ``selection.eval_config``);
- ``on_event``: called with each ``RoundEvent`` once it is on disk (progress, fault injection).

With ``selection:`` a round whose contributions are settled goes through ``selecting``: the
``SelectionStage`` builds the candidates, has them scored and promotes the best by the rule to
the round's model; the evaluator and the gate then see that model (see
``fedmerge.server.selection``).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Callable

from fedmerge.checkpoints import CheckpointReader, model_fingerprint
from fedmerge.server import compressed_publication
from fedmerge.server.assess import ConfiguredEvaluation, EvaluateFn, GateFn, evaluation_of, gate_outcome_of
from fedmerge.server.collect import Collection
from fedmerge.server.config import FederationConfig
from fedmerge.server.directory import KeyBoundDirectory, NodeDirectory
from fedmerge.server.errors import NodeDirectoryError, RoundFailed
from fedmerge.server.ledger import RoundJournal, RoundLedger
from fedmerge.server.membership import Membership, roster
from fedmerge.server.publish import Push
from fedmerge.server.record import (
    Absence,
    Evaluation,
    EventKind,
    GateOutcome,
    MergeOutcome,
    Publication,
    Reference,
    RoundEvent,
    RoundRecord,
    RoundStatus,
)
from fedmerge.server.selection.central import ValidateFn
from fedmerge.server.spool import RoundSpool

log = logging.getLogger(__name__)

__all__ = ["RoundRunner", "RoundFailed"]


def load_coordinator_trust(config: FederationConfig, identity):
    """The trust store, refused unless signed by this coordinator's key (or explicitly allowed unsigned)."""
    from fedmerge.security.trust import TrustStore

    return TrustStore.load(config.trust_store, identity.public, allow_unsigned=config.allow_unsigned_trust)


def default_directory(grid, config: FederationConfig) -> NodeDirectory:
    keys = config.superlink.supernode_public_keys if config.superlink is not None else {}
    if not keys:
        raise NodeDirectoryError("no institution is bound to a SuperNode: list each one's node key under superlink.supernode_public_keys")
    return KeyBoundDirectory.from_files(grid, keys)


class RoundRunner:
    def __init__(
        self,
        grid,
        config: FederationConfig,
        *,
        directory: NodeDirectory | None = None,
        evaluate_fn: EvaluateFn | None = None,
        gate_fn: GateFn | None = None,
        on_event: Callable[[RoundEvent], None] | None = None,
        validate_fn: ValidateFn | None = None,
    ):
        from fedmerge.security.keys import load_identity, read_passphrase_file

        self.grid = grid
        self.cfg = config
        self.ledger = RoundLedger(config.state_dir)
        self.identity = load_identity(config.coordinator_key, read_passphrase_file(config.coordinator_key_passphrase_file))
        load_coordinator_trust(config, self.identity)  # refuse a bad store before any round starts
        self.directory = directory if directory is not None else default_directory(grid, config)
        self.on_event = on_event
        configured = ConfiguredEvaluation(config.evaluator, config) if config.evaluator is not None else None
        self.evaluate_fn = evaluate_fn or (configured.evaluate if configured else None)
        self.gate_fn = gate_fn or (configured.decide if configured else None)
        self.publish_unevaluated = bool(config.evaluator and config.evaluator.publish_if_evaluation_fails)
        self.validate_fn = validate_fn
        self._fingerprints: dict[str, str] = {}

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> list[RoundRecord]:
        start = self.ledger.last_done() + 1
        if start > 1:
            log.info("resuming after round %d (finished rounds are on disk)", start - 1)
        for r in range(start, self.cfg.rounds + 1):
            self.run_round(r)
        return self.ledger.records()

    def run_round(self, r: int) -> RoundRecord:
        journal = RoundJournal(self.ledger, self._record_for(r), self.on_event)
        record = journal.record
        if record.status.terminal:
            return record
        trust = load_coordinator_trust(self.cfg, self.identity)  # re-read each round: revocations apply at once
        if record.status in (RoundStatus.OPEN, RoundStatus.FAILED):
            self._collect(journal, trust)
            if self.cfg.selection.enabled:
                self._settle(journal)
            else:
                self._merge(journal)
        if record.status == RoundStatus.SELECTING:
            self._select(journal, trust)
        if self.evaluate_fn is not None and record.evaluation is None:
            self._assess(journal)
        if record.gate is not None and not record.gate.publish:
            record.status = RoundStatus.REFUSED
            record.finished_at = time.time()
            log.warning("round %d: the gate refused the model (%s); it is neither signed nor pushed", r, record.gate.reason)
            journal.emit(EventKind.REFUSED, detail=record.gate.reason)
            return record
        self._publish(journal, trust)
        record.status = RoundStatus.COMPLETED
        record.finished_at = time.time()
        log.info("round %d completed: %d contributor(s), %d rejected, %d dropped, %d late", r, len(record.contributions),
                 len(record.rejections), len(record.drops), len(record.late))  # fmt: skip
        journal.emit(EventKind.COMPLETED)
        return record

    # -- records and references -------------------------------------------------------------------
    def _record_for(self, r: int) -> RoundRecord:
        record = self.ledger.load(r)
        if record is None:
            record = RoundRecord(round=r, federation=self.cfg.name, strategy=self.cfg.strategy.spec_fields(), reference=self.reference_for(r))
            self.ledger.save(record)
        elif record.status == RoundStatus.FAILED:  # a restart retries a round that missed its quorum
            record.attempts += 1
            record.events.append(RoundEvent(round=r, kind=EventKind.RETRIED, detail=record.failure or ""))
            record.status, record.failure = RoundStatus.OPEN, None
            record.drops, record.rejections, record.late, record.excluded, record.not_sampled = [], [], [], [], []
            self.ledger.save(record)
        return record

    def reference_for(self, round_id: int) -> Reference:
        last = self.ledger.last_published(before=round_id) if self.cfg.reference == "global" else None
        if last is not None:
            path = self.ledger.model_dir(last.round)
            return Reference(kind="global", path=str(path), fingerprint=self.fingerprint(path), round=last.round)
        path = Path(self.cfg.base_model)
        return Reference(kind="base", path=str(path), fingerprint=self.fingerprint(path))

    def fingerprint(self, model_dir: Path) -> str:
        key = str(Path(model_dir).resolve())
        if key not in self._fingerprints:
            with CheckpointReader(model_dir) as reader:
                self._fingerprints[key] = model_fingerprint(reader)
        return self._fingerprints[key]

    # -- stages -----------------------------------------------------------------------------------
    def _collect(self, journal: RoundJournal, trust) -> None:
        record = journal.record
        who = Membership(self.grid, self.directory, trust, self.cfg).choose(record.round)
        record.expected, record.sampled = who.expected, who.sampled
        record.not_sampled, record.excluded = who.not_sampled, who.excluded
        for inst in who.late:
            record.late.append(Absence(institution=inst, reason=f"not connected when the round opened (waited up to {self.cfg.wait_for_clients_s:g} s)"))
        journal.emit(EventKind.OPENED, detail=f"asked {', '.join(who.sampled) or 'nobody'}")
        for inst in who.late:
            journal.emit(EventKind.LATE, institution=inst)
        for e in who.excluded:
            journal.emit(EventKind.EXCLUDED, institution=e.institution, node=e.node, detail=e.reason)
        Collection(self.grid, self.cfg, journal, who, trust=trust, identity=self.identity).run()

    def _quorum(self, journal: RoundJournal) -> list[str]:
        """The accepted contributors; the round fails here when they are too few (or too many) to merge."""
        cfg, record = self.cfg, journal.record
        contributors = RoundSpool(cfg.state_dir, record.round).accepted_institutions()
        _, most = cfg.strategy.models_allowed()
        if len(contributors) < cfg.min_clients or (most is not None and len(contributors) > most):
            why = (f"quorum not met: {len(contributors)} verified contribution(s), min_clients is {cfg.min_clients}"
                   if len(contributors) < cfg.min_clients else f"{cfg.strategy.method} merges at most {most} contributions, got {len(contributors)}")  # fmt: skip
            record.status, record.failure = RoundStatus.FAILED, why
            journal.emit(EventKind.FAILED, detail=why)
            raise RoundFailed(f"round {record.round}: {why}")
        return contributors

    # -- selection -----------------------------------------------------------------------------------
    def _settle(self, journal: RoundJournal) -> None:
        """Contributions are final: the round goes on to selection (a restart does not collect again)."""
        self._quorum(journal)
        journal.record.status = RoundStatus.SELECTING
        journal.save()

    def _select(self, journal: RoundJournal, trust) -> None:
        from fedmerge.server.selection import SelectionStage

        stage = SelectionStage(self.grid, self.cfg, journal, self.ledger, identity=self.identity, trust=trust, directory=self.directory,
                               fingerprint=self.fingerprint, validate_fn=self.validate_fn)  # fmt: skip
        if not stage.run():
            self._merge(journal)  # the fallback: the configured strategy, recorded as such

    def _merge(self, journal: RoundJournal) -> None:
        from fedmerge.merging.engine import MergeSpec, merge
        from fedmerge.merging.taskvector import DeltaCheckpoint

        cfg, record = self.cfg, journal.record
        spool = RoundSpool(cfg.state_dir, record.round)
        contributors = self._quorum(journal)
        out = self.ledger.model_dir(record.round)
        compressed_publication.clear(out)  # a merge that finished before a crash but was not recorded: redo it, it is deterministic
        compressed = cfg.publish_compression != "none"
        t0 = time.perf_counter()
        merge(
            record.reference.path,
            [DeltaCheckpoint(spool.accepted_dir(i), label=i) for i in contributors],
            compressed_publication.merged_dir_of(out) if compressed else out,
            MergeSpec(**cfg.strategy.spec_fields()),
            progress=False,
            metadata={"round": record.round, "contributors": contributors, "federation": cfg.name},
            durable=not compressed,  # a merge encoded and rebuilt at once is scratch: redone after a crash, never recovered
            direct=False,  # read again at once: hashed, signed, evaluated and pushed
        )
        seconds = time.perf_counter() - t0
        if compressed:  # what is published (and evaluated, signed, pushed) is what hospitals rebuild
            compressed_publication.rebuild_as_published(compressed_publication.merged_dir_of(out), Path(record.reference.path), out, cfg.publish_compression)
        record.merge = MergeOutcome(method=cfg.strategy.method, contributors=contributors, seconds=seconds, model_dir=str(out), fingerprint=self.fingerprint(out))
        record.status = RoundStatus.MERGED
        log.info("round %d: merged %d contribution(s) with %s in %.1f s", record.round, len(contributors), cfg.strategy.method, seconds)
        journal.emit(EventKind.MERGED, detail=f"{len(contributors)} contribution(s), {record.merge.fingerprint}")

    def _assess(self, journal: RoundJournal) -> None:
        """Score the round's model and let the gate decide; a failed evaluation is recorded, never lost."""
        record = journal.record
        assert record.merge is not None and self.evaluate_fn is not None
        try:
            result = self.evaluate_fn(record.round, Path(record.merge.model_dir))
        except Exception as exc:  # an evaluator crash must not lose the merged round
            log.error("round %d: evaluation failed: %s", record.round, exc)
            record.evaluation = Evaluation(error=f"{type(exc).__name__}: {exc}")
            if self.gate_fn is not None:
                record.gate = GateOutcome(
                    publish=self.publish_unevaluated,
                    reason=("published without scores (publish_if_evaluation_fails)" if self.publish_unevaluated
                            else "refused: the model could not be evaluated, so a regression cannot be ruled out"),
                )  # fmt: skip
            journal.emit(EventKind.EVALUATED, detail=record.evaluation.error)
            if record.gate is not None:
                journal.emit(EventKind.GATED, detail=record.gate.reason)
            return
        record.evaluation = evaluation_of(result)
        journal.emit(EventKind.EVALUATED, detail=", ".join(f"{t} {m}" for t, m in sorted(result.accuracies().items())))
        if self.gate_fn is not None:
            record.gate = gate_outcome_of(self.gate_fn(result))
            journal.emit(EventKind.GATED, detail=("published: " if record.gate.publish else "refused: ") + record.gate.reason)

    def _publish(self, journal: RoundJournal, trust) -> None:
        from fedmerge.security.model_sign import sign_model

        record = journal.record
        assert record.merge is not None
        model_dir = Path(record.merge.model_dir)
        if record.publication is None:
            sign_model(model_dir, self.identity, round_id=record.round, fingerprint=record.merge.fingerprint, trust=trust)
            record.publication = Publication(signer=self.identity.name, round=record.round, fingerprint=record.merge.fingerprint, model_bytes=0)
            journal.emit(EventKind.SIGNED, detail=record.merge.fingerprint)
        targets = roster(self.grid, self.directory, trust)
        if self.cfg.publish_compression != "none":
            pushed = compressed_publication.push_folder(model_dir)
            Push(self.grid, self.cfg, journal, targets).run(pushed, rebuild_against=record.reference.fingerprint)
            shutil.rmtree(pushed, ignore_errors=True)
        else:
            Push(self.grid, self.cfg, journal, targets).run(model_dir)
