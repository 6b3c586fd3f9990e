"""The fedmerge apps under Flower's simulation engine (the Ray backend of ``flwr.simulation``).

Flower runs the ServerApp in a thread of this process, against its in-memory link state, and the
ClientApps in a pool of Ray actor processes: the same two apps a deployment runs, with Flower's
own message routing and serialization between them, but no SuperLink, TLS or SuperNodes.

Flower gives each virtual SuperNode a ``partition-id`` (0..N-1) as its node config. A hospital's
ClientApp needs its config file instead, so ``PartitionedClientApp`` maps partition ``i`` to the
``i``-th client config before handing the message to the real ClientApp.

Virtual SuperNodes have random ids and no keys, so the binding of nodes to institutions comes
from that same partition: ``PartitionDirectory`` asks each new node once which partition Flower
gave it (answered by ``PartitionedClientApp`` from Flower's node config, not by the hospital's
code), and binds it to the institution of that partition's client config.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedmerge.errors import FedmergeError

log = logging.getLogger(__name__)

PARTITION_KEY = "partition-id"
PARTITION_QUERY = "query.simulation_partition"
_PROBE_TIMEOUT_S = 120.0


class SimulationEngineMissing(RuntimeError):
    """Flower's simulation extra (``ray``) is not installed."""


class SimulationFailed(FedmergeError):
    """The simulated federation could not bind its nodes or did not finish its rounds."""


class PartitionedClientApp(ClientApp):
    """The fedmerge ClientApp, with each virtual SuperNode pointed at one hospital's config."""

    def __init__(self, client_configs: list[str | os.PathLike[str]]):
        super().__init__()
        self.client_configs = [str(Path(p).resolve()) for p in client_configs]

    def __call__(self, message: Message, context: Context) -> Message:
        from fedmerge.client.app import NODE_CONFIG_KEY, app

        try:
            partition = int(context.node_config[PARTITION_KEY])
        except (KeyError, TypeError, ValueError):
            raise RuntimeError(f"virtual SuperNode {context.node_id} has no usable {PARTITION_KEY!r} in its node config") from None
        if not 0 <= partition < len(self.client_configs):
            raise RuntimeError(f"partition {partition} is outside the {len(self.client_configs)} client configs of this simulation")
        if message.metadata.message_type == PARTITION_QUERY:
            return Message(RecordDict({"partition": ConfigRecord({"id": partition})}), reply_to=message)
        node_config = dict(context.node_config)
        node_config[NODE_CONFIG_KEY] = self.client_configs[partition]
        hospital = Context(run_id=context.run_id, node_id=context.node_id, node_config=node_config, state=context.state, run_config=context.run_config)
        return app(message=message, context=hospital)


class PartitionDirectory:
    """Binds each virtual SuperNode to the institution of its partition's client config."""

    def __init__(self, grid, institutions: list[str]):
        self.grid = grid
        self.by_partition = list(institutions)
        self._known: dict[int, str | None] = {}

    def institutions(self) -> list[str]:
        return sorted(self.by_partition)

    def institution_of(self, node_id: int) -> str | None:
        if node_id not in self._known:
            self._probe([n for n in self.grid.get_node_ids() if n not in self._known] or [node_id])
        return self._known.get(node_id)

    def _probe(self, nodes: list[int]) -> None:
        msgs = [Message(RecordDict(), dst_node_id=n, message_type=PARTITION_QUERY, group_id="partition") for n in nodes]
        ids = {mid: n for mid, n in zip(self.grid.push_messages(msgs), nodes) if mid}
        deadline = time.monotonic() + _PROBE_TIMEOUT_S
        while ids and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(ids)):
                node = ids.pop(reply.metadata.reply_to_message_id, None)
                if node is None or reply.has_error():
                    continue
                partition = int(reply.content.config_records["partition"]["id"])
                self._known[node] = self.by_partition[partition] if 0 <= partition < len(self.by_partition) else None
            time.sleep(0.05)
        if ids:
            raise SimulationFailed(f"virtual SuperNodes {sorted(ids.values())} did not say their partition within {_PROBE_TIMEOUT_S:.0f} s")


def backend_config(cpus: int | None, cpus_per_client: float, gpus_per_client: float, object_store_mb: int | None) -> dict[str, Any]:
    """Ray resources: how many ClientApps run at once is ``cpus / cpus_per_client``."""
    init_args: dict[str, Any] = {"include_dashboard": False}
    if cpus is not None:
        init_args["num_cpus"] = cpus
    if object_store_mb is not None:
        # Parts are bounded, so the object store only ever holds a few of them at once.
        init_args["object_store_memory"] = object_store_mb * 1024**2
    return {"init_args": init_args, "client_resources": {"num_cpus": cpus_per_client, "num_gpus": gpus_per_client}}


def run_flower_simulation(
    federation_config: str | os.PathLike[str],
    client_configs: list[str | os.PathLike[str]],
    *,
    cpus: int | None = None,
    cpus_per_client: float = 1.0,
    gpus_per_client: float = 0.0,
    object_store_mb: int | None = 1024,
) -> list:
    """Run every round of ``federation_config`` with one virtual SuperNode per client config.

    Returns the coordinator's round records (the same ones it writes to disk).
    """
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise SimulationEngineMissing(
            "Flower's simulation engine needs ray: pip install 'flwr[simulation]' (or use engine: inprocess)"
        )
    # Flower's debug lines and its link state's migration chatter drown the round log.
    if os.environ.get("FEDMERGE_LOG_LEVEL", "INFO").upper() != "DEBUG":
        logging.getLogger("flwr").setLevel(logging.INFO)
        logging.getLogger("alembic").setLevel(logging.WARNING)
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from fedmerge.federation.inprocess import bindings_of
    from fedmerge.server.config import load_federation_config
    from fedmerge.server.rounds import RoundRunner

    cfg = load_federation_config(federation_config)
    institutions = [bindings_of(client_configs)[i + 1] for i in range(len(client_configs))]
    records: list = []
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        records.extend(RoundRunner(grid, cfg, directory=PartitionDirectory(grid, institutions)).run())

    log.info("Flower simulation engine: %d virtual SuperNodes, %s CPU per ClientApp", len(client_configs), cpus_per_client)
    run_simulation(
        server_app=server,
        client_app=PartitionedClientApp(client_configs),
        num_supernodes=len(client_configs),
        backend_name="ray",
        backend_config=backend_config(cpus, cpus_per_client, gpus_per_client, object_store_mb),
    )
    if not records:
        # Flower logs a ServerApp exception and returns; the round records on disk say how far it got.
        raise SimulationFailed(f"the simulated federation ended without finishing its rounds; see {cfg.state}")
    return records
