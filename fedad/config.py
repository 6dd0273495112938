"""The composed run config: where it lives, its typed schema, and the flat run settings."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedad import resolvers  # noqa: F401  (registers ${attackers:}, which conf/ uses)
from fedad.errors import FedadError


def _conf_dir() -> Path:
    """The config tree: inside the package when installed from a wheel, else the checkout's."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    return package / "conf"


CONF_DIR = _conf_dir()
CONFIG_NAME = "config"
SCHEMA_NAME = "fedad_schema"


@dataclass
class PreprocessConfig:
    """``preprocess``: how raw rows become features (see conf/config.yaml)."""

    log_transform: bool = True
    drop_duplicates: bool = True
    test_size: float = 0.2
    audit_threshold: float = 0.98


@dataclass
class SimulationConfig:
    """``simulation``: the sites, the rounds and the engine."""

    num_clients: int = 10
    num_rounds: int = 10
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_clients: int = 2
    client_failure_rate: float = 0.0
    failure_mode: str = "error"
    round_timeout: float = 600.0
    checkpoint_every: int = 1
    scaling: str = "federated"
    local_sites: int = 10
    final_eval_fraction: float | None = None
    client_resources: dict[str, float] = field(
        default_factory=lambda: {"num_cpus": 1.0, "num_gpus": 0.0}
    )
    ray_init_args: dict[str, Any] = field(default_factory=dict)
    address: str | None = None


@dataclass
class TrainConfig:
    """``train``: local training at each site (and the central Keras models)."""

    local_epochs: int = 1
    batch_size: int = 64
    learning_rate: float = 0.003
    optimizer: str = "adam"
    keep_optimizer: bool = True
    class_weights: bool = False
    early_stopping_patience: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.2


@dataclass
class DetectorConfig:
    """``detector``: the ready-to-use detectors a run saves (see docs/detector.md)."""

    write: bool = True
    target_fpr: float | None = 0.01


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
    tracking: Any = MISSING
    seed: int = 0
    data_dir: str = "./data"
    task: str = "binary"
    federated: bool = True
    baselines_cache: str | None = "auto"
    explain: bool = True
    eda: bool = True
    resume: str | None = None
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)


ConfigStore.instance().store(name=SCHEMA_NAME, node=RootConfig)


def compose(
    overrides: Sequence[str] = (), *, hydra: bool = False, config_name: str | None = None
) -> DictConfig:
    """Compose ``conf/config.yaml`` with Hydra ``overrides``, as ``python -m fedad.simulate`` does.

    Parameters
    ----------
    overrides : Sequence[str]
        ``key=value``, ``group=option``, ``+key=value`` ...
    hydra : bool
        Keep the ``hydra`` node (the run and sweep folders, the sweeper).
    config_name : str, optional
        Another primary config than ``config`` (one added with ``--config-dir``).

    Returns
    -------
    DictConfig

    Raises
    ------
    FedadError
        One paragraph naming the key: an unknown key or option, a value of the
        wrong type for the schema, a malformed override.
    """
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(
                config_name or CONFIG_NAME, overrides=list(overrides), return_hydra_config=hydra
            )
    except (HydraException, OmegaConfBaseException) as error:
        raise composition_error(error, overrides) from None


def composition_error(error: BaseException, overrides: Sequence[str] = ()) -> FedadError:
    """Turn a Hydra or OmegaConf composition error into one paragraph naming the key.

    Parameters
    ----------
    error : BaseException
        What Hydra raised while composing (its cause chain is searched).
    overrides : Sequence[str]
        The command line's overrides, quoted in the message when no key is known.

    Returns
    -------
    FedadError
    """
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    texts = [" ".join(str(e).split()) for e in chain]
    full_key = next((m.group(1) for t in texts if (m := re.search(r"full_key: (\S+)", t))), None)
    conversion = next(
        (
            m
            for t in texts
            if (
                m := re.search(
                    r"Value '(.*?)' of type '\w+' could not be "
                    r"converted to (\w+)",
                    t,
                )
            )
        ),
        None,
    )
    if full_key and conversion:
        expected = {"Integer": "a whole number", "Float": "a number", "Boolean": "true or false"}
        wanted = expected.get(conversion.group(2), conversion.group(2))
        return FedadError(
            f"{full_key} must be {wanted}, got '{conversion.group(1)}'. Fix it on the command "
            f"line ({full_key}=...) or in the config file that sets it."
        )
    missing = next((m for t in texts if (m := re.search(r"Key '(\S+?)' (?:is )?not in", t))), None)
    if missing:
        key = full_key or missing.group(1)
        return FedadError(f"Unknown setting {key}: {_no_such_key(key)}")
    option = next(
        (m for t in texts if (m := re.search(r"Could not find '(\S+?)/(\S+?)'", t))), None
    )
    if option:
        group, name = option.group(1), option.group(2)
        choices = available_options(group)
        hint = _closest(name, choices)
        return FedadError(
            f"Unknown {group} option '{name}'.{hint} Available: {', '.join(choices) or 'none'} "
            f"(files in conf/{group}/, or in a folder added with --config-dir)."
        )
    return FedadError(
        f"Cannot compose the configuration from {list(overrides)}: {texts[0]} Check the "
        "spelling of each key=value override; keys are listed in conf/config.yaml."
    )


def _no_such_key(key: str) -> str:
    """What to say about a key the composed config does not have."""
    parent, _, leaf = key.rpartition(".")
    try:
        node = compose()
        known = OmegaConf.select(node, parent) if parent else node
    except FedadError:
        known = None
    names = list(known.keys()) if isinstance(known, DictConfig) else []
    where = parent or "the config root"
    hint = _closest(leaf, [str(n) for n in names])
    return (
        f"{where} has no key '{leaf}'.{hint} Known keys there: {', '.join(map(str, names))}. "
        "A key that an option group adds only for some options (strategy.proximal_mu with "
        "strategy=fedprox) needs that option; a new key needs a leading '+'."
    )


def _closest(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def available_options(group: str) -> list[str]:
    """The options of a config group: ``conf/<group>/*.yaml`` without the extension."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def load_option(group: str, name: str) -> DictConfig:
    """Read one option file of a config group, e.g. ``load_option("model", "cnn")``."""
    return OmegaConf.load(CONF_DIR / group / f"{name}.yaml")


# --- flat run settings -----------------------------------------------------------------------

# Groups of the composed config that reach the Flower apps, flattened to dotted keys.
SETTINGS_GROUPS = ("model", "train", "strategy", "simulation", "attack", "privacy")
# Settings the apps read beyond those groups: what the driver computes for the run.
RUN_KEYS = (
    "run-dir",
    "seed",
    "num-clients",
    "num-features",
    "class-names",
    "client-threads",
    "resume",
    "fingerprint",
)
# Every key a run can hand the apps (the Flower run config). Which of them a run sets
# depends on its model and strategy; ``pyproject.toml``'s ``[tool.flwr.app.config]``
# must declare exactly these (tests/test_config.py checks both ways).
FLOWER_KEYS = (
    *RUN_KEYS,
    "model.name",
    "model.filters",
    "model.kernel_size",
    "model.dense_units",
    "model.dropout",
    "model.units",
    "model.layers",
    "model.batch_norm",
    "model.bottleneck",
    "model.local_rounds",
    "model.max_depth",
    "model.learning_rate",
    "model.class_weights",
    "train.local_epochs",
    "train.batch_size",
    "train.learning_rate",
    "train.optimizer",
    "train.keep_optimizer",
    "train.class_weights",
    "train.early_stopping_patience",
    "train.val_fraction",
    "train.test_fraction",
    "strategy.name",
    "strategy.proximal_mu",
    "strategy.eta",
    "strategy.eta_l",
    "strategy.beta_1",
    "strategy.beta_2",
    "strategy.tau",
    "strategy.server_learning_rate",
    "strategy.server_momentum",
    "strategy.beta",
    "strategy.num_malicious_nodes",
    "strategy.num_nodes_to_select",
    "strategy.q",
    "strategy.client_learning_rate",
    "simulation.num_clients",
    "simulation.num_rounds",
    "simulation.fraction_train",
    "simulation.fraction_evaluate",
    "simulation.min_clients",
    "simulation.client_failure_rate",
    "simulation.failure_mode",
    "simulation.round_timeout",
    "simulation.checkpoint_every",
    "simulation.scaling",
    "simulation.local_sites",
    "simulation.final_eval_fraction",
    *(f"attack.{k}" for k in ("name", "fraction", "start_round", "k", "sigma", "target_class")),
    *(
        f"privacy.{k}"
        for k in (
            *("name", "noise_multiplier", "clipping_norm", "delta", "epsilon"),
            *("initial_clipping_norm", "target_clipped_quantile", "clip_norm_lr"),
            "clipped_count_stddev",
        )
    ),
)

Scalar = bool | int | float | str
# Flat run settings as the Flower apps receive them (a Flower run config has this shape).
Settings = Mapping[str, Scalar]


def flatten(values: Mapping, prefix: str = "", *, keep_empty: bool = False) -> dict[str, Any]:
    """Flatten nested mappings into dotted keys: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``.

    Parameters
    ----------
    values : Mapping
        Plain nested mappings (a DictConfig is converted, resolved).
    prefix : str
        Put before every key.
    keep_empty : bool
        Keep an empty mapping as a value of its own rather than dropping it.

    Returns
    -------
    dict
    """
    if isinstance(values, DictConfig):
        values = OmegaConf.to_container(values, resolve=True)
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping) and (value or not keep_empty):
            flat.update(flatten(value, f"{prefix}{key}.", keep_empty=keep_empty))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def unflatten(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Nest dotted keys again: ``{"a.b": 1}`` -> ``{"a": {"b": 1}}`` (the inverse of flatten)."""
    nested: dict[str, Any] = {}
    for key, value in settings.items():
        *tables, leaf = key.split(".")
        node = nested
        for table in tables:
            node = node.setdefault(table, {})
        node[leaf] = value
    return nested


def section(settings: Mapping[str, Any], group: str) -> dict[str, Any]:
    """The settings of one group without its prefix: ``section(s, "model")["name"]``."""
    prefix = f"{group}."
    return {k.removeprefix(prefix): v for k, v in settings.items() if k.startswith(prefix)}


def group_settings(cfg: DictConfig) -> dict[str, Scalar]:
    """The scalar settings of :data:`SETTINGS_GROUPS`, flattened to dotted keys.

    A group the config lacks is left out: the apps read a missing ``attack`` or
    ``privacy`` group as ``none``, as they do under ``flwr run`` when it is not set.
    """
    settings: dict[str, Scalar] = {}
    for group in SETTINGS_GROUPS:
        if group not in cfg:
            continue
        values = OmegaConf.to_container(cfg[group], resolve=True)
        settings.update({f"{group}.{k}": v for k, v in values.items() if isinstance(v, Scalar)})
    return settings


def fingerprint(cfg: DictConfig | Mapping, ignore: Sequence[str] = ()) -> dict[str, Any]:
    """The whole config as dotted keys, leaving out ``ignore`` (and everything under them).

    Two runs whose fingerprints agree compute the same thing; :func:`differences`
    names the keys where they do not.
    """
    flat = flatten(cfg, keep_empty=True)
    return {
        k: v for k, v in flat.items() if not any(k == i or k.startswith(i + ".") for i in ignore)
    }


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Describe each key whose value differs between two :func:`fingerprint` dicts."""

    def show(values: Mapping, key: str) -> str:
        return repr(values[key]) if key in values else "not set"

    return [
        f"{key} (was {show(old, key)}, now {show(new, key)})"
        for key in sorted(set(old) | set(new))
        if show(old, key) != show(new, key)
    ]


# Settings that change how a run executes, not what it computes: a run continued in
# the same folder may change them. min_clients also sets the least sample size, which
# matters only when fraction_train * num_clients is below it.
RUNTIME_KEYS = (
    "resume",
    "tracking",
    "data_dir",
    # Detectors are written from the finished models: they never change the training.
    "detector",
    "baselines_cache",
    "simulation.client_resources",
    "simulation.ray_init_args",
    "simulation.address",
    "simulation.checkpoint_every",
    "simulation.round_timeout",
    "simulation.failure_mode",
    "simulation.min_clients",
)
# May grow when a run continues (train longer); never shrink below the rounds done.
ROUNDS_KEY = "simulation.num_rounds"
# Groups whose option `none` changes nothing a run computes, whatever its other keys say:
# left out of the content then, so runs from before these groups existed stay comparable.
NONE_GROUPS = ("attack", "privacy")


def content(cfg: DictConfig | Mapping) -> dict:
    """The settings that decide what a run contains, as dotted keys (rounds apart)."""
    flat = fingerprint(cfg, ignore=(*RUNTIME_KEYS, ROUNDS_KEY))
    idle = [f"{g}." for g in NONE_GROUPS if flat.get(f"{g}.name", "none") == "none"]
    return {k: v for k, v in flat.items() if not any(k.startswith(g) for g in idle)}
