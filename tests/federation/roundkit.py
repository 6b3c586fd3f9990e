"""What the round-loop tests share: grids with faults, client configs with changes, `fedmerge status`."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import yaml

from fedmerge.cli import main as fedmerge_main
from fedmerge.federation.inprocess import LocalGrid, bindings_of
from fedmerge.server.config import load_federation_config
from fedmerge.server.directory import MappingDirectory
from fedmerge.server.rounds import RoundRunner


def status(tf, *args: str) -> tuple[int, str]:
    """``fedmerge status --config FEDERATION`` as an operator runs it: (exit code, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = fedmerge_main(["status", "--config", str(tf.federation_config), *args])
    return rc, out.getvalue()


def status_json(tf) -> dict:
    rc, out = status(tf, "--json")
    assert rc == 0
    return json.loads(out)


def client_config_copy(tf, source: str, name: str, **changes) -> Path:
    """A copy of ``source``'s client config under a new name and state folder, with ``changes``."""
    cfg = yaml.safe_load(tf.client_configs[source].read_text())
    cfg["state_dir"] = str(tf.root / "clients" / name)
    cfg.update(changes)
    path = tf.root / "clients" / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def edit_yaml(path: Path, **changes) -> None:
    data = yaml.safe_load(path.read_text())
    data.update(changes)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def runner(tf, grid: LocalGrid, bindings: dict[int, str] | None = None, **kw) -> RoundRunner:
    cfg = load_federation_config(tf.federation_config)
    paths = [grid.contexts[n].node_config["fedmerge-config"] for n in sorted(grid.contexts)]
    return RoundRunner(grid, cfg, directory=MappingDirectory(bindings if bindings is not None else bindings_of(paths)), **kw)


class RecordingGrid(LocalGrid):
    """A LocalGrid that logs every push and every reply pulled, in order: (what, node, message type)."""

    def __init__(self, node_configs, **kw):
        super().__init__(node_configs, **kw)
        self.log: list[tuple[str, int, str]] = []

    def push_messages(self, messages):
        messages = list(messages)
        for m in messages:
            self.log.append(("push", m.metadata.dst_node_id, m.metadata.message_type))
        return super().push_messages(messages)

    def pull_messages(self, message_ids):
        out = list(super().pull_messages(message_ids))
        for r in out:
            self.log.append(("reply", r.metadata.src_node_id, r.metadata.message_type))
        return out

    def count(self, what: str, node: int, kind: str) -> int:
        return sum(1 for e in self.log if e == (what, node, kind))
