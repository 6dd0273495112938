"""FedRep's local update: the site's head trained with the body frozen, then the body alone."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import numpy as np
from flwr.app import ArrayRecord

from fedad.federated.families.classifier import (
    OPTIMIZER_STATE,
    KerasFamily,
    ProximalModel,
    local_model,
    start_local,
)
from fedad.federated.task import Site, balanced_weights
from fedad.models.keras_models import HEAD_LAYER, TrainingSteps, run_epochs

# Per actor and model, the steps that train the head alone and the body alone: each traces once.
_PARTS: dict[int, tuple[TrainingSteps, TrainingSteps]] = {}
# Seed stream of the head's row orders, apart from the body's (the round's update seed).
HEAD_STREAM = 3


class FedRepFamily(KerasFamily):
    """A Keras classifier trained as FedRep trains it (Collins et al., ICML 2021).

    :meth:`fit` starts from the site's model (the received body with its kept
    head), trains the head for ``personalize.head_epochs`` with the body
    frozen, then the body for ``train.local_epochs`` with the head frozen, one
    optimizer across both (kept between rounds under ``train.keep_optimizer``).
    """

    def fit(
        self, arrays: list[np.ndarray], site: Site, config: Mapping, seed: int
    ) -> tuple[list[np.ndarray], dict[str, float]]:
        """Train the head, then the body; the metrics are the body's phase's, steps of both."""
        settings = self.settings
        model = local_model(settings)
        head, body = _parts(model)
        state = site.state if settings["train.keep_optimizer"] else None
        start_local(model, arrays, settings, float(config.get("proximal-mu", 0.0)), seed, state)
        y = site.y_train
        train = partial(
            run_epochs,
            X=site.X_train,
            y=y,
            batch_size=int(settings["train.batch_size"]),
            sample_weight=balanced_weights(y) if settings["train.class_weights"] else None,
            validation=(site.X_val, site.y_val),
            patience=int(settings["train.early_stopping_patience"]),
        )
        head.correct(self.correction)
        head_seed = int(np.random.SeedSequence([seed, HEAD_STREAM]).generate_state(1)[0])
        first = train(head, epochs=int(settings["personalize.head_epochs"]), seed=head_seed)
        body.correct(self.correction)
        history = train(body, epochs=int(settings["train.local_epochs"]), seed=seed)
        if state is not None:
            state[OPTIMIZER_STATE] = ArrayRecord([np.asarray(v) for v in model.optimizer.variables])
        steps = history["train_steps"] + first["train_steps"]
        return model.get_weights(), {**history, "train_steps": steps, "num-examples": len(y)}


def _parts(model: ProximalModel) -> tuple[TrainingSteps, TrainingSteps]:
    """The steps that train ``model``'s head alone and its body alone, built on first use."""
    if id(model) not in _PARTS:
        head = model.get_layer(HEAD_LAYER).trainable_variables
        body = [v for v in model.trainable_variables if all(v is not h for h in head)]
        _PARTS[id(model)] = (TrainingSteps(model, head), TrainingSteps(model, body))
    return _PARTS[id(model)]
