"""Many small requests to many nodes, a bounded number outstanding, replies pulled one at a time.

Flower's ``send_and_receive`` waits for every reply and sleeps seconds between polls; a round
moves dozens of parts per client, so the coordinator keeps its own window: at most ``window``
requests outstanding per node and at most ``total_window`` across all nodes. Requests are built
and pushed one at a time and each reply is pulled (and handled, i.e. spooled) alone, so the
coordinator holds one part at a time and the SuperLink at most ``total_window`` parts, whatever
the number of clients.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from flwr.app import Message
from flwr.common.constant import ErrorCode

log = logging.getLogger(__name__)


# Error codes Flower puts on a reply it lost in transit, not on one the ClientApp produced:
# MESSAGE_UNAVAILABLE (the reply's objects never completed their upload, e.g. a push that failed
# while the SuperLink's database was busy) and REPLY_MESSAGE_UNAVAILABLE (the reply expired). The
# request is asked again, up to ``MAX_RESENDS`` times, instead of dropping the node.
_LOST_IN_TRANSIT = (ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE)
MAX_RESENDS = 3


@dataclass
class NodeQueue:
    node_id: int
    pending: deque = field(default_factory=deque)  # (message_type, meta, payload, tag)
    in_flight: dict[str, Any] = field(default_factory=dict)  # message id -> (request, time sent)
    failed: str | None = None
    resends: int = 0


def run_exchange(
    grid,
    requests: dict[int, list[tuple[str, dict, bytes | None, Any]]],
    on_reply: Callable[[int, Any, Any], None],
    *,
    group_id: str,
    deadline: float | Callable[[], float],
    window: int,
    make_content: Callable[[dict, bytes | None], Any],
    total_window: int | None = None,
    ttl: float | None = None,
    poll_s: float = 0.05,
) -> dict[int, str]:
    """Send every node its requests (in order, ``window`` at a time) and hand each reply to ``on_reply``.

    ``total_window`` caps the requests outstanding across all nodes; nodes take turns for the slots.

    ``on_reply(node_id, tag, message)`` may raise ``NodeFailed`` to stop talking to that node.
    Returns {node_id: reason} for the nodes that did not finish (error, gone, timeout).
    """
    queues = {n: NodeQueue(n, deque(reqs)) for n, reqs in requests.items()}
    failures: dict[int, str] = {}
    last_alive_check = 0.0
    turn = 0

    def fail(q: NodeQueue, reason: str) -> None:
        q.failed = reason
        q.pending.clear()
        q.in_flight.clear()
        failures[q.node_id] = reason
        log.warning("node %s: %s", q.node_id, reason)

    while True:
        active = [q for q in queues.values() if q.failed is None and (q.pending or q.in_flight)]
        if not active:
            return failures
        now = time.monotonic()
        if now > (deadline() if callable(deadline) else deadline):
            for q in active:
                fail(q, "timed out before finishing the round's exchange")
            return failures
        if now - last_alive_check > 1.0:
            last_alive_check = now
            alive = set(grid.get_node_ids())
            for q in active:
                if q.node_id not in alive:
                    fail(q, "node disconnected from the SuperLink")
            active = [q for q in active if q.failed is None]
            if not active:
                continue
        # Top up each node's window, one request per node per turn while the total allows.
        cap = total_window if total_window is not None else len(active) * window
        outstanding = sum(len(q.in_flight) for q in active)
        turn += 1
        order = active[turn % len(active) :] + active[: turn % len(active)]
        topped = True
        while topped and outstanding < cap:
            topped = False
            for q in order:
                if outstanding >= cap or q.failed is not None or not q.pending or len(q.in_flight) >= window:
                    continue
                request = q.pending.popleft()
                kind, meta, payload, _tag = request
                msg = Message(make_content(meta, payload), dst_node_id=q.node_id, message_type=kind, group_id=group_id, ttl=ttl)
                # Pushed alone so only this one part is ever held in memory (serialized) here.
                ids = list(grid.push_messages([msg]))
                del msg
                if ids and ids[0]:
                    q.in_flight[ids[0]] = (request, time.monotonic())
                    outstanding += 1
                    topped = True
                else:
                    fail(q, "the SuperLink refused a message for this node")
        progressed = False
        owner = {mid: q for q in active for mid in q.in_flight}
        for q in active:
            for mid in list(q.in_flight):
                if q.failed is not None or mid not in q.in_flight:
                    continue
                # Each reply is matched by the message it answers, not by the id we asked
                # with: whatever the SuperLink hands back is routed to its own node and part.
                for reply in grid.pull_messages([mid]):
                    progressed = True
                    rq = owner.get(reply.metadata.reply_to_message_id)
                    if rq is None or rq.failed is not None or reply.metadata.reply_to_message_id not in rq.in_flight:
                        log.warning("dropping a reply to unknown message %s", reply.metadata.reply_to_message_id)
                        continue
                    request, sent_at = rq.in_flight.pop(reply.metadata.reply_to_message_id)
                    tag = request[3]
                    log.debug("node %s: reply to %s after %.2f s", rq.node_id, tag, time.monotonic() - sent_at)
                    if reply.has_error():
                        if reply.error.code in _LOST_IN_TRANSIT and rq.resends < MAX_RESENDS:
                            rq.resends += 1
                            log.warning("node %s: reply to %s lost in transit (%s); asking again", rq.node_id, tag, reply.error.reason)
                            rq.pending.appendleft(request)
                            continue
                        fail(rq, f"client error: {reply.error.reason}")
                        continue
                    try:
                        on_reply(rq.node_id, tag, reply)
                    except NodeFailed as exc:
                        fail(rq, str(exc))
                    del reply
        if not progressed:
            time.sleep(poll_s)


class NodeFailed(Exception):
    """Raised by a reply handler: stop the exchange with this node, for the reason given."""
