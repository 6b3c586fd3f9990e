"""The bare-transfer baseline: a Flower app that moves a round's bytes and does nothing else.

Each node sends ``up_bytes`` to the ServerApp in parts of ``part_bytes`` (one reply per part),
then receives ``down_bytes`` in parts: the same message count, sizes and window as a fedmerge
round (``window`` per node, ``total_window`` across nodes), without packing, verification, spooling, merging or installing.
"""

import json
import os
import time

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedmerge import protocol
from fedmerge.server.exchange import Exchange, Request

server = ServerApp()
client = ClientApp()


def numpy_content(meta: dict, payload: bytes | None):
    """A message as fedmerge built them before its raw-bytes payloads: salt + bytes in a numpy
    array, which Flower serialises with np.save (the ``numpy`` payload of a transport)."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    records = {protocol.META: ConfigRecord(meta)}
    if payload is not None:
        buf = np.empty(protocol.SALT_BYTES + len(payload), dtype=np.uint8)
        buf[: protocol.SALT_BYTES] = np.frombuffer(os.urandom(protocol.SALT_BYTES), dtype=np.uint8)
        buf[protocol.SALT_BYTES :] = np.frombuffer(payload, dtype=np.uint8)
        records[protocol.PAYLOAD] = ArrayRecord({protocol.PAYLOAD_KEY: Array(buf)})
    return RecordDict(records)


def content_for(payload_kind: str):
    return numpy_content if payload_kind == "numpy" else protocol.make_content


@client.query("give")
def give(message: Message, context: Context) -> Message:
    meta = protocol.read_meta(message.content)
    n = int(meta["n"])
    # Random bytes: Flower stores objects by content hash, so a part of zeros would move as a
    # handful of distinct 5 MiB chunks (4 objects for 64 MiB instead of 14), not as its size.
    return Message(content_for(str(meta.get("payload", "raw")))({"n": n}, os.urandom(n)), reply_to=message)


@client.query("take")
def take(message: Message, context: Context) -> Message:
    data = protocol.read_payload(message.content)
    return Message(protocol.make_content({"n": len(data)}), reply_to=message)


def _sizes(total: int, part: int) -> list[int]:
    return [min(part, total - i) for i in range(0, total, part)]


@server.main()
def main(grid: Grid, context: Context) -> None:
    plan = json.loads(open(context.run_config["plan"]).read())
    while len(list(grid.get_node_ids())) < plan["nodes"]:
        time.sleep(0.5)
    nodes = sorted(grid.get_node_ids())
    t0 = time.perf_counter()
    windows = {"window": plan["window"], "total_window": plan.get("total_window")}
    if plan.get("poll_max_s") is not None:
        windows["poll_max_s"] = plan["poll_max_s"]
    kind = plan.get("payload", "raw")
    make = content_for(kind)
    up = Exchange(grid, group_id="up", make_content=make, **windows)
    for n in nodes:
        up.add(n, [Request("query.give", {"n": s, "payload": kind}, None, i) for i, s in enumerate(_sizes(plan["up_bytes"], plan["part_bytes"]))])
    failed = up.run(lambda *a: None, time.monotonic() + 3600)
    t1 = time.perf_counter()
    down = Exchange(grid, group_id="down", make_content=lambda meta, n: make(meta, os.urandom(n)), **windows)
    for n in nodes:
        down.add(n, [Request("query.take", {"n": s}, s, i) for i, s in enumerate(_sizes(plan["down_bytes"], plan["part_bytes"]))])
    failed.update(down.run(lambda *a: None, time.monotonic() + 3600))
    t2 = time.perf_counter()
    with open(plan["out"], "w") as fh:
        json.dump({"up_seconds": t1 - t0, "down_seconds": t2 - t1, "seconds": t2 - t0, "failed": {str(k): v for k, v in failed.items()}}, fh)
