"""The fedmerge ServerApp: Flower hands it a Grid; the round loop does the rest.

The federation config's path comes in the run config (``federation-config``), so the same app
bundle serves any consortium; everything else the coordinator knows lives on its disk.
"""

from __future__ import annotations

import logging
import os

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()

RUN_CONFIG_KEY = "federation-config"


@app.main()
def main(grid: Grid, context: Context) -> None:
    from fedmerge.server.config import load_federation_config
    from fedmerge.server.rounds import RoundRunner

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    path = context.run_config.get(RUN_CONFIG_KEY)
    if not path:
        raise ValueError(f"run config has no {RUN_CONFIG_KEY!r}; start runs with `fedmerge coordinator`")
    cfg = load_federation_config(str(path))
    # The ServerApp runs in a process Flower starts; its log goes next to the coordinator's state.
    cfg.state.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(cfg.state / "coordinator.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("fedmerge").addHandler(handler)
    logging.getLogger("fedmerge").setLevel(os.environ.get("FEDMERGE_LOG_LEVEL", "INFO").upper())
    RoundRunner(grid, cfg).run()
