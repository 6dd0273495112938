"""Each kind of model a detector can hold: how it is saved, and loaded without running stored code.

A new model family joins by adding one :class:`Adapter` to :data:`ADAPTERS`.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedad import rundir
from fedad.errors import FedadError
from fedad.evaluation.scorer import Scorer
from fedad.models.inference import SERVER_BATCH, predict, reconstruction_error

# What a saved scikit-learn model may hold beyond the types skops trusts by itself; anything
# else in a .skops file is refused rather than loaded.
SKOPS_TRUSTED = ("sklearn.tree._tree.Tree",)
# What a model's ``predict`` returns: class probabilities ``(n, n_classes)``, or one anomaly
# score per row (higher = more attack-like), which only a threshold turns into a class.
PROBABILITIES, ANOMALY_SCORE = "probabilities", "anomaly_score"

Predict = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Adapter:
    """How one kind of model is written into a detector folder and read back.

    Attributes
    ----------
    kind : str
        Name recorded in the detector's manifest (``keras``, ``sklearn``, ``xgboost``,
        ``booster``, ``autoencoder``).
    file : str
        The model's file name inside the detector folder.
    libraries : tuple[str, ...]
        Distributions whose versions the model depends on (a difference is warned about).
    accepts : callable
        ``accepts(model) -> bool``: whether this adapter saves ``model``.
    save : callable
        ``save(model, path)``: write the model to ``path``.
    load : callable
        ``load(path) -> predict``, where ``predict(X)`` returns the model's
        output for scaled rows ``X``, as ``output`` says.
    output : str
        :data:`PROBABILITIES` (``(n, n_classes)``) or :data:`ANOMALY_SCORE` (``(n,)``).
    """

    kind: str
    file: str
    libraries: tuple[str, ...]
    accepts: Callable[[object], bool]
    save: Callable[[object, Path], None]
    load: Callable[[Path], Predict]
    output: str = PROBABILITIES


def _module(model: object) -> str:
    return type(model).__module__


def _run_scorer(kind: str) -> Callable[[object], bool]:
    """Accepts a run's scorer that declares this adapter as its own (``detector_kind``)."""
    return lambda model: isinstance(model, Scorer) and model.detector_kind == kind


def _copy_run_file(model: Any, path: Path) -> None:
    # A federated run's scorer: the model file the run saved, byte for byte.
    shutil.copyfile(model.path, path)


# The federated classifier arrives as its run's scorer; the autoencoder's scorer derives
# from it but declares its own kind, since its outputs are no class probabilities.
_keras_scorer = _run_scorer("keras")


def _keras_accepts(model: object) -> bool:
    return _keras_scorer(model) or _module(model).startswith("keras")


def _keras_save(model: Any, path: Path) -> None:
    if _module(model).startswith("keras"):
        model.save(path)
    else:
        _copy_run_file(model, path)


def load_keras(path: Path):
    """The Keras model in ``path``, loaded with ``safe_mode`` (no stored Python code runs)."""
    import keras

    return keras.models.load_model(path, compile=False, safe_mode=True)


def _keras_load(path: Path) -> Predict:
    model = load_keras(path)
    # Scored as the server scores the global model: a direct call per batch, no data pipeline.
    return lambda X: predict(model, X, batch_size=SERVER_BATCH)


def _sklearn_save(model: object, path: Path) -> None:
    import skops.io

    skops.io.dump(model, path)


def _sklearn_load(path: Path) -> Predict:
    import skops.io

    untrusted = skops.io.get_untrusted_types(file=path)
    unexpected = sorted(set(untrusted) - set(SKOPS_TRUSTED))
    if unexpected:
        raise FedadError(
            f"{path} holds types fedad never saves in a detector ({', '.join(unexpected)}), "
            "so it is not loaded: loading them could run code from the file. Use a detector "
            "that fedad.simulate wrote."
        )
    return skops.io.load(path, trusted=untrusted).predict_proba


def _xgboost_save(model: Any, path: Path) -> None:
    model.save_model(str(path))


def _xgboost_load(path: Path) -> Predict:
    from xgboost import XGBClassifier

    model = XGBClassifier()
    model.load_model(str(path))
    return model.predict_proba


def _booster_load(path: Path) -> Predict:
    import json

    from fedad.models import booster

    raw = path.read_bytes()
    classes = int(json.loads(raw)["learner"]["learner_model_param"]["num_class"]) or 2
    model = booster.load(raw)
    return lambda X: booster.probabilities(model, X, classes)


def _autoencoder_load(path: Path) -> Predict:
    model = load_keras(path)
    # The error as the run computed it: the reconstruction of SERVER_BATCH rows a call.
    return lambda X: reconstruction_error(X, predict(model, X, batch_size=SERVER_BATCH))


ADAPTERS: dict[str, Adapter] = {
    a.kind: a
    for a in (
        Adapter(
            "keras",
            rundir.DETECTOR_KERAS,
            ("keras", "tensorflow"),
            _keras_accepts,
            _keras_save,
            _keras_load,
        ),
        Adapter(
            "sklearn",
            rundir.DETECTOR_SKOPS,
            ("scikit-learn", "skops"),
            lambda model: _module(model).startswith("sklearn."),
            _sklearn_save,
            _sklearn_load,
        ),
        Adapter(
            "xgboost",
            rundir.DETECTOR_XGBOOST,
            ("xgboost",),
            lambda model: _module(model).startswith("xgboost"),
            _xgboost_save,
            _xgboost_load,
        ),
        Adapter(
            "booster",
            rundir.DETECTOR_BOOSTER,
            ("xgboost",),
            _run_scorer("booster"),
            _copy_run_file,
            _booster_load,
        ),
        Adapter(
            "autoencoder",
            rundir.DETECTOR_KERAS,
            ("keras", "tensorflow"),
            _run_scorer("autoencoder"),
            _copy_run_file,
            _autoencoder_load,
            ANOMALY_SCORE,
        ),
    )
}


def find_adapter(model: object) -> Adapter | None:
    """The adapter that saves ``model``, or None when no adapter does."""
    return next((a for a in ADAPTERS.values() if a.accepts(model)), None)


def adapter_for(model: object) -> Adapter:
    """The adapter that saves ``model``; FedadError naming the type when none does."""
    adapter = find_adapter(model)
    if adapter is not None:
        return adapter
    raise FedadError(
        f"fedad cannot save a {type(model).__module__}.{type(model).__name__} in a detector: "
        f"it saves these kinds of model: {', '.join(ADAPTERS)}. Add an Adapter for it in "
        "fedad/detector/adapters.py."
    )
