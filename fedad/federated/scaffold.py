"""SCAFFOLD's control variates (Karimireddy et al. 2020, option II): the server's and a site's."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

# The control variates' ArrayRecord: the server's c in a train message, a site's change of
# c_i in its reply, and c_i itself in the site's state between rounds (checkpointed on the
# site's disk with the rest of its state: fedad.federated.site_state).
CONTROL = "control"


class Scaffold(FedAvg):
    """SCAFFOLD on Flower's Message API: FedAvg's sampling, a second ArrayRecord each way.

    Each train message carries the global model ``x`` (``arrays``) and the
    server's control variate ``c`` (:data:`CONTROL`); each site trains with
    its gradient corrected by ``c - c_i`` and replies its model ``y_i`` and
    ``Δc_i`` (:class:`SiteControl`). The server then sets
    ``x += server_learning_rate * (ȳ - x)``, where ``ȳ`` is the replies'
    mean weighted by their examples (as FedAvg's; the paper's uniform mean
    when the sites are of one size), and ``c += Σ Δc_i / N`` over the ``N``
    sites of the run (the paper's ``|S|/N`` times the replies' mean), which
    keeps ``c`` the mean of every site's ``c_i``. Flower's FedAvg would
    refuse replies with two ArrayRecords, and average same-named arrays of
    both: :meth:`aggregate_train` keeps them apart. ``c`` is strategy state,
    saved with each checkpoint (:data:`fedad.federated.checkpoint.STATE_ATTRIBUTES`).

    Parameters
    ----------
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes, \
min_available_nodes, weighted_by_key, train_metrics_aggr_fn, evaluate_metrics_aggr_fn
        As Flower's :class:`~flwr.serverapp.strategy.FedAvg`.
    server_learning_rate : float
        The global step ``η_g`` (1: the replies' mean becomes the global model).
    """

    def __init__(
        self,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = "num-examples",
        train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        server_learning_rate: float = 1.0,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        self.server_learning_rate = server_learning_rate
        # The server's control variate c (None until the first round: zeros like the model).
        self.control: list[np.ndarray] | None = None
        self._model: list[np.ndarray] = []
        self._sites = 0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's train messages, each with the server's control variate beside the model."""
        self._model = arrays.to_numpy_ndarrays()
        self._sites = len(list(grid.get_node_ids()))
        if self.control is None:
            self.control = [np.zeros_like(a) for a in self._model]
        messages = list(super().configure_train(server_round, arrays, config, grid))
        control = ArrayRecord(self.control)
        for message in messages:
            # FedAvg's messages share one RecordDict: give each its own, with c added.
            message.content = RecordDict({**message.content, CONTROL: control})
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Step the global model and the server's control variate from the good replies."""
        contents = [m.content for m in replies if not m.has_error()]
        if not contents or self.control is None:
            return None, None
        models = [RecordDict({"arrays": c["arrays"], "metrics": c["metrics"]}) for c in contents]
        weights = np.array([float(cast(float, c["metrics"][self.weighted_by_key])) for c in models])
        model, self.control = aggregate(
            self._model,
            self.control,
            [cast(ArrayRecord, c["arrays"]).to_numpy_ndarrays() for c in contents],
            [cast(ArrayRecord, c[CONTROL]).to_numpy_ndarrays() for c in contents],
            weights,
            max(self._sites, len(contents)),
            self.server_learning_rate,
        )
        return ArrayRecord(model), self.train_metrics_aggr_fn(models, self.weighted_by_key)


def aggregate(
    model: list[np.ndarray],
    control: list[np.ndarray],
    replies: list[list[np.ndarray]],
    changes: list[list[np.ndarray]],
    weights: np.ndarray,
    num_sites: int,
    server_learning_rate: float,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """SCAFFOLD's server step: the new global model ``x`` and control variate ``c``.

    Parameters
    ----------
    model, control : list[np.ndarray]
        ``x`` and ``c`` the round's sites received.
    replies, changes : list of list[np.ndarray]
        Each replying site's model ``y_i`` and ``Δc_i``.
    weights : np.ndarray
        Each reply's examples (all zero: equal weights).
    num_sites : int
        ``N``, the run's sites.
    server_learning_rate : float
        ``η_g``.

    Returns
    -------
    tuple
        ``x + η_g (ȳ - x)`` and ``c + Σ Δc_i / N``, in the arrays' own dtypes
        (computed in float64).
    """
    share = (
        weights / weights.sum() if weights.sum() > 0 else np.full(len(weights), 1 / len(weights))
    )
    new_model = []
    for i, x in enumerate(model):
        mean = sum(w * np.asarray(y[i], np.float64) for w, y in zip(share, replies, strict=True))
        step = x + server_learning_rate * (mean - np.asarray(x, np.float64))
        new_model.append(np.asarray(step, dtype=x.dtype))
    new_control = [
        np.asarray(c + sum(np.asarray(d[i], np.float64) for d in changes) / num_sites, c.dtype)
        for i, c in enumerate(control)
    ]
    return new_model, new_control


class SiteControl:
    """A site's side of SCAFFOLD in one train message (nothing when the message has no ``c``).

    Before training, :meth:`correction` is ``c - c_i``, which the family adds to
    every gradient (``c_i`` from the site's state, zero at first). After it,
    :meth:`reply` sets ``c_i+ = c_i - c + (x - y_i) / (K lr)`` (option II: ``K``
    the steps behind ``y_i``, ``lr`` the local learning rate) in the state
    and returns ``Δc_i = c_i+ - c_i`` for the reply.

    This is the paper's update with plain SGD, the only optimizer SCAFFOLD
    accepts (:func:`check_config`): under Adam ``(x - y_i) / (K lr)`` would be
    Adam's mean step over ``lr``, not the mean gradient.

    Parameters
    ----------
    content : RecordDict
        The train message's content.
    state : RecordDict
        The site's state between rounds (Flower's ``context.state``).
    """

    def __init__(self, content: RecordDict, state: RecordDict) -> None:
        record = content.array_records.get(CONTROL)
        self.server = record.to_numpy_ndarrays() if record is not None else None
        self.state = state

    def _site(self) -> list[np.ndarray]:
        if CONTROL in self.state.array_records:
            return cast(ArrayRecord, self.state[CONTROL]).to_numpy_ndarrays()
        return [np.zeros_like(c) for c in self.server or []]

    def correction(self) -> list[np.ndarray] | None:
        """``c - c_i`` for each trainable array; None outside SCAFFOLD."""
        if self.server is None:
            return None
        return [c - c_i for c, c_i in zip(self.server, self._site(), strict=True)]

    def reply(
        self,
        received: list[np.ndarray],
        trained: list[np.ndarray],
        metrics: Mapping[str, float],
        learning_rate: float,
    ) -> dict[str, ArrayRecord]:
        """Keep ``c_i+`` in the state; return the reply's ``{CONTROL: Δc_i}`` (empty outside).

        ``metrics["train_steps"]`` is ``K``; a site that took no step (no
        rows to train on) keeps its ``c_i`` and replies a zero change.
        """
        if self.server is None:
            return {}
        site = self._site()
        steps = float(metrics.get("train_steps", 0.0))
        if steps > 0:
            scale = 1.0 / (steps * learning_rate)
            new = [
                (c_i - c + scale * (np.asarray(x, np.float64) - y)).astype(c_i.dtype)
                for c_i, c, x, y in zip(site, self.server, received, trained, strict=True)
            ]
        else:
            new = site
        self.state[CONTROL] = ArrayRecord(new)
        return {CONTROL: ArrayRecord([n - c_i for n, c_i in zip(new, site, strict=True)])}


def check_config(strategy: str, privacy: str, optimizer: str) -> list[str]:
    """What SCAFFOLD cannot run beside (empty for another strategy), one phrase each.

    A booster with a strategy of weights: :func:`fedad.federated.strategies.check_config`.
    """
    if strategy != "scaffold":
        return []
    # Measured on the synthetic default: with Adam the run's loss rose from round 2 and
    # early stopping kept round 1 (macro-F1 0.79); with SGD at 0.05 it kept round 20 (0.93).
    problem = require_sgd(
        strategy,
        optimizer,
        "a site's control variate estimates its mean gradient from its SGD steps "
        f"((x - y_i) / (K lr)); {optimizer} scales every step by its own statistics, so that "
        "estimate, and the correction added to every gradient, is off by orders of magnitude "
        "and training diverges",
    )
    problems = [problem] if problem else []
    if privacy != "none":
        problems.append(
            f"strategy=scaffold sends its control variates as a second ArrayRecord beside the "
            f"model, and privacy={privacy} (Flower's DP wrappers and mods) clips and noises every "
            "ArrayRecord of a message as if it were the model, which would corrupt the control "
            "variates; use privacy=none with scaffold, or another strategy with privacy"
        )
    return problems


def require_sgd(strategy: str, optimizer: str, why: str) -> str | None:
    """The refusal of any optimizer but plain SGD by a strategy whose server step assumes it.

    Parameters
    ----------
    strategy, optimizer : str
        ``strategy.name`` and ``train.optimizer``.
    why : str
        What the strategy computes from the sites' SGD steps, and how the
        optimizer breaks it.

    Returns
    -------
    str or None
        One phrase naming the setting and the fix; None under SGD.
    """
    if optimizer == "sgd":
        return None
    return (
        f"strategy={strategy} needs train.optimizer=sgd, got {optimizer}: {why}; add "
        "train.optimizer=sgd (with a larger rate than Adam's, e.g. train.learning_rate=0.05)"
    )
