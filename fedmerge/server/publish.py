"""Pushing a signed model to the hospitals, part by part, and recording who installed it.

Only nodes bound to an enrolled, unrevoked institution receive it; a node bound to no
institution, or to a revoked one, gets nothing. The commit tells each hospital what the round
made of it (``outcome``: contributed, late, rejected...), so a hospital that did not contribute
knows it. The hospital checks the coordinator's signature, the round and the fingerprint itself
before installing.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fedmerge import protocol
from fedmerge.server.config import FederationConfig
from fedmerge.server.exchange import Exchange, GraceDeadline, Request, decode_unless_refused
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

    def run(self, model_dir: Path, rebuild_against: str | None = None) -> None:
        """Push ``model_dir``: the model, or (``rebuild_against``: the reference's fingerprint) the
        folder of a compressed publication, which each hospital rebuilds on that reference."""
        cfg, record = self.cfg, self.record
        publication = record.publication
        assert publication is not None
        extra = {"round": self.r, "fingerprint": publication.fingerprint}
        if rebuild_against is not None:
            extra[protocol.REBUILD_AGAINST] = rebuild_against
        plan = protocol.plan_folder(model_dir, cfg.part_bytes, extra=extra)
        publication.targets = sorted(self.targets)
        publication.model_bytes = plan.total_bytes
        self.journal.save()
        exchange = Exchange.for_round(self.grid, cfg, f"{self.r}-install", protocol.make_lazy_content)
        by_node = {node: inst for inst, node in self.targets.items()}
        for node, inst in sorted(by_node.items()):
            exchange.add(node, self._requests(model_dir, plan, record.outcome_of(inst)))
        # Nodes that did not contribute (dropped, maybe dead) get a grace period once every
        # contributor has installed the model or refused it, not the whole round timeout.
        contributor_nodes = {c.node for c in record.contributions.values()} & set(by_node)
        deadline = GraceDeadline(cfg.round_timeout_s, cfg.straggler_grace_s, lambda: contributor_nodes <= set(self.installed) | set(exchange.failures))
        failures = exchange.run(self._on_reply, deadline)
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
        meta, _ = decode_unless_refused(reply, "the hospital refused the model")
        if tag[0] == "commit":
            self.installed[node] = str(meta.get("installed", ""))
            inst = next(i for i, n in self.targets.items() if n == node)
            self.journal.emit(EventKind.INSTALLED, institution=inst, node=node)
