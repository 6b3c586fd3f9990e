"""Collecting a round's contributions: open, check the plan, fetch the parts, verify, accept or reject.

Each sampled node is asked to open the round; its reply carries the plan of its package (and,
when the round is small enough, the first part). The plan is checked against the package limits
before anything is written; then the node's parts are requested, and spooled as they arrive, at
the node's own pace. When a package is complete it is verified (signature, round, reference,
sealing, every byte) and accepted for the institution its node is bound to, or rejected with a
typed reason. A node that fails, stalls or is rejected leaves nothing behind in the spool.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
from typing import Any

from fedmerge import protocol
from fedmerge.checkpoints import CheckpointReader
from fedmerge.errors import FedmergeError
from fedmerge.server.config import FederationConfig
from fedmerge.server.errors import ClaimMismatch, DuplicateContribution, SignerNotBound
from fedmerge.server.exchange import Exchange, GraceDeadline, NodeFailed, Request, decode_unless_refused
from fedmerge.server.ledger import RoundJournal
from fedmerge.server.membership import Participants
from fedmerge.server.record import Contribution, Drop, EventKind, Rejection
from fedmerge.server.spool import RoundSpool

log = logging.getLogger(__name__)

_OPEN = "open"


def package_limits(config: FederationConfig, reference: CheckpointReader) -> protocol.PlanLimits:
    """What a delta package may be: its three kinds of files, at most ``max_package_bytes``.

    Without a configured maximum: the delta of every reference tensor at ``delta_dtype``, encoded
    as ``compression`` asks, plus a GCM tag per smallest chunk (sealed), plus the largest manifest
    and its signature.
    """
    from fedmerge.checkpoints.codecs import parse_compression
    from fedmerge.security.manifest import DATA_FILE_RE, MANIFEST_NAME, MAX_MANIFEST_BYTES, MIN_CHUNK_BYTES, SIGNATURE_NAME
    from fedmerge.security.manifest import delta_dtype
    from fedmerge.security.seal import TAG_BYTES

    names = re.compile("|".join([re.escape(MANIFEST_NAME), re.escape(SIGNATURE_NAME), DATA_FILE_RE.pattern.strip("^$")]))
    limit = config.max_package_bytes
    if limit is None:
        code, compression = delta_dtype(config.delta_dtype), parse_compression(config.compression)
        data = sum(compression.nbytes(info.shape, code) for info in reference.infos())
        limit = data + math.ceil(data / MIN_CHUNK_BYTES) * TAG_BYTES + MAX_MANIFEST_BYTES + 64 * 1024
    return protocol.PlanLimits(names=names, max_total_bytes=limit, part_bytes=config.part_bytes)


class _Rejected(NodeFailed):
    """Stops the exchange with a node whose contribution was rejected (recorded already, not a drop)."""


class Collection:
    """One round's collection; ``run`` returns when every sampled node contributed, failed or timed out."""

    def __init__(self, grid, config: FederationConfig, journal: RoundJournal, participants: Participants, *, trust, identity):
        self.grid = grid
        self.cfg = config
        self.journal = journal
        self.record = journal.record
        self.r = self.record.round
        self.spool = RoundSpool(config.state_dir, self.r)
        self.trust = trust
        self.identity = identity
        self.bound = {node: inst for inst, node in participants.sampled.items()}
        self.plans: dict[int, protocol.PartPlan] = {}
        self.rejected: set[int] = set()

    # -- the stage ---------------------------------------------------------------------------------
    def reconcile(self) -> None:
        """Forget recorded contributions whose delta never reached ``accepted/`` (a crash in between)."""
        on_disk = set(self.spool.accepted_institutions())
        for inst in [i for i in self.record.contributions if i not in on_disk]:
            log.warning("round %d: %s's contribution was recorded but not stored before a restart; asking again", self.r, inst)
            del self.record.contributions[inst]

    def run(self) -> None:
        cfg = self.cfg
        self.reconcile()
        accepted = set(self.spool.accepted_institutions())
        asked = {node: inst for node, inst in self.bound.items() if inst not in accepted}
        for node, inst in sorted(self.bound.items()):
            if inst in accepted:
                log.info("round %d: %s already contributed (accepted before a restart); not asked again", self.r, inst)
        if not asked:
            self.spool.discard_incoming()
            return
        open_meta = {
            "round": self.r,
            "reference_fingerprint": self.record.reference.fingerprint,
            "part_bytes": cfg.part_bytes,
            # A first part riding on each open reply saves a message per client, but all N of them
            # wait at the SuperLink at once: only worth it while N is within the global cap.
            "with_first_part": len(asked) <= cfg.parts_in_flight_total,
            "delta_dtype": cfg.delta_dtype,
            "compression": cfg.compression,
        }
        # With quorum verified, stragglers get a grace period rather than the whole timeout.
        deadline = GraceDeadline(cfg.round_timeout_s, cfg.straggler_grace_s, lambda: len(self.record.contributions) >= cfg.min_clients)
        with CheckpointReader(self.record.reference.path) as reference:
            self.reference = reference
            self.limits = package_limits(cfg, reference)
            exchange = Exchange.for_round(self.grid, cfg, str(self.r), protocol.make_content)
            for node in sorted(asked):
                exchange.add(node, [Request(protocol.OPEN_ROUND, open_meta, None, _OPEN)])
            failures = exchange.run(self._on_reply, deadline)
        for node, reason in sorted(failures.items()):
            if node not in self.rejected:
                self._drop(node, reason)
        leftovers = self.spool.discard_incoming()
        if leftovers:
            log.info("round %d: deleted what nodes %s left in the spool", self.r, leftovers)

    # -- replies -----------------------------------------------------------------------------------
    def _on_reply(self, node: int, tag: Any, reply) -> list[Request] | None:
        meta, payload = decode_unless_refused(reply)
        if tag == _OPEN:
            return self._on_open(node, meta, payload)
        self._receive(node, int(tag), meta, payload)
        return None

    def _on_open(self, node: int, meta: dict[str, Any], payload: bytes | None) -> list[Request]:
        inst = self.bound[node]
        claimed = str(meta.get("institution", ""))
        try:
            if claimed != inst:
                raise ClaimMismatch(f"node {node} is bound to {inst} but says it is {claimed!r}")
            plan = protocol.PartPlan.from_json(str(meta["plan"]))
            self.limits.check(plan, who=inst)
        except (FedmergeError, KeyError) as exc:
            raise self._reject(node, exc) from None
        self.plans[node] = plan
        have = self.spool.start(node, plan, inst)
        if payload is not None and 0 not in have:
            if self._receive(node, 0, meta, payload):
                return []  # a one-part package, complete with the open reply (and finished already)
            have.add(0)
        todo = [i for i in range(len(plan.parts)) if i not in have]
        if not todo:
            self._finish(node)
        return [Request(protocol.FETCH_PART, {"round": self.r, "part": i}, None, i) for i in todo]

    def _receive(self, node: int, index: int, meta: dict[str, Any], data: bytes | None) -> bool:
        """Spool one part; True when it completed the package (which is then verified and decided)."""
        plan = self.plans[node]
        if data is None or meta.get("part") != index or meta.get("sha256") != protocol.part_digest(data):
            raise NodeFailed(f"part {index} arrived damaged, missing or out of place")
        inst = self.bound[node]
        try:
            complete = self.spool.receive_part(node, plan, index, data)
        except FedmergeError as exc:  # a part that does not fit the node's own plan (its length)
            raise self._reject(node, exc) from None
        self.record.bytes_received[inst] = self.record.bytes_received.get(inst, 0) + len(data)
        if complete:
            self._finish(node)
        return complete

    # -- decisions ---------------------------------------------------------------------------------
    def _finish(self, node: int) -> None:
        """All parts are on disk: verify the package, then accept (durably) or reject with the reason."""
        from fedmerge.security.verify import verify_package

        inst, plan, spool = self.bound[node], self.plans[node], self.spool
        pkg = spool.package_dir(node)
        try:
            protocol.check_complete(pkg, plan)
            shutil.rmtree(spool.unpack_dir(node), ignore_errors=True)
            spool.unpack_dir(node).parent.mkdir(parents=True, exist_ok=True)
            verified = verify_package(
                pkg, self.trust, expected_round=self.r, expected_reference=self.record.reference.fingerprint, opener=self.identity,
                expected_tensors=self.reference, expected_dtype=self.cfg.delta_dtype, expected_compression=self.cfg.compression,
                unpack_to=spool.unpack_dir(node),
                require_sealed=self.cfg.require_sealed,
            )  # fmt: skip
            if verified.sender != inst:
                raise SignerNotBound(f"node {node} is bound to {inst} but the package is signed by {verified.sender!r}")
            if inst in spool.accepted_institutions():
                raise DuplicateContribution(f"{inst} already contributed to round {self.r}")
        except FedmergeError as exc:
            raise self._reject(node, exc) from None
        # Recorded first, then moved into accepted/: a restart in between finds it recorded but
        # not in the spool, drops it from the record (``reconcile``) and asks the node again.
        self.record.contributions[inst] = Contribution(
            institution=inst, node=node, package_id=verified.package_id, bytes=plan.total_bytes,
            sealed=verified.sealed, delta_dir=str(spool.accepted_dir(inst)),
        )  # fmt: skip
        self.journal.save()
        spool.accept(node, inst)
        log.info("round %d: accepted the contribution of %s (node %s)", self.r, inst, node)
        self.journal.emit(EventKind.ACCEPTED, institution=inst, node=node, detail=f"{plan.total_bytes} bytes")

    def _reject(self, node: int, exc: BaseException) -> _Rejected:
        """Record the rejection and delete what the node sent; the caller raises what this returns."""
        inst = self.bound[node]
        error = type(exc).__name__ if not isinstance(exc, KeyError) else "ProtocolError"
        reason = str(exc) if not isinstance(exc, KeyError) else f"the open reply has no {exc}"
        log.warning("round %d: rejected the contribution of %s (node %s): %s: %s", self.r, inst, node, error, reason)
        self.spool.discard(node)
        self.rejected.add(node)
        self.record.rejections.append(Rejection(institution=inst, node=node, error=error, reason=reason))
        self.journal.emit(EventKind.REJECTED, institution=inst, node=node, detail=f"{error}: {reason}")
        return _Rejected(f"{error}: {reason}")

    def _drop(self, node: int, reason: str) -> None:
        inst = self.bound[node]
        self.spool.discard(node)
        stage = "transfer" if node in self.plans else "open"
        self.record.drops.append(Drop(institution=inst, node=node, stage=stage, reason=reason))
        self.journal.emit(EventKind.DROPPED, institution=inst, node=node, detail=f"{stage}: {reason}")

