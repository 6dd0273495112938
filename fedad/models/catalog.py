"""The models fedad knows by name, and the checks of their settings (no framework imported)."""

from __future__ import annotations

from collections.abc import Mapping

from fedad import checks

MODEL_NAMES = ("cnn", "logistic")
OPTIMIZERS = ("adam", "sgd")


def check_config(model_cfg: Mapping) -> list[str]:
    """What is wrong with a ``model`` config (name and sizes); empty when it can be built.

    Parameters
    ----------
    model_cfg : Mapping
        The ``model`` config group: ``name`` plus the model's own settings.

    Returns
    -------
    list[str]
        One phrase per problem, naming the key.
    """
    name = model_cfg.get("name")
    if name not in MODEL_NAMES:
        return [f"model must be one of {', '.join(MODEL_NAMES)}, got {name!r}"]
    problems = [
        checks.number(model_cfg, key, "model", whole=True, low=1)
        for key in ("filters", "kernel_size", "dense_units")
    ]
    problems.append(checks.number(model_cfg, "dropout", "model", low=0, high=1, high_open=True))
    return [p for p in problems if p]
