"""A loaded detector: raw feature columns in, scores (probabilities or an anomaly score) out."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
from sklearn.preprocessing import StandardScaler

from fedad import rundir
from fedad.data.labels import classify
from fedad.data.scaling import standardize
from fedad.detector.adapters import ADAPTERS, ANOMALY_SCORE, trusted_by_environment
from fedad.detector.artifact import read_file, read_manifest
from fedad.detector.contents import PROBE_ROWS, check_model, read_preprocessing, read_scaling
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
    too_large : dict[str, int]
        Cells per numeric column too large for ``float32`` (after the log
        transform), scored as the training median, as the run's preparation does.
    beyond_training : dict[str, int]
        Cells per numeric column outside the training range (see
        :attr:`Detector.training_reach`), scored as they are.
    """

    scores: np.ndarray
    attack_score: np.ndarray
    predicted: np.ndarray
    unseen: dict[str, int]
    too_large: dict[str, int] = field(default_factory=dict)
    beyond_training: dict[str, int] = field(default_factory=dict)


@dataclass
class Truth:
    """What the label cells of a batch say, checked against the detector's label vocabulary.

    Attributes
    ----------
    codes : np.ndarray
        Class code per row; -1 where the label is empty or (multiclass) names
        a class the detector lacks.
    known : int
        Labelled rows whose label the detector knows.
    unknown : dict[str, int]
        Label values the detector does not know, with their row counts.
    checked : bool
        False for a binary detector whose attacks have no recorded names (a
        text normal value without ``class_map``): then only the normal value
        is known, and ``unknown`` holds every other value.
    """

    codes: np.ndarray
    known: int
    unknown: dict[str, int]
    checked: bool


class Detector:
    """A detector folder, loaded: preprocessing, standardization, model and decision rules.

    Use :meth:`load`; the folder is checked (format version, files, checksums)
    before anything in it is read.
    """

    def __init__(self, folder: Path, manifest: dict, trust_custom_code: bool = False) -> None:
        self.folder = folder
        self.manifest = manifest
        self.trust_custom_code = trust_custom_code
        # Each file is read once, checked against its checksum, and loaded from those bytes.
        self.preprocessor = read_preprocessing(
            read_file(folder, manifest, rundir.DETECTOR_PREPROCESSING),
            manifest,
            folder / rundir.DETECTOR_PREPROCESSING,
        )
        self.mean, self.std = read_scaling(
            read_file(folder, manifest, rundir.DETECTOR_SCALING),
            manifest,
            folder / rundir.DETECTOR_SCALING,
        )
        if manifest["scaling"]["rule"] not in (TRAIN_ROWS, POOLED_SITES):
            raise FedadError(
                f"The manifest of {folder} gives scaling.rule '{manifest['scaling']['rule']}'; "
                f"fedad knows {TRAIN_ROWS} and {POOLED_SITES}. The folder is damaged or was not "
                "written by fedad; write it again with python -m fedad.simulate."
            )
        # The run's own transform, so scores match the ones it recorded to the last bit.
        self.scaler = StandardScaler()
        self.scaler.mean_, self.scaler.scale_, self.scaler.var_ = self.mean, self.std, self.std**2
        self.scaler.n_features_in_ = len(self.mean)
        model = manifest["model"]
        adapter = ADAPTERS[model["kind"]]
        path = folder / model["file"]
        self.predict_model = adapter.load(
            path, read_file(folder, manifest, model["file"]), trust_custom_code
        )
        probe = np.zeros((PROBE_ROWS, len(self.mean)), dtype=np.float32)
        check_model(self.predict_model, self.standardize(probe), manifest, path)
        self.anomaly = adapter.output == ANOMALY_SCORE
        self.columns = np.asarray(model["classes"], dtype=np.int64)
        # The preprocessor counts unseen categories as it goes: one batch at a time.
        self._lock = threading.Lock()

    @classmethod
    def load(cls, folder: str | Path, trust_custom_code: bool | None = None) -> Detector:
        """Check and load the detector in ``folder`` (FedadError when it cannot be used).

        Every file is checked (format version, manifest entries, names inside
        the folder, checksums) before it is loaded, and nothing in the folder is
        unpickled or run; see docs/detector.md.

        Parameters
        ----------
        folder : str or Path
            A ``detector/<model>`` folder.
        trust_custom_code : bool, optional
            Load a Keras model whose layers carry Python code (a ``Lambda``
            layer, custom layers registered by your code), which would run. Only
            for a model whose code you trust. Default: the environment variable
            ``FEDAD_TRUST_CUSTOM_CODE=1``, else off.

        Returns
        -------
        Detector
        """
        folder = Path(folder)
        trust = trusted_by_environment() if trust_custom_code is None else trust_custom_code
        return cls(folder, read_manifest(folder), trust)

    @property
    def name(self) -> str:
        """The model's name in its run, e.g. ``federated_cnn``."""
        return self.manifest["model"]["name"]

    @property
    def files(self) -> list[Path]:
        """The files of the detector's folder: its manifest and each file it lists."""
        names = [rundir.DETECTOR_MANIFEST, *self.manifest["files"]]
        return [self.folder / name for name in names]

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
        pre = self.preprocessor
        with self._lock:
            unseen, large = dict(pre.unseen), dict(pre.out_of_range)
            X = pre.transform(frame)
            unseen = {
                c: n - unseen.get(c, 0) for c, n in pre.unseen.items() if n > unseen.get(c, 0)
            }
            large = {
                c: n - large.get(c, 0) for c, n in pre.out_of_range.items() if n > large.get(c, 0)
            }
        return self.score_encoded(X, threshold, unseen, large)

    def score_encoded(
        self,
        X: np.ndarray,
        threshold: float | None,
        unseen: dict[str, int],
        too_large: dict[str, int],
    ) -> Scored:
        """Score encoded rows (the preprocessing's output): standardize, run the model, decide.

        Parameters
        ----------
        X : np.ndarray
            Encoded rows, as :attr:`preprocessor` makes them.
        threshold : float or None
            The rule's threshold (:meth:`check_rule`).
        unseen, too_large : dict[str, int]
            The encoding's counts per column (see :class:`Scored`).

        Returns
        -------
        Scored
        """
        X = self.standardize(X)
        far = (np.abs(X[:, : len(self.preprocessor.numeric)]) > self.training_reach).sum(axis=0)
        numeric = self.preprocessor.numeric
        facts = {
            "unseen": unseen,
            "too_large": too_large,
            "beyond_training": {c: int(n) for c, n in zip(numeric, far, strict=True) if n},
        }
        if self.anomaly:
            attack = np.asarray(self.predict_model(X), dtype=np.float64)
            # An anomaly detector's rules all have a threshold (no argmax rule).
            return Scored(attack, attack, decide(attack, cast(float, threshold)), **facts)
        full = np.zeros((len(X), len(self.class_names)), dtype=np.float64)
        full[:, self.columns] = self.predict_model(X)
        # The decision of the run's comparison: argmax, or attack from the threshold on and
        # then the most probable attack class.
        return Scored(full, 1.0 - full[:, 0], decide(full, threshold), **facts)

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

    @property
    def training_reach(self) -> float:
        """How far, in standard deviations, a standardized value may lie from the training mean.

        No value of ``n`` training rows lies farther than ``sqrt(n - 1)``
        population standard deviations from their mean (Samuelson's
        inequality), so a value beyond that lies outside the range of the
        training rows, whatever their distribution.
        """
        return math.sqrt(max(int(self.manifest["data"]["n_train"]) - 1, 1))

    def true_classes(self, frame: pd.DataFrame) -> Truth | None:
        """The labels of ``frame`` as class codes, checked against the detector's vocabulary.

        Known labels: the normal value; for a multiclass detector its class
        names (after ``class_map``); for a binary one any number when the
        normal value is a number (a 0/1 flag), else the names of
        ``class_map``. A binary detector counts every other label as an
        attack, as its run did; a multiclass one leaves unknown classes out.
        None when ``frame`` lacks the label column (or, multiclass, the class
        column).
        """
        labels = self.manifest["labels"]
        label = labels["label_column"]
        column = label if labels["task"] == "binary" else labels.get("class_column") or label
        if label not in frame.columns or column not in frame.columns:
            return None
        cells = frame[list(dict.fromkeys([label, column]))]
        empty = (cells.isna() | (cells.astype(str).apply(lambda s: s.str.strip()) == "")).any(
            axis=1
        )
        empty = empty.to_numpy()
        attack, classes, _ = classify(frame, labels, labels["task"])
        codes = pd.Index(self.class_names).get_indexer(classes)
        values = frame[column].astype(str).str.strip()
        checked = True
        if labels["task"] != "binary":
            known = codes >= 0
        elif _is_number(labels["normal_value"]):
            known = (attack == 0) | pd.to_numeric(values, errors="coerce").notna().to_numpy()
        elif labels.get("class_map"):
            fold = labels.get("label_case") == "insensitive"
            names = {str(n).strip() for pair in labels["class_map"].items() for n in pair}
            vocabulary = {n.casefold() for n in names} if fold else names
            known = (attack == 0) | (values.str.casefold() if fold else values).isin(vocabulary)
        else:
            known, checked = attack == 0, False
        known = np.asarray(known) & ~empty
        codes[empty] = -1
        counts = values[~known & ~empty].value_counts()
        unknown = {str(v): int(n) for v, n in counts.items()}
        return Truth(codes, int(known.sum()), unknown, checked)

    def standardize(self, X: np.ndarray) -> np.ndarray:
        """Standardize encoded rows as the model was trained to expect (``float32``)."""
        if self.manifest["scaling"]["rule"] == POOLED_SITES:
            return standardize(X, self.mean, self.std)
        return self.scaler.transform(X).astype(np.float32, copy=False)


def _is_number(value: object) -> bool:
    return bool(pd.notna(pd.to_numeric(pd.Series([str(value).strip()]), errors="coerce")[0]))
