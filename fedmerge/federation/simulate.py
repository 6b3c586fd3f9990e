"""``fedmerge simulate`` configs: an existing federation + client configs, or N toy institutions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class SimulationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Either an existing federation...
    federation_config: str | None = None
    client_configs: list[str] = Field(default_factory=list)
    # ...or toy institutions laid out under work_dir.
    work_dir: str | None = None
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


def run_from_config(path, institutions: int | None = None):
    from fedmerge.federation.inprocess import run_simulation
    from fedmerge.federation.toy import build_toy_federation
    from fedmerge.federation.yamlconfig import load_yaml_config

    cfg = load_yaml_config(path, SimulationConfig)
    if cfg.federation_config is not None:
        return run_simulation(cfg.federation_config, cfg.client_configs)
    n = institutions or cfg.institutions
    work = Path(cfg.work_dir)  # type: ignore[arg-type]
    tf = build_toy_federation(
        work, n, rounds=cfg.rounds, strategy=cfg.strategy, min_clients=cfg.min_clients,
        part_bytes=cfg.part_bytes, seal=cfg.seal, seed=cfg.seed,
    )  # fmt: skip
    return run_simulation(tf.federation_config, list(tf.client_configs.values()))
