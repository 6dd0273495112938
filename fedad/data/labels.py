"""From a dataset's label cells to each row's binary label and class name."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd


def classify(frame: pd.DataFrame, dataset: Mapping, task: str) -> tuple[np.ndarray, np.ndarray]:
    """Each row's binary label (1 = attack) and class name (normal rows are 'normal').

    Parameters
    ----------
    frame : pd.DataFrame
        Raw rows holding ``dataset.label_column`` (and, for the multiclass task,
        ``dataset.class_column``: the caller checks it is there), every label
        cell filled.
    dataset : Mapping
        The ``dataset`` config: ``label_column``, ``normal_value``, and for the
        multiclass task ``class_column`` and ``class_map``.
    task : str
        ``binary`` (classes ``normal``/``attack``) or ``multiclass`` (the
        class column, mapped through ``class_map``).

    Returns
    -------
    attack, classes : np.ndarray
        ``int`` 0/1 and class names, one per row.
    """
    label = dataset["label_column"]
    values = frame[label].astype(str).str.strip()
    normal = str(dataset["normal_value"]).strip()
    is_normal = values == normal
    numeric = pd.to_numeric(values, errors="coerce")
    normal_number = pd.to_numeric(pd.Series([normal]), errors="coerce")[0]
    if not np.isnan(normal_number):
        is_normal |= numeric == normal_number
    attack = (~is_normal).astype(int).to_numpy()
    if task == "binary":
        return attack, np.where(is_normal, "normal", "attack")
    class_column = dataset.get("class_column") or label
    classes = frame[class_column].astype(str).str.strip()
    class_map = dict(dataset.get("class_map") or {})
    if class_map:
        classes = classes.map(lambda c: class_map.get(c, c))
    return attack, np.where(is_normal, "normal", classes)
