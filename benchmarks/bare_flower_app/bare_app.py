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
from fedmerge.server.exchange import run_exchange

server = ServerApp()
client = ClientApp()


@client.query("give")
def give(message: Message, context: Context) -> Message:
    n = int(protocol.read_meta(message.content)["n"])
    # Random bytes: Flower stores objects by content hash, so a part of zeros would move as a
    # handful of distinct 5 MiB chunks (4 objects for 64 MiB instead of 14), not as its size.
    return Message(protocol.make_content({"n": n}, os.urandom(n)), reply_to=message)


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
    up = {n: [("query.give", {"n": s}, None, i) for i, s in enumerate(_sizes(plan["up_bytes"], plan["part_bytes"]))] for n in nodes}
    windows = {"window": plan["window"], "total_window": plan.get("total_window")}
    run_exchange(grid, up, lambda *a: None, group_id="up", deadline=time.monotonic() + 3600, make_content=protocol.make_content, **windows)
    t1 = time.perf_counter()
    down = {n: [("query.take", {"n": s}, s, i) for i, s in enumerate(_sizes(plan["down_bytes"], plan["part_bytes"]))] for n in nodes}
    run_exchange(grid, down, lambda *a: None, group_id="down", deadline=time.monotonic() + 3600,
                 make_content=lambda meta, n: protocol.make_content(meta, os.urandom(n)), **windows)
    t2 = time.perf_counter()
    with open(plan["out"], "w") as fh:
        json.dump({"up_seconds": t1 - t0, "down_seconds": t2 - t1, "seconds": t2 - t0}, fh)
