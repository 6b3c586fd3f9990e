"""The control plane's pieces, without Flower processes: the Fleet-only filter, the pinned federation
config of the ServerApp, Flower's exit reasons and the version check."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from fedmerge import flower_internals
from fedmerge.flower_internals import FleetOnly, UnsupportedFlower, flower_exit, is_fleet_path
from fedmerge.server.app import (
    PINNED_CONFIG_ENV,
    PINNED_CONFIG_SHA256_ENV,
    RUN_CONFIG_KEY,
    file_sha256,
    pinned_config_env,
    pinned_config_path,
)
from fedmerge.server.errors import UnpinnedFederationConfig

FLEET = ["/v1/fleet/pull-messages", "/v1/fleet/activate-node", "/v1/fleet/push-object"]
NOT_FLEET = [
    "/v1/control/list-runs", "/v1/control/register-node", "/v1/control/stop-run", "/v1/control/start-run",
    "/v1/runtime/acquire-task", "/health", "/docs", "/openapi.json", "/", "", "/v1/fleet", "/v1/fleetx/pull-messages",
    "/v1/fleet/../control/list-runs", "/v1/fleet/./pull-messages", "/v1/fleet//pull-messages", "/v1/fleet/pull-messages/",
    "/v1/fleet/..", "/v1/fleet/a\\..\\b", "/V1/fleet/pull-messages", "//v1/fleet/pull-messages",
]  # fmt: skip


@pytest.mark.parametrize("path", FLEET)
def test_fleet_paths_pass(path):
    assert is_fleet_path(path)


@pytest.mark.parametrize("path", NOT_FLEET)
def test_everything_else_is_not_fleet(path):
    assert not is_fleet_path(path)


def test_a_root_path_is_refused_even_with_a_fleet_path():
    assert not is_fleet_path("/v1/fleet/pull-messages", root_path="/v1/control")


def _call(app, scope):
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


class _Recorder:
    def __init__(self):
        self.paths = []

    async def __call__(self, scope, receive, send):
        self.paths.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def test_fleet_only_passes_fleet_requests_and_answers_404_to_the_rest():
    inner = _Recorder()
    app = FleetOnly(inner)
    for path in FLEET + NOT_FLEET:
        sent = _call(app, {"type": "http", "path": path, "root_path": "", "method": "POST"})
        assert sent[0]["status"] == (200 if path in FLEET else 404), path
    assert inner.paths == FLEET  # nothing else reached the SuperLink's app
    ws = _call(app, {"type": "websocket", "path": "/v1/fleet/pull-messages"})
    assert ws == [{"type": "websocket.close", "code": 1008}]
    assert inner.paths == FLEET


# -- the ServerApp's pinned config ---------------------------------------------------------------------


@pytest.fixture
def pinned(tmp_path):
    config = tmp_path / "federation.yaml"
    config.write_text("name: ours\n")
    return config, pinned_config_env(config)


def test_the_pinned_config_runs(pinned):
    config, env = pinned
    assert env == {PINNED_CONFIG_ENV: str(config.resolve()), PINNED_CONFIG_SHA256_ENV: file_sha256(config)}
    assert pinned_config_path({RUN_CONFIG_KEY: str(config)}, env) == config.resolve()


def test_a_relative_spelling_of_the_same_file_runs(pinned, monkeypatch):
    config, env = pinned
    monkeypatch.chdir(config.parent)
    assert pinned_config_path({RUN_CONFIG_KEY: "./federation.yaml"}, env) == config.resolve()


def test_another_config_is_refused(pinned, tmp_path):
    config, env = pinned
    other = tmp_path / "other.yaml"
    other.write_text("name: ours\n")  # same bytes, another file: still refused
    with pytest.raises(UnpinnedFederationConfig, match=f"names federation config {other}, but this coordinator runs only {config}"):
        pinned_config_path({RUN_CONFIG_KEY: str(other)}, env)


def test_no_config_in_the_run_is_refused(pinned):
    _, env = pinned
    with pytest.raises(UnpinnedFederationConfig, match="names no 'federation-config'"):
        pinned_config_path({}, env)


def test_an_edited_config_is_refused(pinned):
    config, env = pinned
    config.write_text("name: ours\nrounds: 99\n")
    with pytest.raises(UnpinnedFederationConfig, match=f"{config.resolve()}: changed since the coordinator started"):
        pinned_config_path({RUN_CONFIG_KEY: str(config)}, env)


def test_a_deleted_config_is_refused(pinned):
    config, env = pinned
    config.unlink()
    with pytest.raises(UnpinnedFederationConfig, match="cannot be read"):
        pinned_config_path({RUN_CONFIG_KEY: str(config)}, env)


def test_without_a_pin_nothing_runs(pinned):
    config, _ = pinned
    with pytest.raises(UnpinnedFederationConfig, match="only under `fedmerge coordinator`"):
        pinned_config_path({RUN_CONFIG_KEY: str(config)}, {})


# -- Flower's exit reasons and version -------------------------------------------------------------------


def test_flowers_exit_code_and_reason_are_read_from_its_log():
    log = (
        "INFO:     Uvicorn running on http://127.0.0.1:1 (Press CTRL+C to quit)\n"
        "\x1b[91mERROR \x1b[0m:     Exit Code: 305\n"
        "Failed to initialize the connection to the SuperLink.\n"
        "[code: 2004] Failed to activate SuperNode.\n"
        "For more information, visit: <https://flower.ai/docs/framework/1.41/en/ref-exit-codes/305.html>\n"
        "INFO:     Shutting down\n"
    )
    assert flower_exit(log) == (305, "Failed to initialize the connection to the SuperLink. [code: 2004] Failed to activate SuperNode.")
    assert flower_exit(log + "\x1b[91mERROR \x1b[0m:     Exit Code: 302\nBad key.\n") == (302, "Bad key.")
    assert flower_exit("INFO: all good\n") is None


def test_an_untested_flower_version_is_refused_with_its_name():
    """One version check guards every internal, the SuperLink's and the round loop's node keys alike."""
    import importlib.metadata

    from flwr.proto.node_pb2 import NodeInfo

    class Grid:
        def get_nodes(self):
            return [NodeInfo(node_id=1)]

    flower_internals.require_supported.cache_clear()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(importlib.metadata, "version", lambda name: "1.42.0")
            with pytest.raises(UnsupportedFlower, match=r"flwr 1\.42\.0 is installed, fedmerge supports flwr 1\.41\.x only"):
                flower_internals.patch_sqlite_busy_timeout()
            with pytest.raises(UnsupportedFlower, match=r"flwr 1\.42\.0 is installed"):
                flower_internals.registered_node_keys(Grid())
    finally:
        flower_internals.require_supported.cache_clear()
    assert flower_internals.require_supported().startswith("1.41.")


def test_superlink_main_says_which_port_is_taken(tmp_path):
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "fedmerge.federation.superlink_main", "--loopback-port", "0", "--fleet-address", f"127.0.0.1:{port}", "--status-file", str(tmp_path / "s.json")],
            capture_output=True, text=True, timeout=120, env=dict(os.environ),
        )  # fmt: skip
    assert proc.returncode == 98
    assert f"cannot listen on 127.0.0.1:{port} for the public (Fleet API) listener" in proc.stderr
    assert not (tmp_path / "s.json").exists()
