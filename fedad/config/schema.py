"""The typed schema of the root config: types here, every default in ``conf/config.yaml``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

SCHEMA_NAME = "fedad_schema"


@dataclass
class PreprocessConfig:
    """``preprocess``: how raw rows become features (see conf/config.yaml)."""

    log_transform: bool = MISSING
    drop_duplicates: bool = MISSING
    test_size: float = MISSING
    audit_threshold: float = MISSING


@dataclass
class StopConfig:
    """``simulation.stop``: federated early stopping on the sites' pooled validation slices."""

    metric: str = MISSING
    patience: int = MISSING
    min_delta: float = MISSING


@dataclass
class SimulationConfig:
    """``simulation``: the sites, the rounds and the engine."""

    num_clients: int = MISSING
    num_rounds: int = MISSING
    fraction_train: float = MISSING
    fraction_evaluate: float = MISSING
    min_clients: int = MISSING
    client_failure_rate: float = MISSING
    failure_mode: str = MISSING
    round_timeout: float = MISSING
    checkpoint_every: int = MISSING
    scaling: str = MISSING
    local_sites: int = MISSING
    central_sites: bool = MISSING
    final_eval_fraction: float | None = MISSING
    stop: StopConfig = MISSING
    client_resources: dict[str, float] = MISSING
    ray_init_args: dict[str, Any] = MISSING
    address: str | None = MISSING


@dataclass
class TrainConfig:
    """``train``: local training at each site (and the central Keras models)."""

    local_epochs: int = MISSING
    batch_size: int = MISSING
    learning_rate: float = MISSING
    optimizer: str = MISSING
    keep_optimizer: bool = MISSING
    class_weights: bool = MISSING
    early_stopping_patience: int = MISSING
    val_fraction: float = MISSING
    test_fraction: float = MISSING


@dataclass
class DecisionConfig:
    """``decision``: the rule every model of the comparison is scored under."""

    rule: str = MISSING
    target_fpr: float | None = MISSING


@dataclass
class DetectorConfig:
    """``detector``: the ready-to-use detectors a run saves (see docs/detector.md)."""

    write: bool = MISSING
    target_fpr: float | None = MISSING


@dataclass
class RootConfig:
    """The root of ``conf/config.yaml``; the option groups keep their own per-option checks."""

    dataset: Any = MISSING
    partition: Any = MISSING
    model: Any = MISSING
    strategy: Any = MISSING
    baselines: Any = MISSING
    attack: Any = MISSING
    privacy: Any = MISSING
    secure_aggregation: Any = MISSING
    personalize: Any = MISSING
    tracking: Any = MISSING
    seed: int = MISSING
    data_dir: str = MISSING
    task: str = MISSING
    federated: bool = MISSING
    baselines_cache: str | None = MISSING
    explain: bool = MISSING
    eda: bool = MISSING
    resume: str | None = MISSING
    preprocess: PreprocessConfig = MISSING
    simulation: SimulationConfig = MISSING
    train: TrainConfig = MISSING
    detector: DetectorConfig = MISSING
    decision: DecisionConfig = MISSING


ConfigStore.instance().store(name=SCHEMA_NAME, node=RootConfig)
