"""Scoring candidates at the hospitals, each on its own validation split (``mode: federated``).

Each contributing hospital still connected and bound is sent every candidate's signed delta
package, part by part (``candidate_part``, at most ``parts_in_flight`` outstanding per hospital
and ``parts_in_flight_total`` in all, as in collection), and once all its parts are
acknowledged it is asked to score them (``score_candidates``). Its reply must hold exactly one
accuracy in [0, 1] per candidate and task, the same tasks for every candidate, and nothing else
(``protocol.read_scores``); then the scores are recorded at once. A hospital that refuses, sends
anything else, disconnects or runs out of time is recorded as not scored, with the reason
(scrubbed of its paths), and the selection goes on without it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from fedmerge import protocol
from fedmerge.server.config import FederationConfig
from fedmerge.server.exchange import Exchange, NodeFailed, Request, decode_unless_refused
from fedmerge.server.ledger import RoundJournal
from fedmerge.server.record import EventKind, ScoreFailure

log = logging.getLogger(__name__)

_SCORE = "score"


class FederatedScoring:
    """One round's candidates sent to ``targets`` (institution -> node) and scored there."""

    def __init__(self, grid, config: FederationConfig, journal: RoundJournal, targets: dict[str, int], packages: dict[str, Path]):
        self.grid = grid
        self.cfg = config
        self.journal = journal
        self.record = journal.record
        self.r = self.record.round
        self.by_node = {node: inst for inst, node in targets.items()}
        self.packages = packages  # candidate id -> its package folder, in candidate order
        self.plans = {cid: protocol.plan_folder(pkg, config.part_bytes, extra={"round": self.r, "candidate": cid}) for cid, pkg in packages.items()}
        self.unacknowledged: dict[int, int] = {}

    def run(self) -> None:
        cfg = self.cfg
        exchange = Exchange(self.grid, group_id=f"{self.r}-select", window=cfg.parts_in_flight, total_window=cfg.parts_in_flight_total,
                            make_content=protocol.make_lazy_content, ttl=cfg.round_timeout_s + 60)  # fmt: skip
        for node, inst in sorted(self.by_node.items()):
            requests = self._part_requests()
            self.unacknowledged[node] = len(requests)
            exchange.add(node, requests or [self._score_request()])
        failures = exchange.run(self._on_reply, time.monotonic() + cfg.round_timeout_s)
        for node, reason in sorted(failures.items()):
            inst = self.by_node[node]
            reason = protocol.scrub_paths(reason)
            log.warning("round %d: %s did not score the candidates: %s", self.r, inst, reason)
            self.record.selection.failures.append(ScoreFailure(scorer=inst, node=node, reason=reason))
            self.journal.emit(EventKind.NOT_SCORED, institution=inst, node=node, detail=reason)

    # -- requests ------------------------------------------------------------------------------------
    def _part_requests(self) -> list[Request]:
        out = []
        for cid, plan in self.plans.items():
            plan_json = plan.to_json()
            for i in range(len(plan.parts)):
                meta = {"round": self.r, "candidate": cid, "plan": plan_json, "part": i}
                out.append(Request(protocol.CANDIDATE_PART, meta, protocol.FolderPart(self.packages[cid], plan, i), (cid, i)))
        return out

    def _score_request(self) -> Request:
        meta = {
            "round": self.r,
            "reference_fingerprint": self.record.reference.fingerprint,
            "delta_dtype": self.cfg.selection.delta_dtype,
            "candidates": list(self.plans),
        }
        return Request(protocol.SCORE_CANDIDATES, meta, None, _SCORE)

    # -- replies -------------------------------------------------------------------------------------
    def _on_reply(self, node: int, tag: Any, reply) -> list[Request] | None:
        meta, _ = decode_unless_refused(reply)
        if tag == _SCORE:
            self._scored(node, meta)
            return None
        cid, index = tag
        if meta.get("round") != self.r or meta.get("candidate") != cid or meta.get("part") != index:
            raise NodeFailed(f"acknowledged another part than {cid} part {index}")
        sel = self.record.selection
        inst = self.by_node[node]
        sel.bytes_sent[inst] = sel.bytes_sent.get(inst, 0) + self.plans[cid].part_size(index)
        self.unacknowledged[node] -= 1
        if self.unacknowledged[node] == 0:
            self.journal.save()
            return [self._score_request()]
        return None

    def _scored(self, node: int, meta: dict[str, Any]) -> None:
        inst = self.by_node[node]
        try:
            scores = protocol.read_scores(meta, self.r, list(self.plans))
        except protocol.ProtocolError as exc:
            raise NodeFailed(f"scores refused: {exc}") from None
        self.record.selection.scores[inst] = scores
        detail = "; ".join(f"{cid} " + ", ".join(f"{t} {v:.4f}" for t, v in sorted(tasks.items())) for cid, tasks in scores.items())
        log.info("round %d: %s scored the candidates: %s", self.r, inst, detail)
        self.journal.emit(EventKind.SCORED, institution=inst, node=node, detail=detail)
