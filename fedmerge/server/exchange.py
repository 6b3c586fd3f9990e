"""Many small requests to many nodes, a bounded number outstanding, replies pulled one at a time.

Flower's ``send_and_receive`` waits for every reply and sleeps seconds between polls; a round
moves dozens of parts per client, so the coordinator keeps its own window: at most ``window``
requests outstanding per node and at most ``total_window`` across all nodes. Requests are built
and pushed one at a time and each reply is pulled (and handled, i.e. spooled) alone, so the
coordinator holds one part at a time and the SuperLink at most ``total_window`` parts, whatever
the number of clients.

Each node moves at its own pace: a reply handler returns the node's next requests (the parts
named by the plan its ``open_round`` reply carried), which are queued at once, so one node that
is slow to answer, or dead before its first reply, never holds up the others' transfers.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from flwr.app import Message

from fedmerge.flower_internals import lost_in_transit_error_codes
from fedmerge.protocol import read_refusal, scrub_paths

log = logging.getLogger(__name__)


# A request whose reply Flower lost in transit (``lost_in_transit_error_codes``) is asked again,
# up to ``MAX_RESENDS`` times, instead of dropping the node.
MAX_RESENDS = 3
_ALIVE_CHECK_S = 1.0


class NodeFailed(Exception):
    """Raised by a reply handler: stop the exchange with this node, for the reason given."""


def decode(reply: Message) -> tuple[dict[str, Any], bytes | None]:
    """A reply's fedmerge meta and payload (None when it carries none); a malformed one fails its node."""
    from fedmerge.protocol import PAYLOAD, ProtocolError, read_meta, read_payload

    try:
        meta = read_meta(reply.content)
        payload = read_payload(reply.content) if PAYLOAD in reply.content.array_records else None
    except (ProtocolError, KeyError, ValueError, TypeError) as exc:
        raise NodeFailed(f"malformed reply ({type(exc).__name__}: {scrub_paths(str(exc))})") from None
    return meta, payload


def decode_unless_refused(reply: Message, refused: str = "the hospital refused") -> tuple[dict[str, Any], bytes | None]:
    """``decode`` of a reply that is not a refusal; a refusal fails its node with the hospital's
    reason (``'<refused>: <ErrorType>: reason'``)."""
    meta, payload = decode(reply)
    refusal = read_refusal(meta)
    if refusal is not None:
        raise NodeFailed(f"{refused}: {refusal}")
    return meta, payload


@dataclass
class Request:
    kind: str  # message type (``query.<action>``)
    meta: dict[str, Any]
    payload: Any  # bytes, None, or anything ``make_content`` knows how to read lazily
    tag: Any  # handed back to the reply handler


# on_reply(node_id, tag, reply) -> the node's next requests (or None)
ReplyHandler = Callable[[int, Any, Message], Iterable[Request] | None]


@dataclass
class _NodeQueue:
    node_id: int
    pending: deque[Request] = field(default_factory=deque)
    in_flight: dict[str, tuple[Request, float]] = field(default_factory=dict)  # message id -> (request, sent at)
    failed: str | None = None
    resends: int = 0

    @property
    def busy(self) -> bool:
        return self.failed is None and bool(self.pending or self.in_flight)


class GraceDeadline:
    """The round's timeout, cut short to ``grace_s`` from the moment ``ready()`` first holds (no grace: None).

    Once the coordinator has what it needs (a quorum of contributions; every contributor's
    install), the rest get a grace period rather than the whole timeout.
    """

    def __init__(self, timeout_s: float, grace_s: float | None, ready: Callable[[], bool]):
        self.hard = time.monotonic() + timeout_s
        self.grace_s = grace_s
        self.ready = ready
        self._since: float | None = None

    def __call__(self) -> float:
        if self.grace_s is not None and self.ready():
            if self._since is None:
                self._since = time.monotonic()
            return min(self.hard, self._since + self.grace_s)
        return self.hard


class Exchange:
    """One exchange: push requests within the windows, pull and hand over replies, until all are done."""

    def __init__(
        self,
        grid,
        *,
        group_id: str,
        window: int,
        make_content: Callable[[dict, Any], Any],
        total_window: int | None = None,
        ttl: float | None = None,
        poll_s: float = 0.05,
        poll_max_s: float = 0.4,
    ):
        self.grid = grid
        self.group_id = group_id
        self.window = window
        self.total_window = total_window
        self.make_content = make_content
        self.ttl = ttl
        self.poll_s = poll_s
        # Each poll asks the SuperLink once per request in flight: while nothing comes, wait longer
        # between polls (up to poll_max_s) instead of asking ~160 times a second for 8 parts.
        self.poll_max_s = max(poll_s, poll_max_s)
        self.queues: dict[int, _NodeQueue] = {}
        self.failures: dict[int, str] = {}
        self._turn = 0
        self._last_alive_check = 0.0

    @classmethod
    def for_round(cls, grid, config, group_id: str, make_content: Callable[[dict, Any], Any]) -> "Exchange":
        """An exchange with a federation config's windows; its messages outlive the round's timeout by a minute."""
        return cls(grid, group_id=group_id, window=config.parts_in_flight, total_window=config.parts_in_flight_total,
                   make_content=make_content, ttl=config.round_timeout_s + 60)  # fmt: skip

    def add(self, node_id: int, requests: Iterable[Request]) -> None:
        q = self.queues.setdefault(node_id, _NodeQueue(node_id))
        if q.failed is None:
            q.pending.extend(requests)

    def run(self, on_reply: ReplyHandler, deadline: float | Callable[[], float]) -> dict[int, str]:
        """Until every node is done or failed; returns {node_id: reason} for those that failed.

        ``on_reply`` may raise ``NodeFailed`` to stop talking to that node.
        """
        idle = self.poll_s
        while True:
            active = [q for q in self.queues.values() if q.busy]
            if not active:
                return self.failures
            if time.monotonic() > (deadline() if callable(deadline) else deadline):
                for q in active:
                    self._fail(q, "timed out before finishing the round's exchange")
                return self.failures
            if not self._check_alive(active):
                continue
            self._push(active)
            if self._pull(active, on_reply):
                idle = self.poll_s
            else:
                time.sleep(idle)
                idle = min(self.poll_max_s, 2 * idle)

    # -- stages -----------------------------------------------------------------------------------
    def _fail(self, q: _NodeQueue, reason: str) -> None:
        q.failed = reason
        q.pending.clear()
        q.in_flight.clear()
        self.failures[q.node_id] = reason
        log.warning("node %s: %s", q.node_id, reason)

    def _check_alive(self, active: list[_NodeQueue]) -> bool:
        """Fail the nodes the SuperLink no longer knows; False when none of ``active`` is left."""
        now = time.monotonic()
        if now - self._last_alive_check <= _ALIVE_CHECK_S:
            return True
        self._last_alive_check = now
        alive = set(self.grid.get_node_ids())
        for q in active:
            if q.node_id not in alive:
                self._fail(q, "node disconnected from the SuperLink")
        return any(q.failed is None for q in active)

    def _push(self, active: list[_NodeQueue]) -> None:
        """Top up each node's window, one request per node per turn while the total allows."""
        active = [q for q in active if q.failed is None]
        if not active:
            return
        cap = self.total_window if self.total_window is not None else len(active) * self.window
        outstanding = sum(len(q.in_flight) for q in active)
        self._turn += 1
        k = self._turn % len(active)
        order = active[k:] + active[:k]
        topped = True
        while topped and outstanding < cap:
            topped = False
            for q in order:
                if outstanding >= cap or q.failed is not None or not q.pending or len(q.in_flight) >= self.window:
                    continue
                request = q.pending.popleft()
                msg = Message(self.make_content(request.meta, request.payload), dst_node_id=q.node_id,
                              message_type=request.kind, group_id=self.group_id, ttl=self.ttl)  # fmt: skip
                # Pushed alone so only this one part is ever held in memory (serialized) here.
                ids = list(self.grid.push_messages([msg]))
                del msg
                if ids and ids[0]:
                    q.in_flight[ids[0]] = (request, time.monotonic())
                    outstanding += 1
                    topped = True
                else:
                    self._fail(q, "the SuperLink refused a message for this node")

    def _pull(self, active: list[_NodeQueue], on_reply: ReplyHandler) -> bool:
        """Pull every reply that is in; True when at least one came."""
        progressed = False
        owner = {mid: q for q in active for mid in q.in_flight}
        for mid, q in owner.items():
            if q.failed is not None or mid not in q.in_flight:
                continue
            # Each reply is matched by the message it answers, not by the id we asked with:
            # whatever the SuperLink hands back is routed to its own node and request.
            for reply in self.grid.pull_messages([mid]):
                progressed = True
                self._handle(owner.get(reply.metadata.reply_to_message_id), reply, on_reply)
                del reply
        return progressed

    def _handle(self, q: _NodeQueue | None, reply: Message, on_reply: ReplyHandler) -> None:
        answered = reply.metadata.reply_to_message_id
        if q is None or q.failed is not None or answered not in q.in_flight:
            log.warning("dropping a reply to unknown message %s", answered)
            return
        request, sent_at = q.in_flight.pop(answered)
        log.debug("node %s: reply to %s after %.2f s", q.node_id, request.tag, time.monotonic() - sent_at)
        if reply.has_error():
            if reply.error.code in lost_in_transit_error_codes() and q.resends < MAX_RESENDS:
                q.resends += 1
                log.warning("node %s: reply to %s lost in transit (%s); asking again", q.node_id, request.tag, reply.error.reason)
                q.pending.appendleft(request)
                return
            # What Flower reports of a failed ClientApp is the hospital's exception text.
            self._fail(q, f"client error: {scrub_paths(reply.error.reason)}")
            return
        try:
            follow_up = on_reply(q.node_id, request.tag, reply)
        except NodeFailed as exc:
            self._fail(q, str(exc))
            return
        if follow_up:
            q.pending.extend(follow_up)
