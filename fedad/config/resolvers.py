"""The OmegaConf resolvers conf/ uses, registered on import (fedad.config imports this module)."""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig, OmegaConf


def malicious_count(fraction: float, sites: int) -> int:
    """How many of ``sites`` are malicious under ``attack.fraction``: ``floor(fraction * sites)``.

    Rounded to 9 decimals first, so that 0.29 of 100 sites is 29 and not 28.
    """
    return math.floor(round(float(fraction) * int(sites), 9))


def sampled_sites(sim: Any) -> int:
    """Sites a training round samples under the ``simulation`` settings, as FedAvg samples them."""
    return max(
        int(float(sim.get("fraction_train", 1.0)) * int(sim.get("num_clients", 1))),
        int(sim.get("min_clients", 1)),
    )


def _assumed_attackers(*, _root_: DictConfig) -> int:
    """``${attackers:}``: the malicious sites a training round can meet, from the root config.

    The robust strategies' ``num_malicious_nodes`` defaults to it: the true count of
    malicious sites (none without an attack), capped by the sites a round samples.
    """

    def get(key: str, default: Any) -> Any:
        return OmegaConf.select(_root_, key, default=default)

    if get("attack.name", "none") == "none":
        return 0
    sim = get("simulation", {})
    sites = int(sim.get("num_clients", 1))
    return min(malicious_count(get("attack.fraction", 0.0), sites), sampled_sites(sim))


# Registered on import: every path that composes or resolves a config imports this module.
if not OmegaConf.has_resolver("attackers"):
    OmegaConf.register_new_resolver("attackers", _assumed_attackers)
