"""Models the sites train and the centralized baselines reuse (Keras builders: keras_models)."""

from fedad.models.catalog import MODEL_NAMES, OPTIMIZERS, check_config

__all__ = ["MODEL_NAMES", "OPTIMIZERS", "check_config"]
