"""Where the coordinator keeps a round's contributions on disk, and its journal of what is decided.

Layout under ``<state_dir>/rounds/round-NNNN/``::

    incoming/node-<id>/        package files being received, part by part (only once its plan
                               passed the limits)
    incoming/node-<id>.json    the plan, the institution the node is bound to, and the parts
                               received so far (rewritten atomically)
    accepted/<institution>/    verified delta, unpacked as a DeltaCheckpoint folder
    record.json                the round's record (contributors, rejections, strategy, fingerprints...)

Every write that a decision rests on is made durable before it counts: part bytes are fsynced
before the part is marked received, and an accepted delta is unpacked atomically (folder renamed
into place) and fsynced before the record lists it. A coordinator restarted at any point finds
each contribution either accepted, or still incoming, never half-accepted. What a dropped or
rejected node sent is deleted at once (``discard``), and what is still incoming when a round's
collection ends is deleted with it (``discard_incoming``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from fedmerge.checkpoints.atomic import fsync_dir, fsync_tree, write_json_atomic
from fedmerge.protocol import PartPlan, write_part


class RoundSpool:
    """One round's contributions on the coordinator's disk."""

    def __init__(self, state_dir: str | os.PathLike[str], round_id: int):
        self.round_id = round_id
        self.root = Path(state_dir) / "rounds" / f"round-{round_id:04d}"
        self.incoming = self.root / "incoming"
        self.accepted = self.root / "accepted"
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.accepted.mkdir(parents=True, exist_ok=True)

    # -- receiving -------------------------------------------------------------------------------
    def package_dir(self, node_id: int) -> Path:
        return self.incoming / f"node-{node_id}"

    def _journal(self, node_id: int) -> Path:
        return self.incoming / f"node-{node_id}.json"

    def start(self, node_id: int, plan: PartPlan, institution: str) -> set[int]:
        """Begin (or resume) receiving a node's package; returns the parts already on disk."""
        journal = self._journal(node_id)
        if journal.exists():
            data = json.loads(journal.read_text())
            if data["plan"] == plan.to_json():
                return set(data["received"])
            shutil.rmtree(self.package_dir(node_id), ignore_errors=True)
        self.package_dir(node_id).mkdir(parents=True, exist_ok=True)
        write_json_atomic(journal, {"plan": plan.to_json(), "institution": institution, "received": []})
        return set()

    def receive_part(self, node_id: int, plan: PartPlan, index: int, data: bytes) -> bool:
        """Write one part durably; True when every part of the plan is on disk."""
        write_part(self.package_dir(node_id), plan, index, data, fsync=True)
        journal = self._journal(node_id)
        state = json.loads(journal.read_text())
        state["received"] = sorted(set(state["received"]) | {index})
        write_json_atomic(journal, state)
        return len(state["received"]) == len(plan.parts)

    def nodes_incoming(self) -> list[int]:
        """Nodes with anything under ``incoming/`` (a journal or a package folder)."""
        ids = set()
        for p in self.incoming.glob("node-*"):
            stem = p.name.removesuffix(".json").removeprefix("node-")
            if stem.isdigit():
                ids.add(int(stem))
        return sorted(ids)

    def discard_incoming(self) -> list[int]:
        """Delete everything still incoming (the round's collection is over); the nodes it was from."""
        nodes = self.nodes_incoming()
        for node in nodes:
            self.discard(node)
        return nodes

    # -- accepting -------------------------------------------------------------------------------
    def accepted_dir(self, institution: str) -> Path:
        return self.accepted / institution

    def accepted_institutions(self) -> list[str]:
        return sorted(p.name for p in self.accepted.iterdir() if p.is_dir() and not p.name.startswith("."))

    def unpack_dir(self, node_id: int) -> Path:
        """Where a package's deltas are written while it is verified (one pass, before the sender is known)."""
        return self.root / "unpacking" / f"node-{node_id}"

    def accept(self, node_id: int, sender: str) -> Path:
        """Move a verified, unpacked delta to ``accepted/<sender>/`` durably, then drop the incoming copy."""
        src = self.unpack_dir(node_id)
        dest = self.accepted_dir(sender)
        fsync_tree(src)
        os.replace(src, dest)
        fsync_dir(self.accepted)
        fsync_dir(src.parent)
        self.discard(node_id)
        return dest

    def discard(self, node_id: int) -> None:
        shutil.rmtree(self.package_dir(node_id), ignore_errors=True)
        shutil.rmtree(self.unpack_dir(node_id), ignore_errors=True)
        self._journal(node_id).unlink(missing_ok=True)
