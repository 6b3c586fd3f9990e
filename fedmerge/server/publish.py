"""Pushing a signed model to the hospitals, part by part, and recording who installed it.

Only nodes bound to an enrolled, unrevoked institution receive it; a node bound to no
institution, or to a revoked one, gets nothing. The commit tells each hospital what the round
made of it (``outcome``: contributed, late, rejected...), so a hospital that did not contribute
knows it. The hospital checks the coordinator's signature, the round and the fingerprint itself
before installing.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from fedmerge import protocol
from fedmerge.server.config import FederationConfig
from fedmerge.server.exchange import Exchange, NodeFailed, Request, decode
from fedmerge.server.ledger import RoundJournal
from fedmerge.server.membership import Roster
from fedmerge.server.record import Drop, EventKind

log = logging.getLogger(__name__)


class Push:
    """One round's push of its published model to the roster's nodes."""

    def __init__(self, grid, config: FederationConfig, journal: RoundJournal, roster: Roster):
        self.grid = grid
        self.cfg = config
        self.journal = journal
        self.record = journal.record
        self.r = self.record.round
        self.targets = dict(roster.nodes)  # institution -> node
        self.installed: dict[int, str] = {}

    def run(self, model_dir: Path) -> None:
        cfg, record = self.cfg, self.record
        publication = record.publication
        assert publication is not None
        plan = protocol.plan_folder(model_dir, cfg.part_bytes, extra={"round": self.r, "fingerprint": publication.fingerprint})
        publication.targets = sorted(self.targets)
        publication.model_bytes = plan.total_bytes
        self.journal.save()
        exchange = Exchange(self.grid, group_id=f"{self.r}-install", window=cfg.parts_in_flight, total_window=cfg.parts_in_flight_total,
                            make_content=protocol.make_lazy_content, ttl=cfg.round_timeout_s + 60)  # fmt: skip
        by_node = {node: inst for inst, node in self.targets.items()}
        for node, inst in sorted(by_node.items()):
            exchange.add(node, self._requests(model_dir, plan, record.outcome_of(inst)))
        self.hard_deadline = time.monotonic() + cfg.round_timeout_s
        self._grace_from: float | None = None
        self.contributor_nodes = {c.node for c in record.contributions.values()} & set(by_node)
        failures = exchange.run(self._on_reply, self._deadline)
        publication.installed = sorted(by_node[n] for n in self.installed)
        publication.failures = [Drop(institution=by_node[n], node=n, stage="install", reason=why) for n, why in sorted(failures.items())]
        self.journal.save()

    def _requests(self, model_dir: Path, plan: protocol.PartPlan, outcome: str) -> list[Request]:
        plan_json = plan.to_json()
        last = len(plan.parts) - 1
        reqs = []
        for i in range(len(plan.parts)):
            meta = {"round": self.r, "plan": plan_json, "part": i, "commit": i == last}
            if i == last:
                meta["outcome"] = outcome
            reqs.append(Request(protocol.INSTALL_PART, meta, protocol.FolderPart(model_dir, plan, i), ("commit" if i == last else "part", i)))
        if not plan.parts:
            reqs.append(Request(protocol.INSTALL_COMMIT, {"round": self.r, "plan": plan_json, "outcome": outcome}, None, ("commit", None)))
        return reqs

    def _on_reply(self, node: int, tag, reply) -> None:
        meta, _ = decode(reply)
        refusal = protocol.read_refusal(meta)
        if refusal is not None:
            raise NodeFailed(f"the hospital refused the model: {refusal}")
        if tag[0] == "commit":
            self.installed[node] = str(meta.get("installed", ""))
            inst = next(i for i, n in self.targets.items() if n == node)
            self.journal.emit(EventKind.INSTALLED, institution=inst, node=node)

    def _deadline(self) -> float:
        # Nodes that did not contribute (dropped, maybe dead) get a grace period once every
        # contributor has installed, not the whole round timeout.
        if self.cfg.straggler_grace_s is not None and self.contributor_nodes <= set(self.installed):
            if self._grace_from is None:
                self._grace_from = time.monotonic()
            return min(self.hard_deadline, self._grace_from + self.cfg.straggler_grace_s)
        return self.hard_deadline
