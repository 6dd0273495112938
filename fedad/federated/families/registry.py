"""The family of a run's model, by name: Keras classifier, autoencoder or boosted trees."""

from __future__ import annotations

from pathlib import Path

from fedad.config import Settings
from fedad.federated.families.base import Family, RunScorer
from fedad.models.catalog import family

# The implementations import their framework (TensorFlow takes seconds): only the one a run
# uses is imported.


def family_for(settings: Settings) -> Family:
    """The :class:`Family` of the run's model (``model.name``)."""
    return family_class(str(settings["model.name"]))(settings)


def family_class(model_name: str) -> type[Family]:
    """The :class:`Family` implementation of ``model_name``, its framework imported.

    An actor calls it as it starts (:func:`fedad.federated.simulation.start_engine`),
    so its first message does not wait for the import.
    """
    kind = family(model_name)
    if kind == "booster":
        from fedad.federated.families.booster import BoosterFamily

        return BoosterFamily
    if kind == "autoencoder":
        from fedad.federated.families.autoencoder import AutoencoderFamily

        return AutoencoderFamily
    from fedad.federated.families.classifier import KerasFamily

    return KerasFamily


def load_scorer(model_name: str, run_dir: Path, n_classes: int) -> RunScorer:
    """The saved global model of a run in ``run_dir``, ready to score rows."""
    kind = family(model_name)
    if kind == "booster":
        from fedad.federated.families.booster import BoosterScorer

        return BoosterScorer(run_dir, n_classes)
    if kind == "autoencoder":
        from fedad.federated.families.autoencoder import AutoencoderScorer

        return AutoencoderScorer(run_dir)
    from fedad.federated.families.classifier import KerasScorer

    return KerasScorer(run_dir)
