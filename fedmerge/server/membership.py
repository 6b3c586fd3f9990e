"""Who takes part in a round: every enrolled institution with a bound node, or a sample of them.

Expected institutions are those enrolled (not revoked) in the trust store whose SuperNode is
bound in the config. With ``clients_per_round: null`` the round opens when all of them are
connected, or when ``wait_for_clients_s`` has passed; those still missing are recorded as late
(they do not contribute, and are told so when the model is published). With a sample size the
round opens once that many (and the quorum) are connected, and the sample is drawn from them,
seeded by the round. Connected nodes bound to no institution, or to a revoked one, are recorded
as excluded and never asked for anything.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field

from fedmerge.server.config import FederationConfig
from fedmerge.server.directory import NodeDirectory
from fedmerge.server.record import Exclusion

log = logging.getLogger(__name__)


@dataclass
class Roster:
    """The connected nodes, sorted into eligible institutions and the rest."""

    nodes: dict[str, int] = field(default_factory=dict)  # eligible institution -> its node
    excluded: list[Exclusion] = field(default_factory=list)


@dataclass
class Participants:
    expected: list[str]
    sampled: dict[str, int]  # institution -> node asked to contribute
    late: list[str]
    not_sampled: list[str]
    excluded: list[Exclusion]


def eligible_institutions(trust, directory: NodeDirectory) -> list[str]:
    """Bound institutions enrolled as institutions (not revoked) in the trust store."""
    out = []
    for inst in directory.institutions():
        entry = trust.get(inst)
        if entry is not None and entry.enrolled and entry.role == "institution":
            out.append(inst)
    return sorted(out)


def roster(grid, directory: NodeDirectory, trust) -> Roster:
    eligible = set(eligible_institutions(trust, directory))
    out = Roster()
    for node in sorted(grid.get_node_ids()):
        inst = directory.institution_of(node)
        if inst is None:
            out.excluded.append(Exclusion(node=node, institution=None, reason="its key is bound to no institution"))
        elif inst not in eligible:
            entry = trust.get(inst)
            why = "revoked in the trust store" if entry is not None and not entry.enrolled else "not enrolled as an institution in the trust store"
            out.excluded.append(Exclusion(node=node, institution=inst, reason=why))
        elif inst in out.nodes:
            out.excluded.append(Exclusion(node=node, institution=inst, reason=f"a second node bound to {inst} (node {out.nodes[inst]} counts)"))
        else:
            out.nodes[inst] = node
    return out


class Membership:
    def __init__(self, grid, directory: NodeDirectory, trust, config: FederationConfig, poll_s: float = 0.5):
        self.grid = grid
        self.directory = directory
        self.trust = trust
        self.cfg = config
        self.poll_s = poll_s

    def choose(self, round_id: int) -> Participants:
        expected = eligible_institutions(self.trust, self.directory)
        present = self._wait(expected)
        cfg = self.cfg
        connected = sorted(present.nodes)
        if cfg.clients_per_round is None:
            sampled = connected
        else:
            rng = random.Random(cfg.sample_seed * 1_000_003 + round_id)
            sampled = sorted(rng.sample(connected, min(cfg.clients_per_round, len(connected))))
        late = [i for i in expected if i not in present.nodes]
        log.info("round %d: %d of %d expected institution(s) connected; asking %s%s", round_id, len(connected), len(expected),
                 ", ".join(sampled) or "none", f"; late: {', '.join(late)}" if late else "")  # fmt: skip
        return Participants(
            expected=expected,
            sampled={i: present.nodes[i] for i in sampled},
            late=late,
            not_sampled=[i for i in connected if i not in sampled],
            excluded=present.excluded,
        )

    def _wait(self, expected: list[str]) -> Roster:
        cfg = self.cfg
        want = len(expected) if cfg.clients_per_round is None else min(len(expected), max(cfg.min_clients, cfg.clients_per_round))
        deadline = time.monotonic() + cfg.wait_for_clients_s
        while True:
            now = roster(self.grid, self.directory, self.trust)
            if len(now.nodes) >= want or time.monotonic() > deadline:
                return now
            time.sleep(self.poll_s)
