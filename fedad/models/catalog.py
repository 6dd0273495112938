"""The models fedad knows by name, their families and twins, and checks of their settings."""

from __future__ import annotations

from collections.abc import Mapping

from fedad.config import checks

# Keras classifiers (softmax over the task's classes), the Keras autoencoder (anomaly score:
# reconstruction error, binary task only), and gradient-boosted trees (XGBoost).
KERAS_CLASSIFIERS = ("cnn", "logistic", "mlp")
AUTOENCODERS = ("autoencoder",)
BOOSTERS = ("xgboost",)
MODEL_NAMES = (*KERAS_CLASSIFIERS, *AUTOENCODERS, *BOOSTERS)
OPTIMIZERS = ("adam", "sgd")
# Each federated model's centralized twin: the same family trained on the pooled rows.
TWINS = {
    "cnn": "central_cnn",
    "logistic": "central_logistic",
    "mlp": "central_mlp",
    "autoencoder": "central_autoencoder",
    "xgboost": "xgboost",
}
# The centralized models that are some federated model's twin.
TWIN_NAMES = frozenset(TWINS.values())
FEDERATED_PREFIX, LOCAL_PREFIX, WORST_SUFFIX = "federated_", "local_", "_worst"


def federated_name(model: str) -> str:
    """The comparison's name of the federated ``model`` (``federated_cnn``)."""
    return f"{FEDERATED_PREFIX}{model}"


def local_name(model: str, *, worst: bool = False) -> str:
    """The name of ``model`` trained by each site alone: their mean, or the worst site."""
    return f"{LOCAL_PREFIX}{model}{WORST_SUFFIX if worst else ''}"


def model_of(federated: str) -> str:
    """The model behind a federated result's name (``federated_cnn`` -> ``cnn``)."""
    return federated.removeprefix(FEDERATED_PREFIX)


# Integer sizes each model reads (>= 1), and its dropout-like shares in [0, 1).
_SIZES = {
    "cnn": ("filters", "kernel_size", "dense_units"),
    "logistic": (),
    "mlp": ("units", "layers"),
    "autoencoder": ("units", "bottleneck"),
    "xgboost": ("local_rounds", "max_depth"),
}
_SHARES = {"cnn": ("dropout",), "mlp": ("dropout",), "autoencoder": ("dropout",)}


def family(name: str) -> str:
    """The family of model ``name``: ``keras``, ``autoencoder`` or ``booster``."""
    if name in AUTOENCODERS:
        return "autoencoder"
    if name in BOOSTERS:
        return "booster"
    return "keras"


def check_config(model_cfg: Mapping, task: str = "binary") -> list[str]:
    """What is wrong with a ``model`` config (name and sizes); empty when it can be built.

    Parameters
    ----------
    model_cfg : Mapping
        The ``model`` config group: ``name`` plus the model's own settings.
    task : str
        ``binary`` or ``multiclass``: the autoencoder only detects (binary).

    Returns
    -------
    list[str]
        One phrase per problem, naming the key.
    """
    name = model_cfg.get("name")
    if name not in MODEL_NAMES:
        return [f"model must be one of {', '.join(MODEL_NAMES)}, got {name!r}"]
    problems = [checks.number(model_cfg, k, "model", whole=True, low=1) for k in _SIZES[name]]
    problems += [
        checks.number(model_cfg, k, "model", low=0, high=1, high_open=True)
        for k in _SHARES.get(name, ())
    ]
    problems.append(checks.flag(model_cfg, "batch_norm", "model"))
    problems.append(checks.flag(model_cfg, "class_weights", "model"))
    if name == "xgboost":
        problems.append(checks.number(model_cfg, "learning_rate", "model", low=0, low_open=True))
        problems.append(checks.number(model_cfg, "max_bin", "model", whole=True, low=2))
    if name in AUTOENCODERS and task != "binary":
        problems.append(
            "model=autoencoder detects anomalies (normal vs attack) and cannot tell attack types "
            "apart, so it needs task=binary (got task=multiclass)"
        )
    return [p for p in problems if p]
