"""Personal models at a site (fine-tuning, Ditto) and the final scoring of every personal model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from fedad.config import Settings
from fedad.federated.families.base import Family
from fedad.federated.personalize.heads import own_model, restore
from fedad.federated.personalize.options import PREFIX, method
from fedad.federated.task import Site, balanced_weights

# Keys of Ditto's personal model and of its optimizer in the site's state (context.state), which
# fedad.federated.site_state checkpoints with the rest of it.
PERSONAL_STATE, PERSONAL_OPTIMIZER = "personal", "personal-optimizer"
# Seed streams, so a personal model's row order and dropout differ from the global update's.
DITTO_STREAM, FINETUNE_STREAM = 1, 2


def after_train(
    family: Family,
    received: list[np.ndarray],
    site: Site,
    settings: Settings,
    partition_id: int,
    server_round: int,
) -> None:
    """Under Ditto, train the site's personal model for this round; nothing otherwise.

    The personal model starts from its own weights (the global model of the
    site's first round, before any), is pulled towards the ``received`` global
    model with strength ``personalize.lambda`` for ``personalize.epochs``, and
    stays in ``site.state`` with its optimizer's state (under
    ``train.keep_optimizer``), which the site checkpoints after the round.
    Nothing of it goes into the reply.
    """
    if method(settings) != "ditto":
        return
    state = site.state
    start = (
        cast(ArrayRecord, state[PERSONAL_STATE]).to_numpy_ndarrays()
        if PERSONAL_STATE in state
        else received
    )
    seed = seed_for(settings, DITTO_STREAM, server_round, partition_id)
    keep = bool(settings["train.keep_optimizer"])
    state[PERSONAL_STATE] = ArrayRecord(
        _train(family, start, received, site, settings, "lambda", seed, state if keep else None)
    )


def final_metrics(
    family: Family,
    received: list[np.ndarray],
    site: Site,
    config: Mapping,
    settings: Settings,
    partition_id: int,
) -> dict[str, Any]:
    """The personal model's metrics on the site's own test slice, in the final evaluation only.

    ``finetune``: the ``received`` (kept) global model fine-tuned on the
    site's training rows for ``personalize.epochs`` with a fresh optimizer;
    ``ditto``: the personal model in ``site.state``; ``fedper`` and
    ``fedrep``: the received body with the site's head from ``site.state``
    (both from the site's own disk when a resumed run's site has not trained
    since; the received model where the site never trained). The keys are
    the global model's, prefixed :data:`PREFIX`; only these numbers leave
    the site.
    """
    name = method(settings)
    if name == "none" or not config.get("final", False):
        return {}
    if name == "finetune":
        seed = seed_for(settings, FINETUNE_STREAM, 0, partition_id)
        personal = _train(family, received, None, site, settings, None, seed, None)
    else:
        # A resumed run's site that has not trained since reads its state from its disk.
        restore(site.state, config, settings, partition_id)
        personal = own_model(received, site.state, settings)
        if PERSONAL_STATE in site.state:
            personal = cast(ArrayRecord, site.state[PERSONAL_STATE]).to_numpy_ndarrays()
    metrics = family.metrics(personal, site.X_test, site.y_test, config)
    return {f"{PREFIX}{key}": value for key, value in metrics.items()}


def _train(
    family: Family,
    start: list[np.ndarray],
    anchor: list[np.ndarray] | None,
    site: Site,
    settings: Settings,
    strength: str | None,
    seed: int,
    state: RecordDict | None,
) -> list[np.ndarray]:
    """Train a personal copy from ``start`` (towards ``anchor`` by ``personalize.<strength>``).

    ``state`` holds the personal optimizer under :data:`PERSONAL_OPTIMIZER`
    (None: a fresh optimizer). The site's global optimizer state is left as it was.
    """
    # Imported here: TensorFlow takes seconds, which a run without personalization never needs.
    from fedad.federated.families.classifier import OPTIMIZER_STATE, local_model, train_local

    holder = RecordDict()
    if state is not None and PERSONAL_OPTIMIZER in state:
        holder[OPTIMIZER_STATE] = state[PERSONAL_OPTIMIZER]
    model = local_model(family.settings)
    y = site.y_train
    train_local(
        model,
        start,
        site.X_train,
        y,
        {**settings, "train.local_epochs": int(settings["personalize.epochs"])},
        mu=float(settings[f"personalize.{strength}"]) if strength else 0.0,
        seed=seed,
        validation=(site.X_val, site.y_val),
        sample_weight=balanced_weights(y) if settings["train.class_weights"] else None,
        state=holder if state is not None else None,
        anchor=anchor,
    )
    if state is not None:
        state[PERSONAL_OPTIMIZER] = holder[OPTIMIZER_STATE]
    return model.get_weights()


def seed_for(settings: Settings, stream: int, server_round: int, partition_id: int) -> int:
    """A personal model's training seed: the run's, apart from every global update's.

    ``stream`` is :data:`DITTO_STREAM` (with the round) or :data:`FINETUNE_STREAM`
    (round 0: once, in the final evaluation).
    """
    entropy = [int(settings["seed"]), stream, server_round, partition_id]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])
