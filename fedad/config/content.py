"""What a run computes, as dotted keys: fingerprints, their differences, the runtime keys."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig

from fedad.config.settings import flatten


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
NONE_GROUPS = ("attack", "privacy", "personalize", "secure_aggregation")
# Federated early stopping: off (patience 0) it changes nothing a run computes, whatever its
# metric and min_delta say, so it is left out of the content then, and runs from before it
# existed stay comparable. On, it draws validation rows at every site and ends training.
STOP_KEY = "simulation.stop"
# The decision rule: argmax, as every run before it decided, leaves it out of the content.
DECISION_KEY = "decision"


def content(cfg: DictConfig | Mapping) -> dict:
    """The settings that decide what a run contains, as dotted keys (rounds apart)."""
    flat = fingerprint(cfg, ignore=(*RUNTIME_KEYS, ROUNDS_KEY))
    idle = [f"{g}." for g in NONE_GROUPS if flat.get(f"{g}.name", "none") == "none"]
    if not flat.get(f"{STOP_KEY}.patience", 0):
        idle.append(f"{STOP_KEY}.")
    if flat.get(f"{DECISION_KEY}.rule", "argmax") == "argmax":
        idle.append(f"{DECISION_KEY}.")
    return {k: v for k, v in flat.items() if not any(k.startswith(g) for g in idle)}
