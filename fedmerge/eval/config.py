"""The evaluator's configuration: which tasks, how many shots, where, and where scores go."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fedmerge.configfile import ConfigPath, ConfigPathObj, read_yaml_mapping, validate_config
from fedmerge.eval.errors import EvalConfigError

DEFAULT_CPU_BATCH = 4


class EvalConfig(BaseModel):
    """One evaluation setup, reused for every round so that rounds are comparable.

    ``tasks`` are local task names (YAML files in ``task_dirs``) or built-in lm-eval task names
    (see ``fedmerge.eval.tasks.BUILTIN_TASKS``); ``builtin_datasets`` points a built-in task at a
    local copy of its dataset (a folder, a file, or a mapping split -> file).
    """

    model_config = ConfigDict(extra="forbid")

    tasks: list[str] = Field(min_length=1)
    task_dirs: list[ConfigPathObj] = Field(default_factory=list)
    builtin_datasets: dict[str, Union[ConfigPath, dict[str, ConfigPath]]] = Field(default_factory=dict)
    num_fewshot: int = Field(5, ge=0)
    limit: Union[int, float, None] = Field(None, description="items per task (int) or fraction (<1); None = all")
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    batch_size: Union[int, Literal["auto"], None] = Field(None, description="None: 'auto' on CUDA, a small fixed batch on CPU")
    max_batch_size: int = Field(64, ge=1)
    cpu_threads: int | None = Field(None, ge=1, description="torch threads while scoring on CPU; None = torch's default")
    seed: int = Field(1234, description="few-shot sampling and every other random seed lm-eval uses")
    bootstrap_iters: int = Field(1000, ge=0, description="only for metrics without a closed-form stderr")
    store: ConfigPathObj | None = Path("results.db")
    fingerprint: bool = Field(True, description="compute the model's content fingerprint for the store")

    @field_validator("limit")
    @classmethod
    def _limit_positive(cls, v):
        if v is not None and v <= 0:
            raise ValueError("limit must be positive (an item count, or a fraction below 1)")
        return v

    @field_validator("batch_size")
    @classmethod
    def _batch_positive(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError("batch_size must be at least 1, 'auto' or null")
        return v

    @classmethod
    def from_yaml(cls, path: str | Path) -> "EvalConfig":
        raw = read_yaml_mapping(path, EvalConfigError, "a mapping of eval settings")
        if isinstance(raw.get("eval"), dict):
            raw = raw["eval"]
        return validate_config(raw, cls, path, EvalConfigError)

    def resolved_device(self) -> str:
        from fedmerge.devices import resolve_device

        return resolve_device(self.device)

    def resolved_dtype(self, device: str) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if device.startswith("cuda") else "float32"

    def resolved_batch_size(self, device: str) -> Union[int, str]:
        if self.batch_size is not None:
            return self.batch_size
        # Auto batch size probes memory with growing batches: right on a GPU, but on a CPU with a
        # large vocabulary it can exhaust RAM, so the CPU gets a small fixed batch.
        return "auto" if device.startswith("cuda") else DEFAULT_CPU_BATCH
