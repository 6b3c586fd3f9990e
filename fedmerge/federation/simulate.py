"""``fedmerge simulate`` configs: an existing federation + client configs, or N toy institutions.

``engine: flower`` (the default) runs the apps under Flower's simulation engine (Ray actors for
the ClientApps); ``engine: inprocess`` delivers messages straight to the ClientApp in this
process, which is what the tests and the demo use for speed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedmerge.configfile import ConfigError, ConfigPath, load_config


class FlowerEngineOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cpus: int | None = Field(None, ge=1, description="CPUs Ray may use (default: all)")
    cpus_per_client: float = Field(1.0, gt=0)
    gpus_per_client: float = Field(0.0, ge=0)
    object_store_mb: int | None = Field(1024, ge=80)


class SimulationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    engine: Literal["flower", "inprocess"] = "flower"
    flower: FlowerEngineOptions = Field(default_factory=FlowerEngineOptions)
    # Either an existing federation...
    federation_config: ConfigPath | None = None
    client_configs: list[ConfigPath] = Field(default_factory=list)
    # ...or toy institutions laid out under work_dir.
    work_dir: ConfigPath | None = None
    institutions: int = Field(3, ge=1)
    rounds: int = Field(1, ge=1)
    min_clients: int | None = Field(None, ge=1)
    strategy: dict[str, Any] = Field(default_factory=lambda: {"method": "task_arithmetic"})
    part_bytes: int = Field(256 * 1024, gt=0)
    seal: bool = False
    seed: int = 0

    @model_validator(mode="after")
    def _one_kind(self) -> "SimulationConfig":
        if self.federation_config is None and self.work_dir is None:
            raise ValueError("give federation_config (+ client_configs) or work_dir (toy institutions)")
        if self.federation_config is not None and not self.client_configs:
            raise ValueError("federation_config needs client_configs")
        return self


def load_simulation_config(path) -> SimulationConfig:
    return load_config(path, SimulationConfig, ConfigError)


def run_from_config(path, institutions: int | None = None, engine: str | None = None, overwrite: bool = False):
    """Run the simulation ``path`` describes; ``overwrite`` starts again from nothing on a used layout.

    Toy institutions are laid out under ``work_dir`` (an existing layout is replaced only with
    ``overwrite``). With an existing federation, ``overwrite`` deletes the coordinator's and the
    hospitals' state folders first, so every round runs again; without it the rounds resume.
    """
    from fedmerge.federation.inprocess import run_simulation
    from fedmerge.federation.toy import build_toy_federation

    cfg = load_simulation_config(path)
    if cfg.federation_config is not None:
        fed, clients = cfg.federation_config, list(cfg.client_configs)
        if overwrite:
            _clear_states(fed, clients)
    else:
        n = institutions or cfg.institutions
        tf = build_toy_federation(
            Path(cfg.work_dir), n, rounds=cfg.rounds, strategy=cfg.strategy, min_clients=cfg.min_clients,  # type: ignore[arg-type]
            part_bytes=cfg.part_bytes, seal=cfg.seal, seed=cfg.seed, overwrite=overwrite,
        )  # fmt: skip
        fed, clients = tf.federation_config, list(tf.client_configs.values())
    if (engine or cfg.engine) == "inprocess":
        return run_simulation(fed, clients)
    from fedmerge.federation.flowersim import run_flower_simulation
    from fedmerge.federation.inprocess import simulation_report
    from fedmerge.server.config import load_federation_config

    o = cfg.flower
    records = run_flower_simulation(fed, clients, cpus=o.cpus, cpus_per_client=o.cpus_per_client, gpus_per_client=o.gpus_per_client, object_store_mb=o.object_store_mb)
    return simulation_report(load_federation_config(fed), records, clients)


def _clear_states(federation_config, client_configs) -> None:
    import shutil

    from fedmerge.client.config import load_client_config
    from fedmerge.server.config import load_federation_config

    for state in [load_federation_config(federation_config).state, *(load_client_config(c).state for c in client_configs)]:
        if state.exists():
            shutil.rmtree(state)
