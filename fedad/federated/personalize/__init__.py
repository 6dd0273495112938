"""Personal models at a site: trained, kept and scored there, only their metrics sent."""

from fedad.federated.personalize.heads import HEAD_STATE, evaluated, keep_head, own_model, trainer
from fedad.federated.personalize.options import PERSONALIZATIONS, PREFIX, check_config, method
from fedad.federated.personalize.personal import (
    FINETUNE_STREAM,
    PERSONAL_STATE,
    after_train,
    final_metrics,
    seed_for,
)

__all__ = [
    "FINETUNE_STREAM",
    "HEAD_STATE",
    "PERSONALIZATIONS",
    "PERSONAL_STATE",
    "PREFIX",
    "after_train",
    "check_config",
    "evaluated",
    "final_metrics",
    "keep_head",
    "method",
    "own_model",
    "seed_for",
    "trainer",
]
