"""Federated XGBoost: each site boosts on its shard from the global trees and sends its own."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import cast

import numpy as np
import xgboost as xgb

from fedad import rundir
from fedad.config import section
from fedad.federated.families.base import Family, RunScorer
from fedad.federated.histogram import pinning, session
from fedad.federated.task import Site
from fedad.models import booster

# Strategies whose sites send only their new trees (the server appends them); under
# FedXgbCyclic the site's whole model becomes the next global one.
BAGGING = ("fedxgb_bagging",)


class BoosterFamily(Family):
    """XGBoost boosters: the model travels as its JSON bytes in a single uint8 array."""

    def initial_arrays(self) -> list[np.ndarray]:
        """No tree yet: an empty model (the sites start from the base score)."""
        return [booster.as_array(b"")]

    def fit(
        self, arrays: list[np.ndarray], site: Site, config: Mapping, seed: int
    ) -> tuple[list[np.ndarray], dict[str, float]]:
        """Boost ``model.local_rounds`` iterations on the site's rows from the global model.

        In a histogram session (``strategy=fedxgb_histogram``) with the other
        sampled sites (:meth:`_fit_histogram`); else alone.
        """
        model_cfg = section(self.settings, "model")
        rounds = int(model_cfg.get("local_rounds", 1))
        threads = int(self.settings.get("client-threads", 1))
        params = booster.params(model_cfg, len(self.class_names), seed, threads)
        if session.joins(config):
            # One seed for the whole session: every site must run the same parameters.
            params["seed"] = int(self.settings["seed"])
            return self._fit_histogram(arrays, site, config, params, rounds)
        trained = booster.train(
            booster.from_array(arrays[0]),
            site.X_train,
            site.y_train,
            params,
            rounds,
            class_weights=bool(model_cfg.get("class_weights", True)),
        )
        bagging = str(self.settings.get("strategy.name")) in BAGGING
        sent = booster.last_rounds(trained, rounds) if bagging else booster.to_bytes(trained)
        return [booster.as_array(sent)], self._train_metrics(trained, site)

    def _fit_histogram(
        self, arrays: list[np.ndarray], site: Site, config: Mapping, params: dict, rounds: int
    ) -> tuple[list[np.ndarray], dict[str, float]]:
        """Boost in the session the config names: every site grows the same trees.

        Class weights come from the sampled sites' pooled class counts (the
        config's), the same at every site. Every site replies with the booster
        (the server checks they agree); rank 0 adds the bin edges.
        """
        weight = None
        if bool(section(self.settings, "model").get("class_weights", True)) and len(site.y_train):
            counts = [int(c) for c in cast(list, config[session.COUNTS])]
            extra, weight = booster.weighting(site.y_train, counts, params["objective"])
            params = {**params, **extra}
        raw, cuts = session.run(
            site.X_train,
            site.y_train,
            weight,
            booster.from_array(arrays[0]),
            params,
            rounds,
            {
                "address": config[session.ADDRESS],
                "world": int(config[session.WORLD]),
                "rank": int(config[session.RANK]),
            },
            float(config[session.DEADLINE]),
        )
        reply = [booster.as_array(raw)]
        if cuts is not None:
            reply += [np.asarray(cuts[0], dtype=np.int64), np.asarray(cuts[1], dtype=np.float32)]
        start, depth = booster.from_array(arrays[0]), int(params["max_depth"])
        built = pinning.histograms_built(raw, depth)
        built -= pinning.histograms_built(start, depth) if start else 0
        metrics = {**self._train_metrics(booster.load(raw), site), session.HISTOGRAMS: built}
        return reply, metrics

    def _train_metrics(self, trained: xgb.Booster, site: Site) -> dict[str, float]:
        """The site's training loss under ``trained``, its trees and its examples."""
        probabilities = booster.probabilities(trained, site.X_train, len(self.class_names))
        rows = np.arange(len(site.y_train))
        loss = float(-np.mean(np.log(np.clip(probabilities[rows, site.y_train], 1e-7, 1.0))))
        return {
            "train_loss": loss,
            "train_trees": float(trained.num_boosted_rounds()),
            "num-examples": len(site.y_train),
        }

    def scores(self, arrays: list[np.ndarray], X: np.ndarray) -> np.ndarray:
        """Class probabilities of the global booster."""
        raw = booster.from_array(arrays[0])
        model = booster.load(raw) if raw else None
        if model is None:
            return np.full((len(X), len(self.class_names)), 1.0 / len(self.class_names))
        return booster.probabilities(model, X, len(self.class_names))

    def save(self, arrays: list[np.ndarray], run_dir: Path) -> Path:
        """Write the global booster as XGBoost's JSON model."""
        path = Path(run_dir) / rundir.BOOSTER_FILE
        with rundir.atomic(path) as f:
            f.write(booster.from_array(arrays[0]))
        return path


class BoosterScorer(RunScorer):
    """The saved global booster of a run."""

    detector_kind = "booster"

    def __init__(self, run_dir: Path, n_classes: int) -> None:
        self.path = Path(run_dir) / rundir.BOOSTER_FILE
        self.model = booster.load(self.path.read_bytes())
        self.n_classes = n_classes
        self.load_threshold(run_dir)

    def predict_scores(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities."""
        return booster.probabilities(self.model, X, self.n_classes)
