"""What a rogue hospital's ClientApp does instead of the honest thing, round by round.

``FEDMERGE_TEST_ROGUE="1:escape,2:stall"`` picks a behaviour per round (rounds not named are
honest):

- ``escape``: its open reply's part plan names ``../x``;
- ``tebibyte``: its plan declares one 1 TiB data file;
- ``stall``: it answers its first part requests, then never again (its ClientApps hang);
- ``replay``: it offers its previous round's package (signed for that round) again.
"""

from __future__ import annotations

import json
import time

TEBIBYTE = 1 << 40


def behaviours(spec: str) -> dict[int, str]:
    return {int(r): what for r, what in (item.split(":", 1) for item in spec.split(",") if item)}


def install(spec: str) -> None:
    from fedmerge.client.node import HospitalNode
    from fedmerge.protocol import FileEntry, PartPlan, Segment

    plan_for = behaviours(spec)
    honest_open, honest_fetch = HospitalNode.open_round, HospitalNode.fetch_part

    def open_round(self, r, reference_fingerprint, part_bytes, delta_dtype="float32", **kw):
        what = plan_for.get(r)
        out = honest_open(self, r - 1 if what == "replay" else r, reference_fingerprint, part_bytes, delta_dtype, **kw)
        if what == "escape":
            plan = json.loads(out["plan"])
            plan["files"][0]["path"] = "../x"
            plan["parts"][0][0][0] = "../x"
            out["plan"] = json.dumps(plan)
        elif what == "tebibyte":
            out["plan"] = PartPlan([FileEntry("data-00000.bin", TEBIBYTE, "0" * 64)], [[Segment("data-00000.bin", 0, TEBIBYTE)]], TEBIBYTE).to_json()
        return out

    def fetch_part(self, r, index):
        if plan_for.get(r) == "stall" and index >= 2:
            time.sleep(3600)
        return honest_fetch(self, r - 1 if plan_for.get(r) == "replay" else r, index)

    HospitalNode.open_round = open_round
    HospitalNode.fetch_part = fetch_part
