"""The fedmerge ClientApp: one handler per message kind, each a thin wrapper over ``HospitalNode``
(or, for candidate selection, ``CandidateScoring``).

The SuperNode passes the hospital's config path as node config (``fedmerge-config``); nothing
else about the hospital travels with the app, so the coordinator cannot point a node elsewhere.

A handler that cannot do what it is asked answers with a refusal (the error's type and its
message, local paths scrubbed) rather than raising: what Flower would report of an exception
carries the hospital's file paths to the coordinator. The full error stays in the hospital's log.
"""

from __future__ import annotations

import logging
from typing import Callable

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedmerge import protocol

log = logging.getLogger(__name__)

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


def _answer(message: Message, handle: Callable[[dict], tuple[dict, bytes | None]]) -> Message:
    try:
        meta, payload = handle(protocol.read_meta(message.content))
    except Exception as exc:  # every failure becomes a refusal the coordinator records
        log.error("refused %s: %s: %s", message.metadata.message_type, type(exc).__name__, exc)
        return _reply(message, protocol.refusal_meta(exc))
    return _reply(message, meta, payload)


@app.query("open_round")
def open_round(message: Message, context: Context) -> Message:
    def handle(meta: dict) -> tuple[dict, bytes | None]:
        node = _node(context)
        r = int(meta["round"])
        out = node.open_round(r, str(meta["reference_fingerprint"]), int(meta["part_bytes"]), str(meta.get("delta_dtype", "float32")))
        if meta.get("with_first_part"):
            # The first part rides on the reply: one message fewer per client and round.
            part_meta, data = node.fetch_part(r, 0)
            out.update(part_meta)
            return out, data
        return out, None

    return _answer(message, handle)


@app.query("fetch_part")
def fetch_part(message: Message, context: Context) -> Message:
    return _answer(message, lambda meta: _node(context).fetch_part(int(meta["round"]), int(meta["part"])))


@app.query("install_part")
def install_part(message: Message, context: Context) -> Message:
    def handle(meta: dict) -> tuple[dict, bytes | None]:
        node = _node(context)
        r, plan = int(meta["round"]), str(meta["plan"])
        out = node.install_part(r, plan, int(meta["part"]), protocol.read_payload(message.content))
        if meta.get("commit"):  # the last part also commits: one message fewer
            out.update(node.install_commit(r, plan, meta.get("outcome")))
        return out, None

    return _answer(message, handle)


@app.query("install_commit")
def install_commit(message: Message, context: Context) -> Message:
    return _answer(message, lambda meta: (_node(context).install_commit(int(meta["round"]), str(meta["plan"]), meta.get("outcome")), None))


# -- candidate selection (the coordinator's selection: federated) --------------------------------
@app.query("candidate_part")
def candidate_part(message: Message, context: Context) -> Message:
    def handle(meta: dict) -> tuple[dict, bytes | None]:
        from fedmerge.client.candidates import CandidateScoring

        scoring = CandidateScoring(_node(context))
        out = scoring.receive_part(int(meta["round"]), meta["candidate"], str(meta["plan"]), int(meta["part"]), protocol.read_payload(message.content))
        return out, None

    return _answer(message, handle)


@app.query("score_candidates")
def score_candidates(message: Message, context: Context) -> Message:
    def handle(meta: dict) -> tuple[dict, bytes | None]:
        from fedmerge.client.candidates import CandidateScoring

        scoring = CandidateScoring(_node(context))
        return scoring.score(int(meta["round"]), str(meta["reference_fingerprint"]), str(meta["delta_dtype"]), list(meta["candidates"])), None

    return _answer(message, handle)
