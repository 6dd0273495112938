"""Each kind of model a detector can hold: how it is saved, and loaded without running stored code.

A new model family joins by adding one :class:`Adapter` to :data:`ADAPTERS`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fedad import rundir
from fedad.errors import FedadError
from fedad.evaluation.scorer import Scorer
from fedad.models.inference import SERVER_BATCH, predict, reconstruction_error

log = logging.getLogger("fedad")

# What a saved scikit-learn model may hold beyond the types skops trusts by itself; anything
# else in a .skops file is refused rather than loaded.
SKOPS_TRUSTED = ("sklearn.tree._tree.Tree",)
# What a model's ``predict`` returns: class probabilities ``(n, n_classes)``, or one anomaly
# score per row (higher = more attack-like), which only a threshold turns into a class.
PROBABILITIES, ANOMALY_SCORE = "probabilities", "anomaly_score"
# The opt-in for a Keras model whose layers carry Python code (a Lambda layer, custom
# layers): off unless set to 1, for the commands that take no Python argument.
TRUST_ENV = "FEDAD_TRUST_CUSTOM_CODE"
# The Python modules a Keras model that fedad wrote names in its config.json.
KERAS_MODULES = ("keras",)
# A config.json larger than this is no model fedad wrote (the federated CNN's is ~10 kB).
KERAS_CONFIG_BYTES = 16 << 20
# How much of a library's own error a message quotes.
QUOTED = 300

Predict = Callable[[np.ndarray], np.ndarray]


class Loader(Protocol):
    """``load(path, data=None, trust_custom_code=False) -> predict``.

    ``data`` is the file's content, already checked against the manifest's
    checksum (read from ``path`` when None); ``path`` names the file in messages.
    """

    def __call__(
        self, path: Path, data: bytes | None = None, trust_custom_code: bool = False
    ) -> Predict:
        """The model's ``predict``; FedadError naming ``path`` when it is not loaded."""


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
    load : Loader
        ``load(path, data=None, trust_custom_code=False) -> predict``, where
        ``predict(X)`` returns the model's output for scaled rows ``X``, as
        ``output`` says; FedadError (one paragraph naming ``path``) when the file
        is damaged or holds what fedad does not load.
    output : str
        :data:`PROBABILITIES` (``(n, n_classes)``) or :data:`ANOMALY_SCORE` (``(n,)``).
    """

    kind: str
    file: str
    libraries: tuple[str, ...]
    accepts: Callable[[object], bool]
    save: Callable[[object, Path], None]
    load: Loader
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


def trusted_by_environment() -> bool:
    """Whether :data:`TRUST_ENV` is ``1``: Keras layers that carry code may load."""
    value = os.environ.get(TRUST_ENV, "").strip()
    if value not in ("", "0", "1"):
        raise FedadError(
            f"{TRUST_ENV} is '{value}'; set it to 1 to load Keras layers that carry Python code "
            "(only for a model whose code you trust), or to 0 or nothing to refuse them."
        )
    return value == "1"


def _quote(err: BaseException) -> str:
    """A library's error in one line, cut short: its first line (many add a stack trace)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    text = text if len(text) <= QUOTED else text[:QUOTED] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def damaged(path: Path, what: str, err: BaseException | str) -> FedadError:
    """The refusal of a file that cannot be read as ``what``: the folder is damaged."""
    why = err if isinstance(err, str) else _quote(err)
    return FedadError(
        f"{path} cannot be read as {what} ({why}): the detector folder is damaged, or its "
        "file was replaced with its checksum. Copy the whole folder again, or write it again "
        "with python -m fedad.simulate."
    )


def _opt_in_hint() -> str:
    return (
        "If the model is your own and you trust its code, load it with "
        f"Detector.load(folder, trust_custom_code=True) or set {TRUST_ENV}=1 (after importing "
        "the module that registers its layers)."
    )


def _foreign_modules(path: Path, data: bytes) -> list[str]:
    """The Python modules outside Keras that the model's ``config.json`` names."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            info = archive.getinfo("config.json")
            if info.file_size > KERAS_CONFIG_BYTES:
                raise damaged(path, "a Keras model", f"a config.json of {info.file_size} bytes")
            stack = [json.loads(archive.read(info))]
    except (zipfile.BadZipFile, KeyError, ValueError, RecursionError, OSError) as err:
        raise damaged(path, "a Keras model", err) from None
    found = set()
    # A walk without recursion: a crafted config can nest deeper than Python's stack.
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            module = node.get("module")
            if isinstance(module, str) and module.split(".")[0] not in KERAS_MODULES:
                found.add(module)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return sorted(found)


def load_keras(path: Path, data: bytes | None = None, trust_custom_code: bool | None = None):
    """The Keras model in ``path`` (content ``data``), loaded with no stored Python code run.

    The model's config may name Keras' own classes only, and Keras loads it in
    ``safe_mode``, which refuses a ``Lambda`` layer's code. ``trust_custom_code``
    lifts both (a user's own custom layers; None: :data:`TRUST_ENV` decides); a
    refusal is one FedadError.
    """
    import keras

    data = path.read_bytes() if data is None else data
    if trust_custom_code is None:
        trust_custom_code = trusted_by_environment()
    if trust_custom_code:
        log.warning("loading %s with trust_custom_code: code stored in the model may run", path)
    else:
        foreign = _foreign_modules(path, data)
        if foreign:
            raise FedadError(
                f"{path} is not loaded: its Keras config names Python code outside Keras "
                f"({', '.join(foreign)}), such as custom layers or functions, which fedad "
                "never writes into a detector and which would run on loading. " + _opt_in_hint()
            )
    # Keras reads a path: the checked bytes go to a private copy, not the folder's file,
    # which could have changed since it was checked.
    with tempfile.TemporaryDirectory(prefix="fedad-model-") as tmp:
        copy = Path(tmp) / "model.keras"
        copy.write_bytes(data)
        try:
            return keras.models.load_model(copy, compile=False, safe_mode=not trust_custom_code)
        # Keras raises many types for a damaged or refused file; each ends here as one paragraph.
        except Exception as err:
            if "safe_mode" in str(err):
                raise FedadError(
                    f"{path} is not loaded: it holds a Keras layer that carries Python code "
                    "(a Lambda layer, which Keras' safe mode refuses: the code would run on "
                    "loading), and fedad never writes such a layer into a detector. "
                    + _opt_in_hint()
                ) from None
            raise damaged(path, "a Keras model", err) from None


def _keras_load(path: Path, data: bytes | None = None, trust_custom_code: bool = False) -> Predict:
    model = load_keras(path, data, trust_custom_code)
    # Scored as the server scores the global model: a direct call per batch, no data pipeline.
    return lambda X: predict(model, X, batch_size=SERVER_BATCH)


def _sklearn_save(model: object, path: Path) -> None:
    import skops.io

    skops.io.dump(model, path)


def _sklearn_load(
    path: Path, data: bytes | None = None, trust_custom_code: bool = False
) -> Predict:
    import skops.io

    data = path.read_bytes() if data is None else data
    # skops raises many types for a damaged file; each ends here as one paragraph.
    try:
        untrusted = skops.io.get_untrusted_types(data=data)
    except Exception as err:
        raise damaged(path, "a scikit-learn model (skops)", err) from None
    unexpected = sorted(set(untrusted) - set(SKOPS_TRUSTED))
    if unexpected:
        raise FedadError(
            f"{path} holds types fedad never saves in a detector ({', '.join(unexpected)}), "
            "so it is not loaded: loading them could run code from the file. Use a detector "
            "that fedad.simulate wrote."
        )
    try:
        model = skops.io.loads(data, trusted=untrusted)
    except Exception as err:
        raise damaged(path, "a scikit-learn model (skops)", err) from None
    if not callable(getattr(model, "predict_proba", None)):
        raise damaged(path, "a classifier", f"it holds a {type(model).__name__}")
    return model.predict_proba


def _xgboost_save(model: Any, path: Path) -> None:
    model.save_model(str(path))


def _xgboost_load(
    path: Path, data: bytes | None = None, trust_custom_code: bool = False
) -> Predict:
    from xgboost import XGBClassifier

    model = XGBClassifier()
    try:
        model.load_model(bytearray(path.read_bytes() if data is None else data))
    # XGBoostError, or a ValueError/TypeError of its Python side, for a damaged file.
    except Exception as err:
        raise damaged(path, "an XGBoost model", err) from None
    return model.predict_proba


def _booster_load(
    path: Path, data: bytes | None = None, trust_custom_code: bool = False
) -> Predict:
    from fedad.models import booster

    raw = path.read_bytes() if data is None else data
    try:
        classes = int(json.loads(raw)["learner"]["learner_model_param"]["num_class"]) or 2
        model = booster.load(raw)
    except Exception as err:
        raise damaged(path, "an XGBoost booster", err) from None
    return lambda X: booster.probabilities(model, X, classes)


def _autoencoder_load(
    path: Path, data: bytes | None = None, trust_custom_code: bool = False
) -> Predict:
    model = load_keras(path, data, trust_custom_code)
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
