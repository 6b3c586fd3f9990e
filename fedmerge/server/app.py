"""The fedmerge ServerApp: Flower hands it a Grid; the round loop does the rest.

It runs only the coordinator's own federation config. ``fedmerge coordinator`` puts that file's
path and SHA-256 in the environment of the processes it starts (``PINNED_CONFIG_ENV`` and
``PINNED_CONFIG_SHA256_ENV``); whoever submits a run cannot change them. The run config must
name the same file (``federation-config``), and the file must still have that hash: a run
submitted by anyone else, naming another file, or a config edited since the coordinator
started is refused with ``UnpinnedFederationConfig`` before anything is read from it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmerge.server.errors import UnpinnedFederationConfig

app = ServerApp()

RUN_CONFIG_KEY = "federation-config"
PINNED_CONFIG_ENV = "FEDMERGE_FEDERATION_CONFIG"
PINNED_CONFIG_SHA256_ENV = "FEDMERGE_FEDERATION_CONFIG_SHA256"

log = logging.getLogger(__name__)


def file_sha256(path: str | os.PathLike[str]) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def pinned_config_env(config_path: str | os.PathLike[str]) -> dict[str, str]:
    """The environment entries that pin ``config_path`` (as it is now) for the ServerApps to come."""
    path = Path(config_path).resolve()
    return {PINNED_CONFIG_ENV: str(path), PINNED_CONFIG_SHA256_ENV: file_sha256(path)}


def pinned_config_path(run_config: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> Path:
    """The federation config this ServerApp may run: the pinned one, if the run config names it and it is unchanged."""
    pinned, digest = environ.get(PINNED_CONFIG_ENV), environ.get(PINNED_CONFIG_SHA256_ENV)
    if not pinned or not digest:
        raise UnpinnedFederationConfig(
            f"no pinned federation config ({PINNED_CONFIG_ENV}, {PINNED_CONFIG_SHA256_ENV} unset): "
            "the fedmerge ServerApp runs only under `fedmerge coordinator`"
        )
    requested = run_config.get(RUN_CONFIG_KEY)
    if not requested:
        raise UnpinnedFederationConfig(f"the run config names no {RUN_CONFIG_KEY!r}; refusing to run (the coordinator's is {pinned})")
    path = Path(pinned)
    if Path(str(requested)).resolve() != path:
        raise UnpinnedFederationConfig(
            f"the run config names federation config {requested}, but this coordinator runs only {path}; refusing to run"
        )
    try:
        found = file_sha256(path)
    except OSError as exc:
        raise UnpinnedFederationConfig(f"{path}: the coordinator's federation config cannot be read ({exc.strerror})") from None
    if found != digest:
        raise UnpinnedFederationConfig(
            f"{path}: changed since the coordinator started (sha256 {found}, pinned {digest}); restart `fedmerge coordinator` to use it"
        )
    return path


@app.main()
def main(grid: Grid, context: Context) -> None:
    from fedmerge.server.config import load_federation_config
    from fedmerge.server.rounds import RoundRunner

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        path = pinned_config_path(context.run_config)
    except UnpinnedFederationConfig as exc:
        log.error("ServerApp refused run %s: %s", context.run_id, exc)
        raise
    cfg = load_federation_config(path)
    if file_sha256(path) != os.environ[PINNED_CONFIG_SHA256_ENV]:  # changed while it was being read
        raise UnpinnedFederationConfig(f"{path}: changed while the ServerApp read it; restart `fedmerge coordinator`")
    # The ServerApp runs in a process Flower starts; its log goes next to the coordinator's state.
    cfg.state.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(cfg.state / "coordinator.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("fedmerge").addHandler(handler)
    logging.getLogger("fedmerge").setLevel(os.environ.get("FEDMERGE_LOG_LEVEL", "INFO").upper())
    RoundRunner(grid, cfg).run()
