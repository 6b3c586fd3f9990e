"""A Flower app bundle the hospitals did not pin: its ServerApp sends one message to every node and
writes what came back (replies or errors) to the JSON file its run config names.

``write_probe_app(folder)`` lays the bundle out (this file and a ``pyproject.toml``); Flower
installs it with the bundle, so the coordinator's ServerApp process imports it from there.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "probe"
version = "0.1.0"
description = "an app bundle no hospital pinned"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "outsider"

[tool.flwr.app.components]
serverapp = "probe_app:server"
clientapp = "probe_app:client"

[tool.flwr.app.config]
out = ""
"""


def write_probe_app(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(PYPROJECT)
    shutil.copy(__file__, folder / "probe_app.py")
    return folder


from flwr.app import Context, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

server = ServerApp()
client = ClientApp()


@server.main()
def _probe(grid: Grid, context: Context) -> None:
    nodes = list(grid.get_node_ids())
    messages = [Message(RecordDict(), dst_node_id=n, message_type="query.probe") for n in nodes]
    replies = list(grid.send_and_receive(messages, timeout=120))
    out = [{"node": r.metadata.src_node_id, "error": r.error.reason if r.has_error() else None} for r in replies]
    Path(str(context.run_config["out"])).write_text(json.dumps({"nodes": nodes, "replies": out}))


@client.query("probe")
def _answer(message: Message, context: Context) -> Message:
    return Message(RecordDict(), reply_to=message)  # what the outsider's code would do, had it run
