"""The fedmerge ClientApp: one handler per message kind, each a thin wrapper over ``HospitalNode``.

The SuperNode passes the hospital's config path as node config (``fedmerge-config``); nothing
else about the hospital travels with the app, so the coordinator cannot point a node elsewhere.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedmerge import protocol

app = ClientApp()

NODE_CONFIG_KEY = "fedmerge-config"


def _node(context: Context):
    from fedmerge.client.config import load_client_config
    from fedmerge.client.node import HospitalNode

    path = context.node_config.get(NODE_CONFIG_KEY)
    if not path:
        raise protocol.ProtocolError(f"this SuperNode has no node config {NODE_CONFIG_KEY!r}; start it with `fedmerge client`")
    return HospitalNode(load_client_config(str(path)))


def _reply(message: Message, meta: dict, payload: bytes | None = None) -> Message:
    return Message(protocol.make_content(meta, payload), reply_to=message)


@app.query("open_round")
def open_round(message: Message, context: Context) -> Message:
    meta = protocol.read_meta(message.content)
    node = _node(context)
    out = node.open_round(int(meta["round"]), str(meta["reference_fingerprint"]), int(meta["part_bytes"]), str(meta.get("delta_dtype", "float32")))
    if meta.get("with_first_part") and str(out["institution"]) not in list(meta.get("accepted", [])):
        # The first part rides on the reply: one message fewer per client and round.
        part_meta, data = node.fetch_part(int(meta["round"]), 0)
        out.update(part_meta)
        return _reply(message, out, data)
    return _reply(message, out)


@app.query("fetch_part")
def fetch_part(message: Message, context: Context) -> Message:
    meta = protocol.read_meta(message.content)
    out, data = _node(context).fetch_part(int(meta["round"]), int(meta["part"]))
    return _reply(message, out, data)


@app.query("install_part")
def install_part(message: Message, context: Context) -> Message:
    meta = protocol.read_meta(message.content)
    data = protocol.read_payload(message.content)
    node = _node(context)
    out = node.install_part(int(meta["round"]), str(meta["plan"]), int(meta["part"]), data)
    if meta.get("commit"):  # the last part also commits: one message fewer
        out.update(node.install_commit(int(meta["round"]), str(meta["plan"])))
    return _reply(message, out)


@app.query("install_commit")
def install_commit(message: Message, context: Context) -> Message:
    meta = protocol.read_meta(message.content)
    out = _node(context).install_commit(int(meta["round"]), str(meta["plan"]))
    return _reply(message, out)
