"""A hospital's config (``client.yaml``): who it is, what it contributes, where it installs models,
what it scores candidates on."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedmerge.configfile import CompressionSpec, ConfigError, ConfigPath, load_config


class ClientConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    institution: str
    identity_key: ConfigPath  # the institution's private identity file (signs its packages)
    identity_passphrase_file: ConfigPath | None = None
    trust_store: ConfigPath  # the consortium's trust store, signed by the pinned coordinator
    # The coordinator's public identity (``coordinator.pub.json``): the only signer whose trust
    # store and published models this hospital accepts, and the key packages are sealed to.
    coordinator_public_file: ConfigPath
    allow_unsigned_trust: bool = False
    base_model: ConfigPath
    finetuned: ConfigPath | None = None  # a full fine-tune (HF folder)...
    adapter: ConfigPath | None = None  # ...or a PEFT LoRA adapter folder
    state_dir: ConfigPath
    seal: bool = True  # seal packages to the coordinator (only it can read the deltas)
    # Largest model folder accepted from the coordinator; null: twice the base model's files.
    max_model_bytes: int | None = Field(None, gt=0)
    # Flower connection: the SuperLink's Fleet address, its CA, and this node's auth key (OpenSSH EC).
    superlink_address: str = "127.0.0.1:9092"
    root_cert: ConfigPath | None = None
    supernode_key: ConfigPath | None = None
    runtime_port: int = 9094
    # SHA-256 of the Flower app bundles this node agrees to run; anything else is refused unrun.
    pinned_app_hashes: list[str] = Field(default_factory=list)
    # Optional local training between rounds: run before packing, with FEDMERGE_* variables set;
    # it must write a checkpoint to $FEDMERGE_OUTPUT, which becomes the round's contribution.
    train_hook: list[str] | None = None
    keep_models: int = Field(2, ge=1, description="installed rounds kept on disk (current + previous)")
    # Candidate selection (the coordinator's `selection: federated`): a fedmerge eval config whose
    # tasks are this hospital's private validation split; candidates are scored on it here and
    # only their accuracies go back. Without it, this hospital declines to score.
    validation: ConfigPath | None = None
    # Score with another harness than fedmerge's evaluator: "package.module:factory", where
    # factory(EvalConfig) returns scorer(model_dir, *, round, candidate) -> {task: accuracy}.
    validation_scorer: str | None = Field(None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    max_candidates: int = Field(4, ge=1, description="most candidates scored per round (each is a download and an evaluation)")
    # Largest candidate package accepted; null: twice the base model's files (a float32 delta of a bf16 base).
    max_candidate_bytes: int | None = Field(None, gt=0)

    # The compressions (fedmerge.checkpoints.codecs specs) this hospital agrees to pack its delta
    # with: one spec or a list; null: any spec the coordinator announces that this fedmerge knows.
    # A round asking for another is refused (CompressionRefused).
    compression: list[CompressionSpec] | None = None

    @field_validator("compression", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        if v is None:
            return None
        specs = [v] if isinstance(v, str) else v
        if not isinstance(specs, list) or not specs:
            raise ValueError("give a compression spec (e.g. int4) or a non-empty list of them")
        return specs

    @model_validator(mode="after")
    def _one_source(self) -> "ClientConfig":
        if (self.finetuned is None) == (self.adapter is None):
            raise ValueError("give exactly one of 'finetuned' (a model folder) or 'adapter' (a LoRA adapter folder)")
        return self

    @property
    def state(self) -> Path:
        return Path(self.state_dir)

    @property
    def source(self) -> str:
        return self.finetuned or self.adapter  # type: ignore[return-value]


def load_client_config(path) -> ClientConfig:
    return load_config(path, ClientConfig, ConfigError)
