"""A federation in one process: Flower's Grid interface, delivering each message to the real ClientApp.

No SuperLink, no SuperNodes, no subprocesses: ``LocalGrid`` is a ``flwr.serverapp.Grid`` whose
messages go straight to ``fedmerge.client.app.app`` with each node's own ``Context``, so the
coordinator's round loop and the hospital's handlers run exactly the code they run under Flower.
Tests use it for logic and faults; ``fedmerge simulate`` uses it for quick studies and the demo.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid

from fedmerge.flower_internals import empty_run, set_message_id, set_task_identity
from fedmerge.protocol import SALT_BYTES
from fedmerge.server.assess import EvaluateFn, GateFn
from fedmerge.server.directory import NodeDirectory
from fedmerge.server.record import RoundEvent, RoundRecord

log = logging.getLogger(__name__)

# A hook may look at (node_id, message) before delivery and return False to drop the node.
DeliveryHook = Callable[[int, Message], bool]


class LocalGrid(Grid):
    def __init__(self, node_configs: dict[int, str], client_app=None, run_id: int = 1):
        if client_app is None:
            from fedmerge.client.app import app as client_app
        self.client_app = client_app
        self.contexts = {
            nid: Context(run_id=run_id, node_id=nid, node_config={"fedmerge-config": str(path)}, state=RecordDict(), run_config={})
            for nid, path in node_configs.items()
        }
        self.alive = set(node_configs)
        self.replies: dict[str, Message] = {}
        self.hooks: list[DeliveryHook] = []
        self.sent: dict[int, int] = {n: 0 for n in node_configs}  # messages delivered per node
        self.bytes_out: dict[int, int] = {n: 0 for n in node_configs}  # reply payload bytes per node
        self._ids = itertools.count(1)
        self._run = empty_run(run_id)
        set_task_identity(run_id)

    def kill(self, node_id: int) -> None:
        self.alive.discard(node_id)

    # -- Grid -------------------------------------------------------------------------------------
    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None) -> Message:
        # Still abstract in Grid although Flower deprecates it in favour of the Message constructor.
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self):
        return sorted(self.alive)

    def push_messages(self, messages) -> list[str]:
        ids = []
        for msg in messages:
            mid = f"local-{next(self._ids)}"
            set_message_id(msg, mid)
            node = msg.metadata.dst_node_id
            ids.append(mid)
            if node not in self.alive or not all(h(node, msg) for h in self.hooks):
                self.alive.discard(node)
                continue
            self.sent[node] += 1
            self.replies[mid] = self._deliver(node, msg)
        return ids

    def _deliver(self, node: int, msg: Message) -> Message:
        from flwr.app import Error

        try:
            reply = self.client_app(message=msg, context=self.contexts[node])
        except Exception as exc:  # the real SuperNode turns a raising ClientApp into an error reply
            log.warning("node %s raised on %s: %s", node, msg.metadata.message_type, exc)
            return Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
        if "payload" in reply.content.array_records:
            self.bytes_out[node] += int(reply.content.array_records["payload"]["bytes"].shape[0]) - SALT_BYTES
        return reply

    def pull_messages(self, message_ids) -> list[Message]:
        out = []
        for mid in message_ids:
            reply = self.replies.pop(mid, None)
            if reply is not None and reply.metadata.src_node_id in self.alive:
                out.append(reply)
        return out

    def send_and_receive(self, messages, *, timeout: float | None = None):
        return self.pull_messages(self.push_messages(messages))


@dataclass
class RoundReport:
    round: int
    status: str
    reference_dir: str
    delta_dirs: dict[str, str]  # institution -> verified delta (DeltaCheckpoint folder) in the spool
    model_dir: str | None
    record: RoundRecord


@dataclass
class SimulationReport:
    state_dir: str
    base_dir: str
    rounds: list[RoundReport] = field(default_factory=list)
    installed: dict[str, list[int]] = field(default_factory=dict)  # institution -> installed rounds
    bytes_sent: dict[str, int] = field(default_factory=dict)  # institution -> payload bytes it sent

    def to_json(self) -> dict[str, Any]:
        return {
            "state_dir": self.state_dir,
            "base_dir": self.base_dir,
            "rounds": [{**{k: v for k, v in vars(r).items() if k != "record"}, "record": r.record.model_dump(mode="json")} for r in self.rounds],
            "installed": self.installed,
            "bytes_sent": self.bytes_sent,
        }


def bindings_of(client_configs: list[str | os.PathLike[str]]) -> dict[int, str]:
    """The in-process grid's node ids (1..N, in the order of the configs) -> each config's institution."""
    from fedmerge.client.config import load_client_config

    return {i + 1: load_client_config(p).institution for i, p in enumerate(client_configs)}


def run_simulation(
    federation_config: str | os.PathLike[str] | Any,
    client_configs: list[str | os.PathLike[str]],
    *,
    hooks: list[DeliveryHook] | None = None,
    directory: NodeDirectory | None = None,
    on_event: Callable[[RoundEvent], None] | None = None,
    evaluate_fn: EvaluateFn | None = None,
    gate_fn: GateFn | None = None,
) -> SimulationReport:
    """Run the coordinator's rounds over ``len(client_configs)`` in-process hospitals.

    Node ``i + 1`` runs ``client_configs[i]`` and is bound to that config's institution, unless
    ``directory`` binds the nodes otherwise. Returns, per round, the reference (base) folder and
    the spool folders of the verified deltas, so the same inputs can be merged again offline
    with any strategy.
    """
    from fedmerge.server.config import FederationConfig, load_federation_config
    from fedmerge.server.directory import MappingDirectory
    from fedmerge.server.rounds import RoundRunner

    cfg = federation_config if isinstance(federation_config, FederationConfig) else load_federation_config(federation_config)
    grid = LocalGrid({i + 1: str(p) for i, p in enumerate(client_configs)})
    grid.hooks.extend(hooks or [])
    directory = directory if directory is not None else MappingDirectory(bindings_of(client_configs))
    runner = RoundRunner(grid, cfg, directory=directory, on_event=on_event, evaluate_fn=evaluate_fn, gate_fn=gate_fn)
    records = runner.run()
    return simulation_report(cfg, records, client_configs, {i: grid.bytes_out[i + 1] for i in range(len(client_configs))})


def simulation_report(cfg, records: list[RoundRecord], client_configs, bytes_out: dict[int, int] | None = None) -> SimulationReport:
    """Rounds, installed models and bytes per institution; ``bytes_out`` is keyed by client index.

    Without ``bytes_out`` the bytes an institution sent are read from the round records (the
    packages the coordinator accepted).
    """
    from fedmerge.client.config import load_client_config
    from fedmerge.client.node import HospitalNode

    report = SimulationReport(state_dir=cfg.state_dir, base_dir=cfg.base_model)
    for rec in records:
        report.rounds.append(
            RoundReport(
                round=rec.round,
                status=rec.status.value,
                reference_dir=rec.reference.path,
                delta_dirs={k: c.delta_dir for k, c in sorted(rec.contributions.items())},
                model_dir=rec.merge.model_dir if rec.merge else None,
                record=rec,
            )
        )
    for i, path in enumerate(client_configs):
        ccfg = load_client_config(path)
        report.installed[ccfg.institution] = HospitalNode(ccfg).installed_rounds()
        if bytes_out is not None:
            report.bytes_sent[ccfg.institution] = bytes_out[i]
        else:
            report.bytes_sent[ccfg.institution] = sum(r.contributions[ccfg.institution].bytes for r in records if ccfg.institution in r.contributions)
    return report
