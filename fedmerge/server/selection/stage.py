"""The selection stage of a round: build the candidates, have them scored, choose, promote.

Runs once the round's contributions are settled (status ``selecting``) and ends with the
round's model in ``<state_dir>/models/round-NNNN`` (status ``merged``), ready for the evaluator
and the gate like any merged round. Each step is recorded in ``RoundRecord.selection`` before
the next starts, so a restarted coordinator picks up where it stopped: built candidates are not
built again, scores already recorded are not asked for again, a choice made is not made again.

When no scorer scored every candidate (every hospital failed, or the central evaluator did),
``run`` returns False and the round loop merges the configured ``strategy`` instead; the
record says so (``selection.fallback``) and why.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from fedmerge.checkpoints.atomic import fsync_dir
from fedmerge.errors import FedmergeError
from fedmerge.protocol import candidate_id
from fedmerge.server import compressed_publication
from fedmerge.server.config import FederationConfig, candidate_label
from fedmerge.server.ledger import RoundJournal, RoundLedger
from fedmerge.server.membership import roster
from fedmerge.server.record import Candidate, EventKind, MergeOutcome, RoundStatus, ScoreFailure, Selection
from fedmerge.server.selection.candidates import build_candidate, candidate_package, candidates_dir, folder_bytes
from fedmerge.server.selection.central import CentralScoring, ConfiguredValidation, ValidateFn
from fedmerge.server.selection.federated import FederatedScoring
from fedmerge.server.selection.rule import choose
from fedmerge.server.spool import RoundSpool

log = logging.getLogger(__name__)


class SelectionStage:
    def __init__(
        self,
        grid,
        config: FederationConfig,
        journal: RoundJournal,
        ledger: RoundLedger,
        *,
        identity,
        trust,
        directory,
        fingerprint: Callable[[Path], str],
        validate_fn: ValidateFn | None = None,
    ):
        self.grid = grid
        self.cfg = config
        self.journal = journal
        self.record = journal.record
        self.r = self.record.round
        self.ledger = ledger
        self.identity = identity
        self.trust = trust
        self.directory = directory
        self.fingerprint = fingerprint
        self.validate_fn = validate_fn
        self.root = candidates_dir(config.state_dir, self.r)
        self.spool = RoundSpool(config.state_dir, self.r)

    def run(self) -> bool:
        """True when a candidate became the round's model; False: merge the configured strategy."""
        cfg = self.cfg.selection
        if self.record.selection is None:
            self.record.selection = Selection(mode=cfg.mode, rule=cfg.rule)
            self.journal.save()
        sel = self.record.selection
        if sel.chosen is None and not sel.fallback:
            self.build()
            self.score()
            self.choose()
        if sel.fallback:
            self.clean()
            return False
        self.promote()
        self.clean()
        return True

    # -- stages ------------------------------------------------------------------------------------
    def build(self) -> None:
        sel = self.record.selection
        contributors = self.spool.accepted_institutions()
        deltas = {inst: self.spool.accepted_dir(inst) for inst in contributors}
        for i, spec in enumerate(self.cfg.selection.specs()):
            cid = candidate_id(i)
            if cid in sel.unbuilt:
                continue
            known = next((c for c in sel.candidates if c.id == cid), None)
            if known is not None and self._still_there(known):
                log.info("round %d: candidate %s already built (before a restart)", self.r, cid)
                continue
            model = self.root / cid / "model"
            label = candidate_label(spec)
            t0 = time.perf_counter()
            try:
                build_candidate(self.record.reference.path, deltas, model, spec.spec_fields(),
                                {"round": self.r, "contributors": contributors, "federation": self.cfg.name, "candidate": cid})  # fmt: skip
                package_bytes = None
                if sel.mode == "federated":
                    pkg = candidate_package(model, self.record.reference.path, self.root / cid / "package", self.identity, round_id=self.r, candidate=cid,
                                            reference_fingerprint=self.record.reference.fingerprint, dtype=self.cfg.selection.delta_dtype, compression=self.cfg.selection.compression)  # fmt: skip
                    package_bytes = folder_bytes(pkg)
            except FedmergeError as exc:  # a method that cannot merge these inputs: the others still compete
                reason = f"{type(exc).__name__}: {exc}"[:600]
                log.error("round %d: candidate %s (%s) could not be built: %s", self.r, cid, label, reason)
                shutil.rmtree(self.root / cid, ignore_errors=True)
                sel.unbuilt[cid] = reason
                self.journal.emit(EventKind.CANDIDATE, detail=f"{cid} {label}: not built: {reason}")
                continue
            candidate = Candidate(id=cid, label=label, strategy=spec.spec_fields(), fingerprint=self.fingerprint(model), model_dir=str(model),
                                  seconds=time.perf_counter() - t0, package_bytes=package_bytes)  # fmt: skip
            sel.candidates = sorted([c for c in sel.candidates if c.id != cid] + [candidate], key=lambda c: int(c.id[1:]))
            log.info("round %d: built candidate %s (%s) in %.1f s", self.r, cid, label, candidate.seconds)
            self.journal.emit(EventKind.CANDIDATE, detail=f"{cid} {label}: {candidate.fingerprint}")

    def _still_there(self, c: Candidate) -> bool:
        if not Path(c.model_dir).is_dir():
            return False
        return c.package_bytes is None or (self.root / c.id / "package").is_dir()

    def score(self) -> None:
        sel = self.record.selection
        if not sel.candidates:
            return
        if sel.mode == "central":
            validate = self.validate_fn or ConfiguredValidation(self.cfg.selection.eval_config)
            CentralScoring(self.journal, validate).run()
            return
        self._score_at_hospitals()

    def _score_at_hospitals(self) -> None:
        sel = self.record.selection
        present = roster(self.grid, self.directory, self.trust).nodes
        targets: dict[str, int] = {}
        for inst in sorted(self.record.contributions):
            if inst not in sel.asked:
                sel.asked.append(inst)
            if inst in sel.scores:
                log.info("round %d: %s already scored the candidates (before a restart); not asked again", self.r, inst)
                continue
            sel.failures = [f for f in sel.failures if f.scorer != inst]  # asked again: its last failure is in the events
            if inst not in present:
                why = "not connected (or no longer enrolled) when the candidates were sent"
                sel.failures.append(ScoreFailure(scorer=inst, reason=why))
                self.journal.emit(EventKind.NOT_SCORED, institution=inst, detail=why)
                continue
            targets[inst] = present[inst]
        self.journal.save()
        if targets:
            packages = {c.id: self.root / c.id / "package" for c in sel.candidates}
            FederatedScoring(self.grid, self.cfg, self.journal, targets, packages).run()

    def choose(self) -> None:
        sel = self.record.selection
        ids = [c.id for c in sel.candidates]
        choice = choose(ids, sel.scores, sel.rule)
        sel.values = choice.values
        if choice.chosen is None:
            sel.fallback = True
            failed = "; ".join(f"{f.scorer}: {f.reason}" for f in sel.failures)
            built = "no candidate could be built" if not ids else choice.reason
            sel.reason = f"{built}; published the configured strategy ({self.cfg.strategy.method}) instead" + (f" ({failed})" if failed else "")
            log.warning("round %d: %s", self.r, sel.reason)
        else:
            sel.chosen = choice.chosen
            sel.reason = choice.reason
            log.info("round %d: selected %s (%s): %s", self.r, choice.chosen, sel.candidate(choice.chosen).label, sel.reason)
        self.journal.emit(EventKind.SELECTED, detail=sel.reason)

    def promote(self) -> None:
        """Move the chosen candidate's model to the round's model folder; the round is merged."""
        sel, record = self.record.selection, self.record
        c = sel.candidate(sel.chosen)
        out = self.ledger.model_dir(self.r)
        src = Path(c.model_dir)
        spec = self.cfg.publish_compression
        # With publish_compression the candidate is re-encoded as the publication hospitals rebuild:
        # moved aside, then rebuilt into the round's folder (redone after a restart that cut it short).
        dest = out if spec == "none" else compressed_publication.merged_dir_of(out)
        if src != out and src.is_dir():  # not moved yet (a restart may find it moved already)
            compressed_publication.clear(out)
            out.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dest)
            fsync_dir(out.parent)
        fingerprint = c.fingerprint
        if spec != "none":
            if dest.is_dir():
                shutil.rmtree(out, ignore_errors=True)
                compressed_publication.rebuild_as_published(dest, Path(record.reference.path), out, spec)
            fingerprint = self.fingerprint(out)
        c.model_dir = str(out)
        contributors = sorted(record.contributions)
        record.merge = MergeOutcome(method=c.strategy["method"], contributors=contributors, seconds=c.seconds, model_dir=str(out), fingerprint=fingerprint)
        record.status = RoundStatus.MERGED
        self.journal.emit(EventKind.MERGED, detail=f"candidate {c.id} ({c.label}), {len(contributors)} contribution(s), {c.fingerprint}")

    def clean(self) -> None:
        """Delete the packages, and the models of the candidates not published unless ``keep_candidates``."""
        if not self.root.exists():
            return
        for sub in sorted(self.root.iterdir()):
            shutil.rmtree(sub / "package", ignore_errors=True)
            if not self.cfg.selection.keep_candidates:
                shutil.rmtree(sub, ignore_errors=True)
        if not self.cfg.selection.keep_candidates:
            shutil.rmtree(self.root, ignore_errors=True)

