"""A fair reference: the run's twin fits on every training row, and a cap on it is stated."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from fedad.baselines.supervised import AUTO, FIT_ROWS, SUPERVISED_DEFAULTS
from fedad.baselines.unsupervised import UNSUPERVISED_DEFAULTS
from fedad.config import checks
from fedad.data.prepared import PreparedData
from fedad.models.catalog import TWIN_NAMES

# An XGBoost twin above this many classes keeps FIT_ROWS even so: it grows one tree per class
# per boosting round, and at 34 classes on ~840,000 rows a round took about 53 s here, so an
# uncapped one is out of any budget fedad runs in. The comparison flags that capped reference.
MANY_CLASSES = 10


def fit_cap(
    name: str, setting: Any, twin: str | None, n_rows: int, n_classes: int
) -> dict[str, Any] | None:
    """The cap on model ``name``'s fit rows, or None where no cap can bite.

    Parameters
    ----------
    name : str
        The baseline's name.
    setting : int, "auto" or None
        Its ``max_fit_rows``.
    twin : str, optional
        The run's twin (``TWINS[model]``), None without a federated model.
    n_rows, n_classes : int
        Training rows and classes of the task.

    Returns
    -------
    dict or None
        ``{"rows": cap, "why": ...}``: ``set`` (a number in the config),
        ``auto`` (``auto`` on a model that is not the twin) or ``XGBoost twin
        above 10 classes`` (:data:`MANY_CLASSES`). None when uncapped or when
        the cap is at least ``n_rows``: such a cap changes nothing, so jobs of a
        sweep whose caps cannot bite share their cached baselines.
    """
    if setting == AUTO:
        if name != twin:
            rows, why = FIT_ROWS, AUTO
        elif name == "xgboost" and n_classes > MANY_CLASSES:
            rows, why = FIT_ROWS, f"XGBoost twin above {MANY_CLASSES} classes"
        else:
            return None
    elif setting is None:
        return None
    else:
        rows, why = int(setting), "set"
    return {"rows": rows, "why": why} if rows < n_rows else None


def fit_caps(
    models: Mapping[str, Mapping], twin: str | None, n_rows: int, n_classes: int
) -> dict[str, dict[str, Any] | None]:
    """:func:`fit_cap` of each model that has a ``max_fit_rows`` setting."""
    return {
        name: fit_cap(name, params["max_fit_rows"], twin, n_rows, n_classes)
        for name, params in models.items()
        if "max_fit_rows" in params
    }


def selected(cfg_baselines: Mapping) -> dict[str, dict[str, Any]]:
    """The selected models' settings merged over their defaults, by name."""
    defaults = {**SUPERVISED_DEFAULTS, **UNSUPERVISED_DEFAULTS}
    return {
        str(name): {**defaults[name], **dict(params or {})}
        for name, params in (cfg_baselines.get("models") or {}).items()
    }


def plain(cfg_baselines: Mapping) -> dict[str, Any]:
    """A plain-dict copy of a baselines config."""
    if isinstance(cfg_baselines, DictConfig):
        return cast(dict[str, Any], OmegaConf.to_container(cfg_baselines, resolve=True))
    return dict(cfg_baselines)


def cache_inputs(cfg_baselines: Mapping, data: PreparedData) -> dict:
    """What the baselines' results depend on, beside the data, for the sweep's cache.

    Parameters
    ----------
    cfg_baselines : Mapping
        A ``conf/baselines/*.yaml`` config, with its ``twin``
        (:func:`fedad.baselines.runner.with_twin`).
    data : PreparedData
        The split they fit on.

    Returns
    -------
    dict
        The config without ``twin`` and with ``fit_caps``, the caps that apply
        (:func:`fit_caps`): the twin matters through its cap alone, so the
        jobs of a sweep over models whose caps cannot bite share one entry.
    """
    config = {k: v for k, v in plain(cfg_baselines).items() if k != "twin"}
    twin, n_rows = cfg_baselines.get("twin"), len(data.y_train)
    return {**config, "fit_caps": fit_caps(selected(cfg_baselines), twin, n_rows, data.n_classes)}


def check_caps(cfg_baselines: Mapping) -> list[str]:
    """What is wrong with the models' ``max_fit_rows``; empty when every one is fine.

    Parameters
    ----------
    cfg_baselines : Mapping
        A ``conf/baselines/*.yaml`` config.

    Returns
    -------
    list[str]
        One phrase per problem, naming the key.
    """
    problems = []
    for name, params in (cfg_baselines.get("models") or {}).items():
        if "max_fit_rows" not in (params or {}):
            continue
        value = params["max_fit_rows"]
        auto = name in TWIN_NAMES and value == AUTO
        if not auto and checks.number(params, "max_fit_rows", "", whole=True, low=1):
            problems.append(
                f"baselines.models.{name}.max_fit_rows must be a whole number >= 1 or null "
                f"(no cap){', or auto' if name in TWIN_NAMES else ''}, got {value!r}"
            )
    return problems
