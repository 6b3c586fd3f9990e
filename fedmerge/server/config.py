"""The coordinator's config (``federation.yaml``): who merges what, how, and where Flower listens.

Everything that can be checked without the hospitals is checked when the file loads: the merge
strategy (its method through the merging registry, its parameters through the method's own
schema, and that the quorum is a number of contributions the method is defined for), the
bindings of institutions to SuperNode keys, the gate's settings, the candidates of ``selection:``
(each through the same registry and schemas, their number against ``max_candidates``). A
misspelled method fails here, naming ``strategy.method``, not after a round has been transferred.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedmerge.configfile import CompressionSpec, ConfigError, ConfigPath, describe_validation_error, load_config
from fedmerge.protocol import DEFAULT_PART_BYTES


class StrategyConfig(BaseModel):
    """Handed to the engine's ``MergeSpec`` as is (method, parameters, per-model parameters...)."""

    model_config = ConfigDict(extra="allow")
    method: str = "task_arithmetic"
    parameters: dict[str, Any] = Field(default_factory=dict)
    seed: int = 0

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        from fedmerge.merging.strategies import StrategyError, get_strategy_class

        try:
            get_strategy_class(v)
        except StrategyError as exc:  # its message lists the valid names
            raise ValueError(str(exc)) from None
        return v

    @model_validator(mode="after")
    def _valid_spec(self) -> "StrategyConfig":
        from fedmerge.merging.engine import MergeSpec
        from fedmerge.merging.strategies import StrategyError, build_strategy, get_strategy_class

        try:
            spec = MergeSpec(**self.spec_fields())
            cls = get_strategy_class(spec.method)
            n = max(cls.min_models, len(spec.model_parameters))
            build_strategy(spec.method, spec.parameters, spec.model_parameters or [{}] * n, n_models=n)
        except ValidationError as exc:
            raise ValueError(describe_validation_error(exc)) from None
        except StrategyError as exc:
            raise ValueError(str(exc)) from None
        return self

    def spec_fields(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)

    def models_allowed(self) -> tuple[int, int | None]:
        """(fewest, most) contributions the method is defined for."""
        from fedmerge.merging.strategies import get_strategy_class

        cls = get_strategy_class(self.method)
        return cls.min_models, cls.max_models


# -- candidate selection -------------------------------------------------------------------------
class CandidateGrid(BaseModel):
    """One method over a grid of parameter values: every combination of ``vary`` is a candidate.

    ``parameters`` are the fixed ones; ``vary`` maps a parameter to the values it takes (several
    parameters: their product, in the order written, the last one varying fastest).
    """

    model_config = ConfigDict(extra="forbid")
    method: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    vary: dict[str, list[Any]] = Field(min_length=1)
    seed: int = 0

    @field_validator("vary")
    @classmethod
    def _values(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for name, values in v.items():
            if not values:
                raise ValueError(f"{name}: give at least one value")
        return v

    def expand(self) -> list[dict[str, Any]]:
        import itertools

        names = list(self.vary)
        return [
            {"method": self.method, "parameters": {**self.parameters, **dict(zip(names, combo))}, "seed": self.seed}
            for combo in itertools.product(*(self.vary[n] for n in names))
        ]


SELECTION_MODES = ("none", "central", "federated")


class SelectionConfig(BaseModel):
    """Choose the published model among candidate merges by their scores on validation data.

    ``mode``: ``none`` publishes the configured ``strategy`` (no candidates); ``central`` scores
    each candidate with the evaluator on ``eval_config`` (the consortium's validation split, held
    by the coordinator); ``federated`` sends each candidate to every contributing hospital, which
    scores it on its own validation split and returns only accuracies. ``rule``: ``mean`` is the
    mean over scorers of each scorer's mean accuracy over its tasks; ``worst`` is the lowest of
    those means. Candidates: the ``candidates`` list, then each ``grid`` expanded, numbered c1,
    c2... in that order; a tie goes to the lower number. More than ``max_candidates`` is refused
    unless ``max_candidates`` is raised explicitly.
    """

    model_config = ConfigDict(extra="forbid")
    mode: Literal["none", "central", "federated"] = "none"
    candidates: list[StrategyConfig] = Field(default_factory=list)
    grid: list[CandidateGrid] = Field(default_factory=list)
    max_candidates: int = Field(4, ge=1, description="most candidates a round builds (each is a merge, and in federated mode a download and an evaluation at every hospital)")
    rule: Literal["mean", "worst"] = "mean"
    eval_config: ConfigPath | None = None  # central: the consortium's validation eval config
    # federated: the dtype candidate deltas travel in (the delta from the round's reference).
    delta_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    # federated: how candidate deltas are encoded (a fedmerge.checkpoints.codecs spec, as for
    # contributions): int4 sends each hospital about a quarter of the bf16 bytes per candidate.
    compression: CompressionSpec = "none"
    keep_candidates: bool = Field(False, description="keep every candidate's model after the round (default: only the published one)")

    @field_validator("grid", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, dict) else v

    @model_validator(mode="after")
    def _consistent(self) -> "SelectionConfig":
        specs = self.specs()
        if self.mode == "none":
            if specs:
                raise ValueError("candidates are listed but mode is none, so none would be built; set mode: central or federated")
            if self.eval_config is not None:
                raise ValueError("eval_config is read only with mode: central")
            return self
        if not specs:
            raise ValueError(f"mode {self.mode} needs candidates: list them under candidates: and/or grid:")
        if len(specs) > self.max_candidates:
            raise ValueError(
                f"{len(specs)} candidates, more than max_candidates ({self.max_candidates}); each costs a merge"
                + (", a download and an evaluation at every hospital" if self.mode == "federated" else " and an evaluation")
                + "; list fewer, or raise max_candidates explicitly"
            )
        seen: dict[str, int] = {}
        for i, spec in enumerate(specs):
            key = repr(sorted(spec.spec_fields().items()))
            if key in seen:
                raise ValueError(f"candidate c{i + 1} is the same merge as c{seen[key] + 1} ({candidate_label(spec)})")
            seen[key] = i
        if self.mode == "central":
            if self.eval_config is None:
                raise ValueError("mode central needs eval_config: the consortium's validation eval config")
            from fedmerge.eval.config import EvalConfig
            from fedmerge.errors import FedmergeError

            try:
                EvalConfig.from_yaml(self.eval_config)
            except FedmergeError as exc:
                raise ValueError(f"eval_config: {exc}") from None
        if self.mode == "federated" and self.eval_config is not None:
            raise ValueError("eval_config is read only with mode: central (in federated mode each hospital scores on its own validation: config)")
        return self

    def specs(self) -> list[StrategyConfig]:
        """Every candidate, in order: c1 is the first."""
        out = list(self.candidates)
        for gi, g in enumerate(self.grid):
            for fields in g.expand():
                try:
                    out.append(StrategyConfig(**fields))
                except ValidationError as exc:
                    raise ValueError(f"grid[{gi}] ({candidate_label(fields)}): {describe_validation_error(exc).removeprefix('(root): ')}") from None
        return out

    @property
    def enabled(self) -> bool:
        return self.mode != "none"


def candidate_label(spec: "StrategyConfig | dict[str, Any]") -> str:
    """``method name=value ...``: how a candidate is named in logs, records and ``fedmerge status``."""
    fields = spec.spec_fields() if isinstance(spec, StrategyConfig) else spec
    params = " ".join(f"{k}={v}" for k, v in sorted(fields.get("parameters", {}).items()))
    return f"{fields['method']} {params}".strip()


class SuperLinkConfig(BaseModel):
    """The SuperLink the coordinator starts and owns (it never attaches to one it did not start).

    ``address`` is the public Fleet listener, the only one hospitals reach; the full API (Control,
    the ServerApp's runtime) listens on loopback only.
    """

    model_config = ConfigDict(extra="forbid")
    address: str = "0.0.0.0:9092"
    ca_cert: ConfigPath
    server_cert: ConfigPath  # TLS is not optional
    server_key: ConfigPath
    # Where Flower keeps its link state (nodes, runs, messages in flight and their payload objects):
    # "memory" (default), or "file" (SQLite at database_path). Rounds resume from fedmerge's own
    # journal and spool, and a restarted coordinator starts a fresh SuperLink and registers the
    # node keys again, so nothing needs the file; in memory, every part skips a SQLite write, read
    # and delete, and no plaintext part of a published model rests on the coordinator's disk.
    link_state: Literal["memory", "file"] = "memory"
    database_path: ConfigPath | None = None  # with link_state: file; default: <state_dir>/superlink.db
    # institution -> OpenSSH public key of its SuperNode (`fedmerge node-key` output). A node's
    # contributions count only for the institution its key is bound to, and only bound nodes
    # receive published models.
    supernode_public_keys: dict[str, ConfigPath] = Field(default_factory=dict)

    @field_validator("supernode_public_keys", mode="before")
    @classmethod
    def _a_mapping(cls, v: Any) -> Any:
        if isinstance(v, list):
            raise ValueError("must map each institution to its node's public key file (institution: path/to/node.pub), not list files")
        return v


class EvaluatorHook(BaseModel):
    """Score every round's model and let the publication gate decide whether it is published.

    The gate compares the round's ``gate_metric`` (mean over ``gate_tasks``, or each task with
    ``gate_aggregate: each``) with the last published model's and/or the base model's scores,
    and refuses a drop of more than ``gate_margin``. A refused model is neither signed nor pushed.
    """

    model_config = ConfigDict(extra="forbid")
    config_path: ConfigPath  # an eval config (YAML) for fedmerge.eval; its store keeps scores and gate decisions
    gate_metric: str = "acc"
    gate_margin: float = Field(0.02, ge=0, description="allowed drop, in metric units (0.02 = 2 accuracy points)")
    gate_compare_to: Literal["previous", "base", "both"] = "both"
    gate_aggregate: Literal["mean", "each"] = "mean"
    gate_tasks: list[str] | None = None
    # Without scores the gate cannot tell a regression: a round whose evaluation failed is refused
    # unless this is set.
    publish_if_evaluation_fails: bool = False

    def gate_config(self):
        from fedmerge.eval.gate import GateConfig

        return GateConfig(margin=self.gate_margin, metric=self.gate_metric, compare_to=self.gate_compare_to,
                          aggregate=self.gate_aggregate, tasks=self.gate_tasks)  # fmt: skip


class FederationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "fedmerge"
    state_dir: ConfigPath
    base_model: ConfigPath
    coordinator_key: ConfigPath  # the coordinator's private identity file (signs published models)
    coordinator_key_passphrase_file: ConfigPath | None = None
    trust_store: ConfigPath  # signed by the coordinator's key; refused otherwise unless allow_unsigned_trust
    allow_unsigned_trust: bool = False
    rounds: int = Field(1, ge=1)
    min_clients: int = Field(2, ge=1, description="quorum: fewest verified contributions that make a round")
    clients_per_round: int | None = Field(None, ge=1, description="sample size; null: every enrolled, bound institution")
    wait_for_clients_s: float = Field(120.0, gt=0)
    round_timeout_s: float = Field(600.0, gt=0)
    part_bytes: int = Field(DEFAULT_PART_BYTES, gt=0)
    parts_in_flight: int = Field(2, ge=1, description="outstanding part requests per client")
    # Bounds what the SuperLink holds for this federation (and the coordinator's share of it)
    # whatever the number of clients; the slots rotate among clients.
    parts_in_flight_total: int = Field(8, ge=1, description="outstanding part requests across all clients")
    straggler_grace_s: float | None = Field(None, ge=0, description="once quorum is verified, wait at most this long for the rest")
    # Largest package a hospital may announce; null: a delta of every base tensor at delta_dtype,
    # with sealing tags and the manifest (what an honest package can be at most).
    max_package_bytes: int | None = Field(None, gt=0)
    reference: Literal["base", "global"] = "base"
    # float32 deltas make a federated round byte-identical to the offline merge; bfloat16 halves the bytes.
    delta_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # How hospitals encode their deltas' matrices (fedmerge.checkpoints.codecs): none (exact), int8,
    # int4, sparse:<density>, or selecting stages then one storing stage (sparse:0.25+int4).
    # Announced in every open-round message; a package compressed otherwise is rejected.
    compression: CompressionSpec = "none"
    # How the round's model is pushed back: none (the whole model) or a codec spec; then the model
    # is published as reference + decode(encode(merged - reference)), what every hospital rebuilds.
    publish_compression: CompressionSpec = "none"
    # Refuse contributions that are not sealed to the coordinator (a recorded rejection).
    require_sealed: bool = True
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    evaluator: EvaluatorHook | None = None
    sample_seed: int = 0
    superlink: SuperLinkConfig | None = None

    @model_validator(mode="after")
    def _quorum_fits(self) -> "FederationConfig":
        if self.clients_per_round is not None and self.clients_per_round < self.min_clients:
            raise ValueError(f"clients_per_round ({self.clients_per_round}) is below min_clients ({self.min_clients})")
        fewest, most = self.strategy.models_allowed()
        if self.min_clients < fewest:
            raise ValueError(f"strategy.method {self.strategy.method} merges at least {fewest} contributions; min_clients is {self.min_clients}")
        if most is not None and (self.clients_per_round or 0) > most:
            raise ValueError(f"strategy.method {self.strategy.method} merges at most {most} contributions; clients_per_round is {self.clients_per_round}")
        return self

    @model_validator(mode="after")
    def _candidates_fit(self) -> "FederationConfig":
        for i, spec in enumerate(self.selection.specs()):
            fewest, most = spec.models_allowed()
            if self.min_clients < fewest:
                raise ValueError(f"selection candidate c{i + 1} ({candidate_label(spec)}) merges at least {fewest} contributions; min_clients is {self.min_clients}")
            if most is not None and (self.clients_per_round or 0) > most:
                raise ValueError(f"selection candidate c{i + 1} ({candidate_label(spec)}) merges at most {most} contributions; clients_per_round is {self.clients_per_round}")
        return self

    @property
    def state(self) -> Path:
        return Path(self.state_dir)


def load_federation_config(path) -> FederationConfig:
    return load_config(path, FederationConfig, ConfigError)
