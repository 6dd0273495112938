"""Keras classifiers at the sites (FedProx's proximal term included) and at the server."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import keras
import numpy as np
import tensorflow as tf
from flwr.app import ArrayRecord, RecordDict

from fedad import rundir
from fedad.config import Settings, section
from fedad.federated.families.base import Family, RunScorer
from fedad.federated.task import Site, balanced_weights
from fedad.models.inference import SERVER_BATCH, predict
from fedad.models.keras_models import TrainingSteps, build_model, run_epochs

# The global seed init_runtime set in this process (None: not yet); an actor a multirun's
# next job reuses (fedad.federated.engine.EngineStart.keep) gets that job's seed.
_RUNTIME_SEED: int | None = None
# One compiled model and its compiled steps per actor process, reused by every client the
# actor runs: building and tracing a Keras model costs seconds, a message costs milliseconds.
_MODELS: dict[str, ProximalModel] = {}
# Key of the optimizer's variables in a site's state between rounds.
OPTIMIZER_STATE = "optimizer"


class KerasFamily(Family):
    """Keras classifiers (CNN, logistic, MLP): weights travel, strategies average them."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._server_model: keras.Model | None = None

    def init_runtime(self) -> None:
        """Size TensorFlow to the site's CPUs and fix its seed, once (:func:`init_runtime`)."""
        init_runtime(self.settings)

    def seed_initial(self, seed: int) -> None:
        """Seed Keras, which draws the initial weights (and dropout) from its global state."""
        keras.utils.set_random_seed(seed)

    def initial_arrays(self) -> list[np.ndarray]:
        """Fresh weights of the server's model."""
        return self.server_model().get_weights()

    def fit(
        self, arrays: list[np.ndarray], site: Site, config: Mapping, seed: int
    ) -> tuple[list[np.ndarray], dict[str, float]]:
        """Train from the global weights; FedProx's ``proximal-mu`` comes in ``config``."""
        model = local_model(self.settings)
        y = site.y_train
        history = train_local(
            model,
            arrays,
            site.X_train,
            y,
            self.settings,
            mu=float(config.get("proximal-mu", 0.0)),
            seed=seed,
            validation=(site.X_val, site.y_val),
            sample_weight=balanced_weights(y) if self.settings["train.class_weights"] else None,
            state=site.state if self.settings["train.keep_optimizer"] else None,
            correction=self.correction,
        )
        return model.get_weights(), {**history, "num-examples": len(site.y_train)}

    def scores(self, arrays: list[np.ndarray], X: np.ndarray) -> np.ndarray:
        """Class probabilities: the server's model, or the site's cached one."""
        if self._server_model is not None:
            self._server_model.set_weights(arrays)
            return self._server_model.predict(X, batch_size=SERVER_BATCH, verbose=0)
        model = local_model(self.settings)
        model.set_weights(arrays)
        return predict(model, X)

    def server_model(self) -> keras.Model:
        """The server's plain copy of the model (built on first use)."""
        if self._server_model is None:
            self._server_model = global_model(self.settings)
        return self._server_model

    def save(self, arrays: list[np.ndarray], run_dir: Path) -> Path:
        """Write ``global_model.keras``, loadable with ``compile=True`` without warnings."""
        model = self.server_model()
        model.set_weights(arrays)
        # A built optimizer is saved with all its slots, so loading the file with
        # compile=True does not warn about missing optimizer variables.
        model.optimizer.build(model.trainable_variables)
        path = Path(run_dir) / rundir.MODEL_FILE
        save_keras(model, path)
        return path


class KerasScorer(RunScorer):
    """The saved global Keras classifier of a run."""

    detector_kind = "keras"

    def __init__(self, run_dir: Path, name: str = rundir.MODEL_FILE) -> None:
        self.path = Path(run_dir) / name
        self.model = keras.models.load_model(self.path, compile=False)
        self.load_threshold(run_dir)

    def predict_scores(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities, ``SERVER_BATCH`` rows a call, as the server scored them."""
        return predict(self.model, X, batch_size=SERVER_BATCH).astype(np.float64)


def save_keras(model: keras.Model, path: Path) -> None:
    """Save a Keras model (Keras 3.15 warns about a NumPy-2 deprecation there, harmlessly)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="__array__ implementation", category=DeprecationWarning
        )
        model.save(path)


class ProximalModel(keras.Model):
    """A functional Keras model whose training loss adds FedProx's proximal term.

    The term is ``mu / 2 * ||w - w_global||^2`` over the trainable weights;
    Flower's FedProx strategy only sends ``mu``, each client must add the term
    itself. ``mu = 0`` gives plain local training (FedAvg and the others).
    The anchor is kept outside Keras' tracking so it is not part of
    ``get_weights()``. The model trains through :attr:`steps`, its compiled
    steps (:class:`fedad.models.keras_models.TrainingSteps`), set by
    :func:`local_model`.
    """

    steps: TrainingSteps

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._anchor = _Anchor(
            mu=tf.Variable(0.0, trainable=False),
            weights=[tf.Variable(w, trainable=False) for w in self.get_weights()],
        )

    def set_anchor(self, weights: list[np.ndarray], mu: float) -> None:
        """Pull training towards ``weights`` (the global model) with strength ``mu``."""
        self._anchor.mu.assign(mu)
        for variable, value in zip(self._anchor.weights, weights, strict=True):
            variable.assign(value)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """Return the compiled loss plus the proximal term while training."""
        loss = super().compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
        )
        if not training:
            return loss
        gap = tf.add_n(
            [
                tf.reduce_sum(tf.square(w.value - anchor))
                for w, anchor in zip(self.weights, self._anchor.weights, strict=True)
                if w.trainable
            ]
        )
        return loss + 0.5 * self._anchor.mu * gap


@dataclass
class _Anchor:
    mu: tf.Variable
    weights: list[tf.Variable]


def local_model(settings: Settings) -> ProximalModel:
    """Return this process's compiled model for ``settings``, built on first use."""
    model_cfg = section(settings, "model")
    n_classes = len(json.loads(str(settings["class-names"])))
    key = json.dumps(
        [
            model_cfg,
            settings["num-features"],
            n_classes,
            settings["train.learning_rate"],
            settings["train.optimizer"],
        ],
        sort_keys=True,
    )
    if key not in _MODELS:
        base = build_model(
            model_cfg,
            int(settings["num-features"]),
            n_classes,
            float(settings["train.learning_rate"]),
            str(settings["train.optimizer"]),
        )
        model = ProximalModel(inputs=base.inputs, outputs=base.outputs, name=base.name)
        model.compile(
            optimizer=keras.optimizers.deserialize(keras.optimizers.serialize(base.optimizer)),
            loss=base.loss,
            metrics=["accuracy"] if base.loss != "mse" else None,
        )
        model.steps = TrainingSteps(model)
        _MODELS[key] = model
    return _MODELS[key]


def train_local(
    model: ProximalModel,
    global_weights: list[np.ndarray],
    X: np.ndarray,
    y: np.ndarray,
    settings: Settings,
    mu: float,
    seed: int,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
    sample_weight: np.ndarray | None = None,
    state: RecordDict | None = None,
    anchor: list[np.ndarray] | None = None,
    correction: list[np.ndarray] | None = None,
) -> dict[str, float]:
    """Train ``model`` from ``global_weights`` on one site's rows, one compiled step a batch.

    The steps are the model's (:func:`fedad.models.keras_models.run_epochs`): each
    epoch orders the rows afresh from ``seed``, and early stopping keeps the
    weights of the epoch with the lowest validation loss.

    Parameters
    ----------
    model : ProximalModel
        From :func:`local_model`; its weights and optimizer state are reset here.
    global_weights : list[np.ndarray]
        The global model received from the server (also the proximal anchor).
    X, y : np.ndarray
        Training inputs and targets (class codes; the inputs again for an autoencoder).
    settings : Mapping
        ``train.*`` settings: ``local_epochs``, ``batch_size``,
        ``learning_rate``, ``early_stopping_patience``.
    mu : float
        FedProx proximal strength; 0 for every other strategy.
    seed : int
        Seeds the row orders and dropout, so one seed gives one update.
    validation : tuple of np.ndarray, optional
        Held-out rows for early stopping (used when the patience is set).
    sample_weight : np.ndarray, optional
        Per-row weights (class balancing).
    state : RecordDict, optional
        The site's memory between rounds: the optimizer starts from the state
        kept there (fresh when there is none) and leaves its new state there.
        Without it every call starts a fresh optimizer.
    anchor : list[np.ndarray], optional
        Where the proximal term pulls (default ``global_weights``); a personal
        model trained from its own weights towards the global one sets both.
    correction : list[np.ndarray], optional
        Added to every gradient, one array per array of ``get_weights()``
        (SCAFFOLD's ``c - c_i``; only the trainable ones' are used); none by default.

    Returns
    -------
    dict[str, float]
        ``train_loss`` (including the proximal term) of the last epoch,
        ``train_accuracy`` for a classifier, ``train_epochs`` run and
        ``train_steps`` behind the returned weights.
    """
    start_local(model, global_weights, settings, mu, seed, state, anchor)
    model.steps.correct(correction)
    history = run_epochs(
        model.steps,
        X,
        y,
        epochs=int(settings["train.local_epochs"]),
        batch_size=int(settings["train.batch_size"]),
        seed=seed,
        sample_weight=sample_weight,
        validation=validation,
        patience=int(settings["train.early_stopping_patience"]),
    )
    if state is not None:
        state[OPTIMIZER_STATE] = ArrayRecord([np.asarray(v) for v in model.optimizer.variables])
    return history


def start_local(
    model: ProximalModel,
    global_weights: list[np.ndarray],
    settings: Settings,
    mu: float,
    seed: int,
    state: RecordDict | None = None,
    anchor: list[np.ndarray] | None = None,
) -> None:
    """Set ``model`` to train from ``global_weights``: weights, anchor, optimizer and dropout seeds.

    What :func:`train_local` does before its first step (the parameters are
    its own): whatever sites the actor's cached model trained before, the
    update depends only on these arguments.
    """
    model.set_weights(global_weights)
    model.set_anchor(global_weights if anchor is None else anchor, mu)
    _reset_optimizer(model.optimizer, float(settings["train.learning_rate"]))
    if state is not None and OPTIMIZER_STATE in state:
        _restore_optimizer(model, cast(ArrayRecord, state[OPTIMIZER_STATE]).to_numpy_ndarrays())
    _reseed(model, seed)


def global_model(settings: Settings) -> keras.Model:
    """Build and compile the server's copy of the model the sites train, from ``settings``.

    Parameters
    ----------
    settings : Mapping
        Flat run settings with ``model.*``, ``num-features``, ``class-names``,
        ``train.learning_rate`` and ``train.optimizer``.

    Returns
    -------
    keras.Model
        Fresh weights drawn from Keras's current random state.
    """
    return build_model(
        section(settings, "model"),
        int(settings["num-features"]),
        len(json.loads(str(settings["class-names"]))),
        float(settings["train.learning_rate"]),
        str(settings["train.optimizer"]),
    )


def _reset_optimizer(optimizer: keras.optimizers.Optimizer, learning_rate: float) -> None:
    # Zeroed slots and step count are what a fresh optimizer starts from; the
    # cached model is shared by many sites, so no site inherits another's moments.
    for variable in optimizer.variables:
        variable.assign(np.zeros(variable.shape, dtype=variable.dtype))
    optimizer.learning_rate = learning_rate


def _restore_optimizer(model: keras.Model, values: list[np.ndarray]) -> None:
    optimizer = model.optimizer
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    learning_rate = float(optimizer.learning_rate)
    for variable, value in zip(optimizer.variables, values, strict=True):
        variable.assign(value)
    # The rate is the run's setting, whatever the kept state says.
    optimizer.learning_rate = learning_rate


def _reseed(model: keras.Model, seed: int) -> None:
    # Dropout draws from a per-layer seed state that advances with every step;
    # resetting it makes the update independent of which sites the actor ran before.
    for i, layer in enumerate(model.layers):
        generator = getattr(layer, "seed_generator", None)
        if isinstance(generator, keras.random.SeedGenerator):
            state = np.array([(seed + i) % 2**32, 0])
            generator.state.assign(state.astype(generator.state.dtype))


def init_runtime(settings: Settings) -> None:
    """Size TensorFlow's thread pools to the actor's CPUs and fix its global seed.

    Must run before any TF op. Training draws only from the seeds
    :func:`train_local` sets; the fixed global seed keeps any other draw
    reproducible. Setting it once matters: setting it clears TensorFlow's
    caches, and every traced function then has to be instantiated again,
    which costs more than a small site's training: it is set again only for
    another seed (a later job of a multirun that reuses this actor).
    """
    global _RUNTIME_SEED
    seed = int(settings.get("seed", 0))
    if seed == _RUNTIME_SEED:
        return
    if _RUNTIME_SEED is None:
        threads = int(settings.get("client-threads", 1))
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError:
            # TensorFlow already ran in this process (the driver, a test session): its
            # pools are fixed for the process's life, and only their size differs.
            pass
        tf.config.experimental.enable_op_determinism()
    tf.random.set_seed(seed)
    _RUNTIME_SEED = seed
