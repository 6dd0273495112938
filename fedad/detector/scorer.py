"""A loaded detector: raw feature columns in, scores (probabilities or an anomaly score) out."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
from sklearn.preprocessing import StandardScaler

from fedad import rundir
from fedad.data.labels import classify
from fedad.data.preprocess import preprocessor_from_dict
from fedad.data.scaling import standardize
from fedad.detector.adapters import ADAPTERS, ANOMALY_SCORE
from fedad.detector.artifact import read_manifest
from fedad.errors import FedadError
from fedad.evaluation.decision import decide

# How the model's inputs were standardized: with the training rows' StandardScaler
# (centralized models) or the sites' pooled statistics (federated ones).
TRAIN_ROWS, POOLED_SITES = "train_rows", "pooled_sites"
# The decision rules: the most probable class (a classifier's default), and the anomaly
# score's threshold its run chose (an anomaly detector's default and only rule).
ARGMAX_RULE, THRESHOLD_RULE = "argmax", "threshold"


@dataclass
class Scored:
    """What a detector said about a batch of rows.

    Attributes
    ----------
    scores : np.ndarray
        Class probabilities, ``(n, n_classes)``, class 0 = normal; for an
        anomaly detector its score, ``(n,)`` (the same as ``attack_score``).
    attack_score : np.ndarray
        ``1 - p(normal)`` per row, or the anomaly score (the autoencoder's
        reconstruction error); a threshold rule flags rows where it reaches
        the threshold.
    predicted : np.ndarray
        Class codes under the rule used.
    unseen : dict[str, int]
        Cells per categorical column holding a category never seen in training.
    """

    scores: np.ndarray
    attack_score: np.ndarray
    predicted: np.ndarray
    unseen: dict[str, int]


class Detector:
    """A detector folder, loaded: preprocessing, standardization, model and decision rules.

    Use :meth:`load`; the folder is checked (format version, files, checksums)
    before anything in it is read.
    """

    def __init__(self, folder: Path, manifest: dict) -> None:
        self.folder = folder
        self.manifest = manifest
        self.preprocessor = preprocessor_from_dict(
            rundir.read_json(folder / rundir.DETECTOR_PREPROCESSING)
        )
        with np.load(folder / rundir.DETECTOR_SCALING) as stats:
            self.mean, self.std = stats["mean"], stats["std"]
        # The run's own transform, so scores match the ones it recorded to the last bit.
        self.scaler = StandardScaler()
        self.scaler.mean_, self.scaler.scale_, self.scaler.var_ = self.mean, self.std, self.std**2
        self.scaler.n_features_in_ = len(self.mean)
        model = manifest["model"]
        adapter = ADAPTERS[model["kind"]]
        self.predict_model = adapter.load(folder / model["file"])
        self.anomaly = adapter.output == ANOMALY_SCORE
        self.columns = np.asarray(model["classes"], dtype=np.int64)
        # The preprocessor counts unseen categories as it goes: one batch at a time.
        self._lock = threading.Lock()

    @classmethod
    def load(cls, folder: str | Path) -> Detector:
        """Check and load the detector in ``folder`` (FedadError when it cannot be used)."""
        folder = Path(folder)
        return cls(folder, read_manifest(folder))

    @property
    def name(self) -> str:
        """The model's name in its run, e.g. ``federated_cnn``."""
        return self.manifest["model"]["name"]

    @property
    def class_names(self) -> list[str]:
        """Class code to name; code 0 is normal traffic."""
        return list(self.manifest["class_names"])

    @property
    def features(self) -> list[str]:
        """The raw columns the detector needs, numeric ones first."""
        return [*self.preprocessor.numeric, *self.preprocessor.categorical]

    @property
    def categories(self) -> dict[str, list[str]]:
        """Each categorical column's training vocabulary (other values score as unseen)."""
        encoder = self.preprocessor.encoder
        return {
            col: [str(c) for c in cats]
            for col, cats in zip(self.preprocessor.categorical, encoder.categories_, strict=True)
        }

    @property
    def rules(self) -> dict[str, dict]:
        """Decision rules by name.

        A classifier has ``argmax``, and ``target_fpr`` when one was chosen; an
        anomaly detector has ``threshold``.
        """
        return self.manifest["decision"]["rules"]

    @property
    def default_rule(self) -> str:
        """The rule used when none is named (``argmax``, or ``threshold`` for an anomaly score)."""
        return self.manifest["decision"]["default"]

    def check_rule(self, rule: str | None) -> float | None:
        """The attack-score threshold of ``rule`` (None for argmax); FedadError if it has none.

        ``None`` stands for :attr:`default_rule`.
        """
        rule = rule or self.default_rule
        if rule not in self.rules:
            raise FedadError(
                f"The detector {self.name} has no decision rule '{rule}'; it has: "
                f"{', '.join(self.rules)}. ({self.rules_note()})"
            )
        return self.rules[rule].get("threshold")

    def threshold_used(self, rule: str | None) -> float | None:
        """The attack-score threshold of ``rule`` (argmax: 0.5 for two classes, else None)."""
        threshold = self.check_rule(rule)
        if threshold is None and len(self.class_names) == 2:
            return 0.5  # argmax of two probabilities: attack when its score passes 0.5
        return threshold

    def rules_note(self) -> str:
        """Why a rule may be missing: what the manifest says of the target-FPR threshold."""
        return self.manifest["decision"].get("note", "")

    def score(self, frame: pd.DataFrame, rule: str | None = None) -> Scored:
        """Score raw rows: encode, standardize, run the model once per batch, decide.

        Parameters
        ----------
        frame : pd.DataFrame
            Holds every column of :attr:`features` (numeric ones already checked).
        rule : str, optional
            A rule of :attr:`rules`; default :attr:`default_rule`.

        Returns
        -------
        Scored
        """
        threshold = self.check_rule(rule)
        with self._lock:
            before = dict(self.preprocessor.unseen)
            X = self.preprocessor.transform(frame)
            unseen = {
                col: n - before.get(col, 0)
                for col, n in self.preprocessor.unseen.items()
                if n > before.get(col, 0)
            }
        X = self.standardize(X)
        if self.anomaly:
            attack = np.asarray(self.predict_model(X), dtype=np.float64)
            # An anomaly detector's rules all have a threshold (no argmax rule).
            return Scored(attack, attack, decide(attack, cast(float, threshold)), unseen)
        full = np.zeros((len(X), len(self.class_names)), dtype=np.float64)
        full[:, self.columns] = self.predict_model(X)
        # The decision of the run's comparison: argmax, or attack from the threshold on and
        # then the most probable attack class.
        return Scored(full, 1.0 - full[:, 0], decide(full, threshold), unseen)

    def table(self, scored: Scored, rule: str | None = None) -> pd.DataFrame:
        """One output row per scored row: probabilities, attack score, class, rule, threshold.

        An anomaly detector has no probabilities: its attack score is its anomaly score.
        """
        rule = rule or self.default_rule
        threshold = self.threshold_used(rule)
        columns: dict[str, Any] = {
            f"p_{name}": scored.scores[:, i]
            for i, name in enumerate(self.class_names)
            if not self.anomaly
        }
        columns["attack_score"] = scored.attack_score
        columns["predicted"] = np.asarray(self.class_names, dtype=object)[scored.predicted]
        columns["rule"] = rule
        columns["threshold"] = np.nan if threshold is None else threshold
        return pd.DataFrame(columns)

    def true_classes(self, frame: pd.DataFrame) -> np.ndarray | None:
        """Class codes of labelled rows (-1 where the label is empty or an unknown class).

        None when ``frame`` lacks the label column (or, multiclass, the class column).
        """
        labels = self.manifest["labels"]
        needed = [labels["label_column"]]
        if labels["task"] != "binary":
            needed.append(labels.get("class_column") or labels["label_column"])
        if any(col not in frame.columns for col in needed):
            return None
        empty = frame[needed].isna().any(axis=1).to_numpy()
        _, classes, _ = classify(frame, labels, labels["task"])
        codes = pd.Index(self.class_names).get_indexer(classes)
        codes[empty] = -1
        return codes

    def standardize(self, X: np.ndarray) -> np.ndarray:
        """Standardize encoded rows as the model was trained to expect (``float32``)."""
        if self.manifest["scaling"]["rule"] == POOLED_SITES:
            return standardize(X, self.mean, self.std)
        return self.scaler.transform(X).astype(np.float32, copy=False)
