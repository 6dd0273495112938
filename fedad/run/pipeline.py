"""The data of one run: prepare, audit and partition, as simulate, deployment and benchmarks do."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hydra.utils import to_absolute_path
from omegaconf import DictConfig

from fedad import progress, rundir
from fedad.data.partition import label_skew, partition, summarize
from fedad.data.prepare import prepare
from fedad.data.prepared import PreparedData
from fedad.errors import FedadError
from fedad.evaluation.plots import plot_partition

log = logging.getLogger("fedad")


@dataclass
class RunData:
    """The prepared split of a run and its sites.

    Attributes
    ----------
    data : PreparedData
        The one train/test split every model of the run uses.
    parts : list[np.ndarray]
        Training row indices of each site.
    facts : dict
        What ``results.json`` records: ``data`` (sizes, classes, cleaning
        counts, audit flags) and ``partition`` (sites, label skew).
    """

    data: PreparedData
    parts: list[np.ndarray]
    facts: dict


def prepare_run(cfg: DictConfig, run_dir: Path) -> RunData:
    """Prepare the data of ``cfg``, partition it over the sites, write the partition files.

    Parameters
    ----------
    cfg : DictConfig
        The composed config (already validated).
    run_dir : Path
        Gets ``partition.csv`` and ``partition.png``.

    Returns
    -------
    RunData
    """
    with progress.step(f"data: reading and preparing {cfg.dataset.name}") as step:
        data = prepare(
            cfg.dataset, cfg.preprocess, cfg.task, to_absolute_path(cfg.data_dir), int(cfg.seed)
        )
        n_train, n_test = len(data.y_train), len(data.y_test)
        step.note = f"{n_train + n_test:,} rows: {n_train:,} train + {n_test:,} test"
    by_source = cfg.partition.name == "by_source"
    with progress.step(f"data: partitioning over {cfg.simulation.num_clients} sites"):
        parts = partition(
            cfg.partition,
            skew_labels(cfg, data),
            int(cfg.simulation.num_clients),
            int(cfg.seed),
            groups=data.sources_train if by_source else data.groups_train,
        )
    summary = summarize(parts, data.y_train, data.class_names)
    if by_source and data.sources_train is not None:
        # Each site holds one source's rows: partition.csv says whose.
        summary.insert(1, "source", [data.sources_train[rows[0]] for rows in parts])
    summary.to_csv(Path(run_dir) / rundir.PARTITION_CSV, index=False)
    plot_partition(
        summary,
        data.class_names,
        Path(run_dir) / rundir.PARTITION_PNG,
        f"{cfg.partition.name} partition of {cfg.dataset.name}",
    )
    skew = label_skew(summary, data.class_names)
    log.info(
        "partition %s: %d clients, sizes %d..%d (median %d), label skew %.3f (0 = IID)",
        cfg.partition.name,
        len(parts),
        summary["n"].min(),
        summary["n"].max(),
        int(summary["n"].median()),
        skew,
    )
    log.info("class counts per client:\n%s", summary.head(20).to_string(index=False))
    facts = {"data": describe(data), "partition": {"clients": len(parts), "label_skew": skew}}
    return RunData(data, parts, facts)


def skew_labels(cfg: DictConfig, data: PreparedData) -> np.ndarray:
    """What the partition skews: the task's labels, or each row's attack type (``partition.by``).

    A binary detector's sites differ in which attacks they see, not only in how
    many: ``partition.by=type`` draws the label skew over the attack types.
    """
    if cfg.partition.get("by", "label") != "type" or data.task != "binary":
        return data.y_train
    if data.types_train is None:
        raise FedadError(
            f"partition.by=type skews the sites over attack types, but dataset "
            f"'{cfg.dataset.name}' names none (one attack class). Use partition.by=label, or "
            "set dataset.class_column to the column that names each row's attack type."
        )
    return np.unique(data.types_train, return_inverse=True)[1].astype(np.int64)


def describe(data: PreparedData) -> dict:
    """Sizes, classes and the notes of data preparation (the audit table left out)."""
    notes = {k: v for k, v in data.notes.items() if k != "audit"}
    return {
        "n_train": int(len(data.y_train)),
        "n_test": int(len(data.y_test)),
        "n_features": data.n_features,
        "classes": data.class_names,
        "train_class_counts": np.bincount(data.y_train, minlength=data.n_classes).tolist(),
        "test_class_counts": np.bincount(data.y_test, minlength=data.n_classes).tolist(),
        # What pooling the training rows at one place would move: float32 features, int32 labels.
        "pooling_mb": len(data.y_train) * (data.n_features * 4 + 4) / 1e6,
        **notes,
    }
