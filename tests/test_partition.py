"""Partition properties: coverage, determinism, skew that follows alpha, natural ids."""

from __future__ import annotations

import numpy as np
import pytest

from fedad.data.partition import label_skew, partition, summarize

RNG = np.random.default_rng(0)
Y = RNG.choice(5, size=4000, p=[0.2, 0.4, 0.2, 0.15, 0.05])
NAMES = ["normal", "a", "b", "c", "d"]


def _cfg(name, **kw):
    return {"name": name, "min_size": 10, **kw}


@pytest.mark.parametrize(
    "cfg",
    [
        _cfg("iid"),
        _cfg("dirichlet", alpha=0.5),
        _cfg("pathological", classes_per_client=2),
        _cfg("quantity", beta=0.5),
    ],
    ids=lambda c: c["name"],
)
def test_partitions_cover_every_row_once_and_are_deterministic(cfg):
    parts = partition(cfg, Y, num_clients=8, seed=3)
    joined = np.concatenate(parts)
    assert len(joined) == len(Y) and len(np.unique(joined)) == len(Y)
    assert min(len(p) for p in parts) >= 1
    again = partition(cfg, Y, num_clients=8, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition(cfg, Y, num_clients=8, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_smaller_alpha_gives_more_label_skew():
    skew = {}
    for alpha in (0.1, 1.0, 100.0):
        parts = partition(_cfg("dirichlet", alpha=alpha), Y, num_clients=10, seed=0)
        skew[alpha] = label_skew(summarize(parts, Y, NAMES), NAMES)
    assert skew[0.1] > skew[1.0] + 0.1 > skew[100.0] + 0.1
    iid = partition(_cfg("iid"), Y, num_clients=10, seed=0)
    assert label_skew(summarize(iid, Y, NAMES), NAMES) < 0.05


def test_dirichlet_respects_min_size():
    parts = partition(_cfg("dirichlet", alpha=0.3, min_size=50), Y, num_clients=10, seed=1)
    assert min(len(p) for p in parts) >= 50


def test_pathological_gives_each_client_k_classes():
    parts = partition(_cfg("pathological", classes_per_client=2), Y, num_clients=10, seed=0)
    assert all(len(np.unique(Y[p])) <= 2 for p in parts)


def test_quantity_sizes_are_skewed_but_labels_iid():
    parts = partition(_cfg("quantity", beta=0.3), Y, num_clients=10, seed=0)
    sizes = np.array([len(p) for p in parts])
    assert sizes.max() > 3 * sizes.min()
    assert sizes.sum() == len(Y)


def test_natural_partition_follows_the_column():
    sites = np.array([f"site_{i % 7}" for i in range(len(Y))])
    parts = partition(_cfg("natural", min_size=1), Y, num_clients=99, seed=0, groups=sites)
    assert len(parts) == 7
    assert all(len(np.unique(sites[p])) == 1 for p in parts)


def test_summary_counts_match():
    parts = partition(_cfg("iid"), Y, num_clients=4, seed=0)
    summary = summarize(parts, Y, NAMES)
    assert summary["n"].sum() == len(Y)
    assert (summary[NAMES].sum(axis=0).to_numpy() == np.bincount(Y)).all()


def test_strong_skew_over_two_classes_redraws_until_min_size_holds():
    # Flower's partitioner alone gives up after 10 draws on this (seed 0, as in the NSL sweep).
    y = np.r_[np.zeros(13449, dtype=int), np.ones(11743, dtype=int)]
    parts = partition(_cfg("dirichlet", alpha=0.1, min_size=10), y, num_clients=10, seed=0)
    assert min(len(p) for p in parts) >= 10
    assert sum(len(p) for p in parts) == len(y)
    again = partition(_cfg("dirichlet", alpha=0.1, min_size=10), y, num_clients=10, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_a_binary_run_can_skew_its_sites_over_attack_types(make_cfg, tmp_path):
    from fedad.run.pipeline import prepare_run, skew_labels

    by_type = prepare_run(make_cfg("dataset.n_rows=3000", "partition.by=type"), tmp_path)
    data = by_type.data
    types = skew_labels(make_cfg("partition.by=type"), data)
    # The synthetic data name five attack families besides normal traffic.
    assert len(np.unique(types)) == 6 and len(types) == len(data.y_train)
    assert np.array_equal(
        types == np.unique(data.types_train).tolist().index("normal"), data.y_train == 0
    )
    assert skew_labels(make_cfg(), data) is data.y_train
    by_label = prepare_run(make_cfg("dataset.n_rows=3000"), tmp_path)
    assert [len(p) for p in by_type.parts] != [len(p) for p in by_label.parts]


def test_skewing_over_attack_types_needs_data_that_name_them(make_cfg):
    from fedad.data.prepared import PreparedData
    from fedad.errors import FedadError
    from fedad.run.pipeline import skew_labels

    y = np.array([0, 1, 0, 1])
    data = PreparedData(
        np.zeros((4, 2)), y, np.zeros((2, 2)), y[:2], ["a", "b"], ["normal", "attack"], "binary"
    )
    with pytest.raises(FedadError, match="partition.by=type skews the sites over attack types"):
        skew_labels(make_cfg("partition.by=type"), data)
