"""FedPer and FedRep at a site: the body is federated, the head kept in the site's state."""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from fedad.config import Settings
from fedad.federated import site_state
from fedad.federated.families.base import Family
from fedad.federated.personalize.options import HEAD_METHODS, method

# Key of the site's head in its state (context.state), which fedad.federated.site_state
# checkpoints with the rest of it.
HEAD_STATE = "personal-head"


def on(settings: Settings) -> bool:
    """Whether the run keeps a head at each site (``personalize=fedper`` or ``fedrep``)."""
    return method(settings) in HEAD_METHODS


def head_size(settings: Settings) -> int:
    """How many of the model's arrays form its head: the last ones, its output layer's.

    The head is :data:`fedad.models.keras_models.HEAD_LAYER`, the output
    Dense layer of the CNN and the MLP (its kernel and bias); every layer
    below it is the body.
    """
    # Imported here: TensorFlow takes seconds, which a run without a head never needs.
    from fedad.federated.families.classifier import local_model
    from fedad.models.keras_models import HEAD_LAYER

    model = local_model(settings)
    head = model.get_layer(HEAD_LAYER).weights
    # get_weights() follows model.weights: the head must be its tail for the split to hold.
    if [id(w) for w in model.weights[-len(head) :]] != [id(w) for w in head]:
        raise RuntimeError(f"the {HEAD_LAYER} layer's weights are not the model's last ones")
    return len(head)


def own_model(
    received: list[np.ndarray], state: RecordDict, settings: Settings
) -> list[np.ndarray]:
    """The site's model: the ``received`` body with its kept head (the received head if none).

    A site that has not trained yet has no head of its own and starts from
    the server's, which is the initial head: the server never changes it.
    """
    if not on(settings) or HEAD_STATE not in state:
        return received
    head = cast(ArrayRecord, state[HEAD_STATE]).to_numpy_ndarrays()
    return [*received[: len(received) - len(head)], *head]


def trainer(family: Family, settings: Settings) -> Family:
    """The family whose ``fit`` trains the site's model: FedRep's two phases, else ``family``.

    FedRep's takes ``family``'s gradient correction (none: SCAFFOLD is refused beside it).
    """
    if method(settings) != "fedrep":
        return family
    from fedad.federated.personalize.fedrep import FedRepFamily

    fedrep = FedRepFamily(settings)
    fedrep.correction = family.correction
    return fedrep


def keep_head(arrays: list[np.ndarray], state: RecordDict, settings: Settings) -> list[np.ndarray]:
    """Keep the trained model's head in ``state``; return what the reply carries: its body.

    Without a local head, ``arrays`` as they are.
    """
    if not on(settings):
        return arrays
    size = head_size(settings)
    state[HEAD_STATE] = ArrayRecord(arrays[-size:])
    return arrays[:-size]


def evaluated(
    received: list[np.ndarray],
    state: RecordDict,
    config: Mapping,
    settings: Settings,
    partition_id: int,
) -> list[np.ndarray]:
    """The model an evaluate message scores at this site, unprefixed.

    With a local head, in every round but the final pass: the site's own
    model (:func:`own_model`), so that the history's ``client_*`` columns
    and early stopping's pooled validation slices measure the models the
    sites use; a resumed run's site reads its head from its disk first. In
    the final pass and without a local head: the ``received`` model (the
    final pass adds the site's own model as ``personal_*``).
    """
    if not on(settings) or config.get("final", False):
        return received
    restore(state, config, settings, partition_id)
    return own_model(received, state, settings)


def restore(state: RecordDict, config: Mapping, settings: Settings, partition_id: int) -> None:
    """Fill an empty ``state`` from the site's disk in a resumed run (its newest, this round's).

    The evaluation of a round follows its training, so the state saved in
    that round is the one an uninterrupted run's site holds.
    """
    if settings.get("resume", False):
        after = int(cast(int, config["server-round"])) + 1
        site_state.restore(str(settings["run-dir"]), partition_id, after, state)
