"""Client partitions of the training set: row indices per simulated IoT site."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import datasets
import numpy as np
import pandas as pd
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
    Partitioner,
    PathologicalPartitioner,
    SizePartitioner,
)

from fedad.config import checks
from fedad.errors import FedadError

PARTITIONS = ("iid", "dirichlet", "pathological", "quantity", "natural", "by_source")


def check_config(cfg: Mapping) -> list[str]:
    """What is wrong with a ``partition`` config; empty when a partition can be drawn.

    Parameters
    ----------
    cfg : Mapping
        ``name`` plus the partitioner's settings.

    Returns
    -------
    list[str]
        One phrase per problem, naming the key.
    """
    name = cfg.get("name")
    if name not in PARTITIONS:
        return [f"partition must be one of {', '.join(PARTITIONS)}, got {name!r}"]
    problems = [
        checks.number(cfg, "min_size", "partition", whole=True, low=0),
        checks.choice(cfg, "by", "partition", ("label", "type")),
    ]
    if name == "dirichlet":
        problems.append(checks.number(cfg, "alpha", "partition", low=0, low_open=True))
        problems.append(checks.flag(cfg, "self_balancing", "partition"))
    elif name == "pathological":
        problems.append(checks.number(cfg, "classes_per_client", "partition", whole=True, low=1))
        problems.append(
            checks.choice(
                cfg,
                "class_assignment_mode",
                "partition",
                ("random", "deterministic", "first-deterministic"),
            )
        )
    elif name == "quantity":
        problems.append(checks.number(cfg, "beta", "partition", low=0, low_open=True))
    elif name == "by_source":
        problems.append(checks.number(cfg, "clients_per_source", "partition", whole=True, low=1))
        if cfg.get("alpha") is not None:
            problems.append(checks.number(cfg, "alpha", "partition", low=0, low_open=True))
    return [p for p in problems if p]


def partition(
    cfg: Mapping,
    y: np.ndarray,
    num_clients: int,
    seed: int,
    groups: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Split training rows among clients with a ``flwr_datasets`` partitioner.

    Parameters
    ----------
    cfg : Mapping
        The ``partition`` config: ``name`` plus the partitioner's settings
        (``alpha``, ``classes_per_client``, ``beta``, ``min_size``).
    y : np.ndarray
        Training class codes; label skew is drawn over them.
    num_clients : int
        Number of clients; ignored by ``natural``, which makes one client per
        distinct value of ``groups``, and by ``by_source``, which makes
        ``clients_per_source`` per source.
    seed : int
        Seed for every random choice, so a seed gives the same partitions.
    groups : np.ndarray, optional
        Per-row natural id (site, device) for the ``natural`` partition; each
        row's source for ``by_source``.

    Returns
    -------
    list[np.ndarray]
        Sorted row indices into ``y`` for each client. Together they cover every
        training row exactly once.
    """
    checks.raise_problems(check_config(cfg), "Cannot partition the training rows")
    name = cfg["name"]
    n = len(y)
    min_size = int(cfg.get("min_size", 10))
    if name == "by_source":
        return _by_source(cfg, y, seed, groups)
    if name != "natural":
        _check_client_count(num_clients, n, min_size)

    table = {"idx": np.arange(n), "label": np.asarray(y)}
    if name == "natural":
        if groups is None:
            raise FedadError(
                "partition=natural needs a per-row id column (such as `site`), but this "
                "dataset names none. Set `dataset.natural_column` to a column of the data "
                "file, or choose another partition (iid, dirichlet, pathological, quantity)."
            )
        table["group"] = pd.Series(groups).astype(str).to_numpy()
        partitioner: Partitioner = NaturalIdPartitioner(partition_by="group")
    elif name == "iid":
        partitioner = IidPartitioner(num_partitions=num_clients)
    elif name == "dirichlet":
        partitioner = _RestartingDirichlet(
            num_partitions=num_clients,
            partition_by="label",
            alpha=float(cfg["alpha"]),
            min_partition_size=min_size,
            self_balancing=bool(cfg.get("self_balancing", False)),
            seed=seed,
        )
    elif name == "pathological":
        k = int(cfg["classes_per_client"])
        n_classes = len(np.unique(y))
        if not 1 <= k <= n_classes:
            raise FedadError(
                f"partition.classes_per_client must be between 1 and the number of classes "
                f"({n_classes}); got {k}."
            )
        partitioner = PathologicalPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            num_classes_per_partition=k,
            class_assignment_mode=str(cfg.get("class_assignment_mode", "random")),
            seed=seed,
        )
    else:
        partitioner = SizePartitioner(_quantity_sizes(cfg, n, num_clients, min_size, seed))

    ds = datasets.Dataset.from_dict(table)
    if name in ("iid", "quantity"):
        # Both partitioners cut contiguous blocks, so shuffle rows first.
        with _quiet_datasets():
            ds = ds.shuffle(seed=seed).flatten_indices()
    try:
        parts = _load_all(partitioner, ds)
    except ValueError as err:
        raise FedadError(
            f"The '{name}' partitioner could not split {n} training rows into "
            f"{num_clients} clients: {err} Use fewer clients, a larger `partition.alpha`, or a "
            "smaller `partition.min_size`."
        ) from err
    return [p for p in parts if len(p) > 0]


def _by_source(
    cfg: Mapping, y: np.ndarray, seed: int, sources: np.ndarray | None
) -> list[np.ndarray]:
    """Each source's rows to sites of their own, in sources' order: one site each, or several.

    With ``clients_per_source`` above 1 a source's rows are split among its
    sites by label skew, Dirichlet(``alpha``), or evenly at random when
    ``alpha`` is null; no site ever holds two sources' rows.
    """
    if sources is None:
        raise FedadError(
            "partition=by_source gives each site one source's rows, but the data names no "
            "source per row. Use dataset=federation (dataset.federate lists the sources), or "
            "another partition."
        )
    per_source = int(cfg.get("clients_per_source", 1))
    inner = {
        "name": "iid" if cfg.get("alpha") is None else "dirichlet",
        "alpha": cfg.get("alpha"),
        "min_size": cfg.get("min_size", 10),
    }
    parts: list[np.ndarray] = []
    for source in dict.fromkeys(sources):
        rows = np.flatnonzero(sources == source)
        if per_source == 1:
            parts.append(rows)
            continue
        try:
            split = partition(inner, y[rows], per_source, seed)
        except FedadError as err:
            raise FedadError(
                f"Source '{source}' ({len(rows)} training rows) cannot be split among "
                f"partition.clients_per_source={per_source} sites: {err}"
            ) from None
        parts += [rows[p] for p in split]
    return parts


def _load_all(partitioner: Partitioner, ds: datasets.Dataset) -> list[np.ndarray]:
    partitioner.dataset = ds
    return [
        np.sort(np.asarray(partitioner.load_partition(i)["idx"], dtype=np.int64))
        for i in range(partitioner.num_partitions)
    ]


class _RestartingDirichlet(DirichletPartitioner):
    """Dirichlet partitioner that redraws with derived seeds when ``min_size`` is not met.

    Flower's partitioner gives up after 10 draws, which strong skew (alpha 0.1 over two
    classes) often needs more than. The derived seeds keep the result deterministic.
    """

    RESTARTS = 20
    _seed: int  # set by DirichletPartitioner.__init__ (an untyped library)

    # flower-internal: test_dirichlet_private_method (the method, _seed and _rng)
    def _determine_partition_id_to_indices_if_needed(self) -> None:
        base = self._seed
        for restart in range(self.RESTARTS):
            self._seed = base + 7919 * restart
            self._rng = np.random.default_rng(self._seed)
            try:
                with warnings.catch_warnings():
                    # Flower warns on every redraw; the restarts are expected here.
                    warnings.simplefilter("ignore", UserWarning)
                    # flower-internal: test_dirichlet_private_method
                    return super()._determine_partition_id_to_indices_if_needed()
            except ValueError:
                if restart == self.RESTARTS - 1:
                    raise
        return None


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No "Flattening the indices" progress bar on stderr, where it would bury a later error."""
    shown = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if shown:
            datasets.enable_progress_bars()


def _check_client_count(num_clients: int, n_rows: int, min_size: int) -> None:
    if num_clients < 1:
        raise FedadError(
            f"simulation.num_clients must be at least 1 (got {num_clients}): it is the number "
            "of simulated sites the training rows are split among. Set e.g. "
            "simulation.num_clients=10."
        )
    if num_clients > n_rows:
        raise FedadError(
            f"simulation.num_clients={num_clients} is more than the {n_rows} training rows, so "
            "some clients would hold no data. Use fewer clients or a larger dataset."
        )
    if num_clients * min_size > n_rows:
        raise FedadError(
            f"{num_clients} clients with at least partition.min_size={min_size} rows each need "
            f"{num_clients * min_size} rows, but the training set has {n_rows}. Lower "
            "simulation.num_clients or partition.min_size."
        )


def _quantity_sizes(
    cfg: Mapping, n_rows: int, num_clients: int, min_size: int, seed: int
) -> list[int]:
    """Draw skewed client sizes from a Dirichlet(beta), each at least ``min_size``."""
    beta = float(cfg.get("beta", 0.5))
    rng = np.random.default_rng(seed)
    spare = n_rows - num_clients * min_size
    shares = rng.dirichlet(np.full(num_clients, beta))
    sizes = min_size + np.floor(shares * spare).astype(int)
    # Flooring loses a few rows; hand them out so the sizes sum to the training set.
    sizes[np.argsort(-shares)[: n_rows - sizes.sum()]] += 1
    return [int(s) for s in sizes]


def summarize(parts: list[np.ndarray], y: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    """Per-client size and class counts, one row per client."""
    counts = np.stack([np.bincount(y[p], minlength=len(class_names)) for p in parts])
    frame = pd.DataFrame(counts, columns=list(class_names))
    frame.insert(0, "n", counts.sum(axis=1))
    frame.insert(0, "client", np.arange(len(parts)))
    return frame


def label_skew(summary: pd.DataFrame, class_names: list[str]) -> float:
    """Mean total-variation distance between each client's class mix and the pooled mix.

    0 means every client sees the pooled class distribution; 1 means disjoint.
    """
    counts = summary[list(class_names)].to_numpy(dtype=float)
    mixes = counts / counts.sum(axis=1, keepdims=True)
    pooled = counts.sum(axis=0) / counts.sum()
    return float(0.5 * np.abs(mixes - pooled).sum(axis=1).mean())
