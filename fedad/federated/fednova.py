"""FedNova (Wang et al. 2020): each site's update normalized by its local steps, on the server."""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedad.federated.scaffold import require_sgd

# The reply metric that counts a site's optimizer steps this round (fedad.models.keras_models).
STEPS = "train_steps"


class FedNova(FedAvg):
    """FedNova on Flower's Message API: FedAvg's sampling and messages, a normalized server step.

    With the global model ``w``, site ``i``'s model ``w_i`` after ``τ_i``
    local SGD steps (its reply's ``train_steps``) and its share ``p_i`` of
    the round's examples, the server sets ``w' = w - τ_eff Σ p_i (w - w_i) / τ_i``
    with ``τ_eff = Σ p_i τ_i`` (:func:`aggregate`). FedAvg's mean weighs a
    site by its examples and, unseen, by its steps too: a site that takes
    more steps moves further and pulls the mean towards its own optimum
    (the paper's objective inconsistency). With equal ``τ_i`` the two are
    equal. Nothing changes at the sites; nothing is kept between rounds
    but the model, so a checkpoint needs no strategy state.

    Parameters
    ----------
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes, \
min_available_nodes, weighted_by_key, train_metrics_aggr_fn, evaluate_metrics_aggr_fn
        As Flower's :class:`~flwr.serverapp.strategy.FedAvg`.

    Attributes
    ----------
    sent : list[np.ndarray] or None
        ``w``, the model the round's train messages carry (None before the
        first :meth:`configure_train`).
    """

    sent: list[np.ndarray] | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's train messages; the model sent is kept, the ``w`` of the server step."""
        self.sent = arrays.to_numpy_ndarrays()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The normalized step from the good replies; their metrics as FedAvg's."""
        contents = [m.content for m in replies if not m.has_error()]
        if not contents or self.sent is None:
            return None, None
        metrics = [cast(MetricRecord, c["metrics"]) for c in contents]
        model = aggregate(
            self.sent,
            [cast(ArrayRecord, c["arrays"]).to_numpy_ndarrays() for c in contents],
            np.array([float(cast(float, m.get(STEPS, 0.0))) for m in metrics]),
            np.array([float(cast(float, m[self.weighted_by_key])) for m in metrics]),
        )
        return ArrayRecord(model), self.train_metrics_aggr_fn(contents, self.weighted_by_key)


def aggregate(
    model: list[np.ndarray],
    replies: list[list[np.ndarray]],
    steps: np.ndarray,
    weights: np.ndarray,
) -> list[np.ndarray]:
    """FedNova's server step: ``w - τ_eff Σ p_i (w - w_i) / τ_i``.

    Parameters
    ----------
    model : list[np.ndarray]
        ``w``, the model the round's sites received.
    replies : list of list[np.ndarray]
        Each replying site's model ``w_i``.
    steps : np.ndarray
        Each reply's ``τ_i``; a site that took no step (no rows) moved nothing
        and adds nothing, to the direction nor to ``τ_eff``.
    weights : np.ndarray
        Each reply's examples; ``p_i`` is its share (all zero: equal shares).

    Returns
    -------
    list[np.ndarray]
        The new global model in the arrays' own dtypes (computed in float64);
        ``w`` itself when no site took a step.
    """
    share = (
        weights / weights.sum() if weights.sum() > 0 else np.full(len(weights), 1 / len(weights))
    )
    effective = float(np.sum(share * steps))
    # p_i τ_eff / τ_i: each reply's coefficient on its own change w_i - w.
    scale = np.divide(share * effective, steps, out=np.zeros(len(steps)), where=steps > 0)
    new_model = []
    for i, w in enumerate(model):
        start = np.asarray(w, np.float64)
        step = sum(
            s * (np.asarray(y[i], np.float64) - start) for s, y in zip(scale, replies, strict=True)
        )
        new_model.append(np.asarray(start + step, dtype=w.dtype))
    return new_model


def check_config(strategy: str, optimizer: str, personalize: str, batch_norm: bool) -> list[str]:
    """What FedNova cannot run beside (empty for another strategy), one phrase each.

    A booster (:func:`fedad.federated.strategies.check_config`), central and
    client DP (:func:`fedad.federated.privacy.check_config`: FedNova's step is
    not FedAvg's mean) and SecAgg+ (:func:`fedad.federated.secagg.check_config`)
    are refused where those options are checked.

    Parameters
    ----------
    strategy, optimizer, personalize : str
        ``strategy.name``, ``train.optimizer`` and ``personalize.name``.
    batch_norm : bool
        ``model.batch_norm`` (the MLP's; False for a model without it).

    Returns
    -------
    list[str]
        One phrase per problem, naming the setting and the fix.
    """
    if strategy != "fednova":
        return []
    problems = [
        require_sgd(
            strategy,
            optimizer,
            "FedNova divides each site's change by its step count, which makes it the site's "
            "mean gradient times the learning rate only when every step is a plain SGD step; "
            f"{optimizer} scales each step by its own running statistics, so the normalized "
            "changes are not comparable across sites",
        )
    ]
    if personalize == "fedrep":
        problems.append(
            "personalize=fedrep replies the body only and counts the head's epochs in "
            "train_steps, though the body stays frozen during them, so strategy=fednova would "
            "divide the body's change by steps that never moved it; use personalize=fedper, "
            "ditto or finetune with fednova, or another strategy with fedrep"
        )
    if batch_norm:
        problems.append(
            "model.batch_norm=true adds batch normalization's moving statistics to the arrays, "
            "which are running means, not gradient steps, and travel as numbered arrays the "
            "server cannot tell from the weights, so strategy=fednova would normalize them as "
            "steps; use model.batch_norm=false with fednova, or strategy=fedavg"
        )
    return [p for p in problems if p]
