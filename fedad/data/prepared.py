"""The prepared train/test arrays every model in a run shares."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.preprocessing import StandardScaler

from fedad.data.preprocess import Preprocessor


@dataclass
class PreparedData:
    """Encoded, imputed and log-transformed features, before scaling.

    Label ``0`` is always the normal (benign) class; ``class_names[0]`` names it.
    Centralized models scale with :attr:`scaler`, fitted on the training part
    only. Federated clients scale their own shards (locally, or with statistics
    aggregated across sites), so the arrays here stay unscaled.

    Attributes
    ----------
    X_train, X_test : np.ndarray
        ``float32`` arrays of shape ``(n, n_features)``.
    y_train, y_test : np.ndarray
        ``int64`` class codes in ``range(len(class_names))``.
    feature_names : list[str]
        One name per column of ``X_*`` (one-hot columns read ``col=value``).
    class_names : list[str]
        Class code to name; ``["normal", "attack"]`` for the binary task.
    task : str
        ``"binary"`` or ``"multiclass"``.
    groups_train : np.ndarray or None
        Per-row value of the natural-partition column (e.g. ``site``), if any.
    types_train : np.ndarray or None
        Per-row attack type of the training rows (the class the multiclass task
        gives it; ``normal`` for normal rows), as names, for the binary task
        when the data name attack types; None otherwise (the labels are the types).
    types_test : np.ndarray or None
        The same for the test rows.
    sources_train, sources_test : np.ndarray or None
        Per-row source (organisation) of a federation of sources
        (``dataset.federate``), each source split on its own rows; None otherwise.
    scaler : StandardScaler
        Fitted on ``X_train`` only.
    notes : dict
        Facts worth reporting: duplicates dropped, shared train/test
        duplicates, cleaned numeric cells, audit flags.
    preprocessor : Preprocessor or None
        What turned the raw feature columns into ``X_*`` (fitted on training
        rows only): a saved detector encodes new rows with it.
    """

    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    feature_names: list[str]
    class_names: list[str]
    task: str
    groups_train: np.ndarray | None = None
    types_train: np.ndarray | None = None
    types_test: np.ndarray | None = None
    sources_train: np.ndarray | None = None
    sources_test: np.ndarray | None = None
    scaler: StandardScaler = field(default_factory=StandardScaler)
    notes: dict = field(default_factory=dict)
    preprocessor: Preprocessor | None = None

    @property
    def n_features(self) -> int:
        """Number of feature columns."""
        return self.X_train.shape[1]

    @property
    def n_classes(self) -> int:
        """Number of classes (2 for the binary task)."""
        return len(self.class_names)

    def scaled(self) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(X_train, X_test)`` standardized with the training scaler."""
        return (
            self.scaler.transform(self.X_train).astype(np.float32),
            self.scaler.transform(self.X_test).astype(np.float32),
        )
