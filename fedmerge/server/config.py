"""The coordinator's config (``federation.yaml``): who merges what, how, and where Flower listens."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedmerge.configfile import ConfigError, ConfigPath, load_config
from fedmerge.protocol import DEFAULT_PART_BYTES


class StrategyConfig(BaseModel):
    """Handed to the engine's ``MergeSpec`` as is (method, parameters, per-model parameters...)."""

    model_config = ConfigDict(extra="allow")
    method: str = "task_arithmetic"
    parameters: dict[str, Any] = Field(default_factory=dict)
    seed: int = 0

    def spec_fields(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class SuperLinkConfig(BaseModel):
    """The SuperLink the coordinator starts (``start: true``) or one already running.

    Flower 1.41 serves Fleet (SuperNodes), Control (run submission) and Runtime (the ServerApp)
    on this one HTTPS port. Hospitals must reach it; see docs/deployment.md for what to expose.
    """

    model_config = ConfigDict(extra="forbid")
    start: bool = True
    address: str = "0.0.0.0:9092"
    ca_cert: ConfigPath
    server_cert: ConfigPath | None = None
    server_key: ConfigPath | None = None
    database_path: ConfigPath | None = None  # default: <state_dir>/superlink.db
    # OpenSSH public keys of the SuperNodes allowed to connect (one file each), registered at start.
    supernode_public_keys: list[ConfigPath] = Field(default_factory=list)

    @model_validator(mode="after")
    def _certs_to_start(self) -> "SuperLinkConfig":
        if self.start and not (self.server_cert and self.server_key):
            raise ValueError("start: true needs server_cert and server_key (TLS is not optional)")
        return self


class EvaluatorHook(BaseModel):
    model_config = ConfigDict(extra="forbid")
    config_path: ConfigPath  # an eval config (YAML) for fedmerge.eval
    gate_metric: str | None = None


class FederationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "fedmerge"
    state_dir: ConfigPath
    base_model: ConfigPath
    coordinator_key: ConfigPath  # the coordinator's private identity file (signs published models)
    coordinator_key_passphrase_file: ConfigPath | None = None
    trust_store: ConfigPath
    rounds: int = Field(1, ge=1)
    min_clients: int = Field(2, ge=1, description="quorum: fewest verified contributions that make a round")
    clients_per_round: int | None = Field(None, ge=1, description="sample size; default every connected client")
    wait_for_clients_s: float = Field(120.0, gt=0)
    round_timeout_s: float = Field(600.0, gt=0)
    part_bytes: int = Field(DEFAULT_PART_BYTES, gt=0)
    parts_in_flight: int = Field(2, ge=1, description="outstanding part requests per client")
    # Bounds what the SuperLink holds for this federation (and the coordinator's share of it)
    # whatever the number of clients; the slots rotate among clients.
    parts_in_flight_total: int = Field(8, ge=1, description="outstanding part requests across all clients")
    straggler_grace_s: float | None = Field(None, ge=0, description="once quorum is verified, wait at most this long for the rest")
    reference: Literal["base", "global"] = "base"
    # float32 deltas make a federated round byte-identical to the offline merge; bfloat16 halves the bytes.
    delta_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    seal: bool = False
    # The trust store must be signed by this coordinator's own key (``coordinator_key``); an
    # unsigned store is accepted only with this flag, for local experiments.
    allow_unsigned_trust: bool = False
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    evaluator: EvaluatorHook | None = None
    sample_seed: int = 0
    superlink: SuperLinkConfig | None = None

    @model_validator(mode="after")
    def _quorum_fits(self) -> "FederationConfig":
        if self.clients_per_round is not None and self.clients_per_round < self.min_clients:
            raise ValueError(f"clients_per_round ({self.clients_per_round}) is below min_clients ({self.min_clients})")
        return self

    @property
    def state(self) -> Path:
        return Path(self.state_dir)


def load_federation_config(path) -> FederationConfig:
    return load_config(path, FederationConfig, ConfigError)
