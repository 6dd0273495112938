"""The flat run settings the Flower apps receive, and the list of their keys derived from conf/."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, cast

from omegaconf import DictConfig, OmegaConf

from fedad.config.compose import CONF_DIR, CONFIG_NAME

# Groups of the composed config that reach the Flower apps, flattened to dotted keys.
SETTINGS_GROUPS = (
    "model",
    "train",
    "strategy",
    "simulation",
    "attack",
    "privacy",
    "decision",
    "personalize",
)
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
# Keys of those groups that the driver alone reads to start the engine, with everything under
# them (simulation.client_resources.num_cpus); never sent to a site.
ENGINE_KEYS = ("simulation.client_resources", "simulation.ray_init_args", "simulation.address")


def _engine_key(key: str) -> bool:
    """Whether ``key`` is one of :data:`ENGINE_KEYS` or lies under one."""
    return any(key == k or key.startswith(f"{k}.") for k in ENGINE_KEYS)


def _group_keys(group: str) -> list[str]:
    """Every key any option of ``group`` sets (or, for a root section, the section's keys).

    Nested mappings are flattened to dotted keys (``simulation.stop.metric``), as
    :func:`group_settings` and ``flwr run`` flatten them.
    """
    folder = CONF_DIR / group
    if folder.is_dir():
        options = [OmegaConf.load(path) for path in sorted(folder.glob("*.yaml"))]
    else:
        options = [cast(DictConfig, OmegaConf.load(CONF_DIR / f"{CONFIG_NAME}.yaml"))[group]]
    # Unresolved: an option alone cannot resolve what it borrows (${train.learning_rate}).
    values = [cast(dict, OmegaConf.to_container(option, resolve=False)) for option in options]
    keys = dict.fromkeys(key for value in values for key in flatten(value, f"{group}."))
    keys.pop(f"{group}.defaults", None)  # Hydra's own list, not a setting
    return [key for key in keys if not _engine_key(key)]


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    """The plain nested dict of a DictConfig, interpolations resolved.

    ``OmegaConf.to_container`` is typed for any node (a list, a string, None); a
    DictConfig always converts to a dict with string keys, which this says once for
    every caller.

    Parameters
    ----------
    cfg : DictConfig
        A config node with keys (the composed config, or one of its groups).

    Returns
    -------
    dict
    """
    return cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))


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
        values = to_dict(values)
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping) and (value or not keep_empty):
            flat.update(flatten(value, f"{prefix}{key}.", keep_empty=keep_empty))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# Every key a run can hand the apps (the Flower run config), read from conf/. Which of them
# a run sets depends on its model and strategy; ``pyproject.toml``'s
# ``[tool.flwr.app.config]`` must declare exactly these (tests/test_deployment.py checks).
FLOWER_KEYS = (*RUN_KEYS, *(key for group in SETTINGS_GROUPS for key in _group_keys(group)))

Scalar = bool | int | float | str
# Flat run settings as the Flower apps receive them (a Flower run config has this shape).
Settings = Mapping[str, Scalar]


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

    Nested mappings are flattened too (``simulation.stop.patience``);
    :data:`ENGINE_KEYS` and everything under them are left out. A group the
    config lacks is left out: the apps read a missing ``attack`` or
    ``privacy`` group as ``none``, as they do under ``flwr run`` when it is not set.
    """
    settings: dict[str, Scalar] = {}
    for group in SETTINGS_GROUPS:
        if group not in cfg:
            continue
        values = flatten(to_dict(cfg[group]), f"{group}.")
        settings.update(
            {k: v for k, v in values.items() if isinstance(v, Scalar) and not _engine_key(k)}
        )
    return settings


class DataShape(Protocol):
    """What the settings need of the prepared data (read only: a property will do)."""

    @property
    def n_features(self) -> int:
        """Feature columns the models take."""
        ...

    @property
    def class_names(self) -> Sequence[Any]:
        """Class code to name."""
        ...


def make_settings(
    cfg: DictConfig, data: DataShape, num_clients: int, run_dir: Path
) -> dict[str, Scalar]:
    """Flatten what the apps need into a Flower-style run config.

    Parameters
    ----------
    cfg : DictConfig
        The composed config.
    data : DataShape
        For the feature count and class names (a ``PreparedData``).
    num_clients : int
        Number of sites.
    run_dir : Path
        Where the shards are and the outputs go.

    Returns
    -------
    dict
        Scalar values only, with dotted keys (``model.filters``,
        ``train.batch_size``, ``strategy.proximal_mu``,
        ``simulation.num_rounds``), as ``flwr run`` flattens a
        ``[tool.flwr.app.config]`` table, so the same apps can be deployed;
        every key is one of :data:`FLOWER_KEYS`.
    """
    return {
        "run-dir": str(Path(run_dir).resolve()),
        "seed": int(cfg.seed),
        "num-clients": num_clients,
        "num-features": int(data.n_features),
        "class-names": json.dumps([str(c) for c in data.class_names]),
        "client-threads": max(1, int(cfg.simulation.client_resources.get("num_cpus", 1))),
        **group_settings(cfg),
    }
