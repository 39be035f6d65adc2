"""The serve config: replicas, resources and engine per deployment (YAML, one pydantic model).

``moerge serve --config FILE`` reads it; the Helm chart renders the same document into the
RayService's ``args.config``. Every field has a default that fits a 2-core machine, so an empty
file (or none) is a valid config. Unknown keys are refused: a typo must not silently fall back to
a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from registry.errors import MoergeError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# The default CPU shares add up to 1.5, so every deployment fits a 2-core machine's local Ray
# (Ray counts logical CPUs; an unschedulable replica would leave `serve.run` waiting forever).


class GatewayConfig(_Strict):
    replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.25, ge=0)
    request_timeout_s: float = Field(120.0, gt=0)
    require_keys: bool = False  # the embedded default; the Helm chart turns it on


class EngineConfig(_Strict):
    engine: Literal["hf", "vllm"] = "hf"
    replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.5, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    # Ray Serve model multiplexing: adapters (and full models) per replica before LRU eviction
    max_adapters_per_replica: int = Field(8, ge=1)
    engine_args: dict[str, Any] = Field(default_factory=dict)  # passed to the engine's constructor


class EnginesConfig(_Strict):
    default: EngineConfig = Field(default_factory=EngineConfig)
    bases: dict[str, dict[str, Any]] = Field(default_factory=dict)  # base name -> overrides of default

    def for_base(self, base: str) -> EngineConfig:
        overrides = self.bases.get(base, {})
        return EngineConfig.model_validate({**self.default.model_dump(), **overrides})


class ModelsConfig(_Strict):
    """The deployment for full-model experts that have no base model of their own on the cluster."""

    replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.25, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    max_models_per_replica: int = Field(4, ge=1)


class StrategiesConfig(_Strict):
    replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.5, ge=0)
    # token-level mixtures, merges and router fitting run in this deployment: a GPU makes "auto"
    # put them on CUDA in bfloat16 (without one Ray hides every GPU, and "auto" is the CPU)
    num_gpus: float = Field(0.0, ge=0)
    device: str = "auto"
    dtype: str = "auto"
    names: list[str] | None = None  # None: every strategy that needs no gold task
    # a YAML file of strategy definitions (docs/strategies.md); default: $MOERGE_STRATEGIES
    file: str | None = None
    refresh_interval_s: float = Field(1.0, ge=0)  # how often the registry is checked for new experts


class ServeConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # how HTTP reaches the gateway (services/serving/ingress.py); read where Ray starts, so it
    # applies to a local Ray started by `moerge serve`, not to a cluster joined through RAY_ADDRESS
    ingress: Literal["haproxy", "proxy"] = "haproxy"
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    engines: EnginesConfig = Field(default_factory=EnginesConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    strategies: StrategiesConfig = Field(default_factory=StrategiesConfig)


def load_config(source: str | Path | dict | None) -> ServeConfig:
    """A ``ServeConfig`` from a YAML file, a dict (Ray Serve ``args``), or defaults (None)."""
    if source is None:
        return ServeConfig()
    if isinstance(source, dict):
        data, where = source, "serve config"
    else:
        path = Path(source)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except OSError as exc:
            raise MoergeError(f"cannot read serve config {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise MoergeError(f"serve config {path} is not valid YAML: {exc}") from exc
        where = str(path)
    if not isinstance(data, dict):
        raise MoergeError(f"{where}: the top level must be a mapping")
    try:
        return ServeConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise MoergeError(f"{where}: {problems}") from exc
