"""Reuse centralized baseline results across the jobs of a sweep that share their inputs."""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedad import rundir

log = logging.getLogger(__name__)


def key(inputs: Mapping[str, Any]) -> str:
    """A stable hash of everything the cached computation depends on."""
    plain = {
        k: OmegaConf.to_container(v, resolve=True) if isinstance(v, DictConfig) else v
        for k, v in inputs.items()
    }
    text = json.dumps(plain, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached(cache_dir: Path | None, inputs: Mapping[str, Any], compute: Callable[[], Any]) -> Any:
    """Return ``compute()``, reading it from ``cache_dir`` when the same inputs ran before.

    Parameters
    ----------
    cache_dir : Path or None
        Folder of pickled results; None computes without caching.
    inputs : Mapping
        Every setting the result depends on (configs, seed, epochs).
    compute : callable
        Produces the result; it must be picklable.
    """
    if cache_dir is None:
        return compute()
    path = cache_dir / f"{key(inputs)}.pkl"
    if path.is_file():
        try:
            with path.open("rb") as fh:
                result = pickle.load(fh)
            log.info("reusing centralized baselines from %s", path)
            return result
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as err:
            log.warning("ignoring unreadable baseline cache %s (%s); recomputing", path, err)
    result = compute()
    cache_dir.mkdir(parents=True, exist_ok=True)
    with rundir.atomic(path) as fh:
        pickle.dump(result, fh)
    return result
