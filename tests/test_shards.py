"""Site shards on disk: memory-mapped .npy files holding the rows the .npz shards held."""

from __future__ import annotations

import numpy as np
import pytest

from fedad.config import compose
from fedad.data.partition import partition
from fedad.data.prepare import prepare
from fedad.federated import shards


@pytest.fixture(scope="module")
def split():
    cfg = compose(["dataset.n_rows=3000", "simulation.num_clients=4"])
    data = prepare(cfg.dataset, cfg.preprocess, cfg.task, ".", 0)
    return data, partition(cfg.partition, data.y_train, 4, 0)


def test_a_mapped_shard_holds_the_rows_the_npz_shard_held(split, tmp_path):
    data, parts = split
    shards.write_shards(data, parts, tmp_path)
    for pid, rows in enumerate(parts):
        # The .npz of each site as fedad wrote it before the shards were memory-mapped.
        npz = tmp_path / f"client_{pid:04d}.npz"
        np.savez(npz, X=data.X_train[rows], y=data.y_train[rows])
        X, y = shards.read_shard(shards.shard_path(tmp_path, pid), shards.site_reader(pid))
        with np.load(npz) as old:
            np.testing.assert_array_equal(X, old["X"])
            np.testing.assert_array_equal(y, old["y"])
            assert X.dtype == old["X"].dtype and y.dtype == old["y"].dtype
        # Mapped, not loaded: the rows stay in the file until touched, and cannot be changed.
        assert isinstance(X.base, np.memmap) and not X.flags.writeable
    X_test, y_test = shards.read_shard(shards.test_path(tmp_path), "server")
    np.testing.assert_array_equal(X_test, data.X_test)
    np.testing.assert_array_equal(y_test, data.y_test)
    assert isinstance(X_test.base, np.memmap)

    reads = shards.read_access_log(tmp_path)
    assert [(r.reader, r.shard) for r in reads] == [
        *((f"client_{p:04d}", f"client_{p:04d}") for p in range(len(parts))),
        ("server", "test"),
    ]
    # Outside Ray the reads name no node.
    assert {r.node for r in reads} == {""}


def test_rewriting_the_shards_leaves_a_mapped_earlier_shard_intact(split, tmp_path):
    data, parts = split
    shards.write_shards(data, parts, tmp_path)
    X, y = shards.read_shard(shards.shard_path(tmp_path, 0), "client_0000")
    shards.write_shards(data, parts[::-1], tmp_path)
    # The new files replaced the old ones by name; the old mapping still reads the old rows.
    np.testing.assert_array_equal(X, data.X_train[parts[0]])
    np.testing.assert_array_equal(y, data.y_train[parts[0]])
    X_new, _ = shards.read_shard(shards.shard_path(tmp_path, 0), "client_0000")
    np.testing.assert_array_equal(X_new, data.X_train[parts[-1]])
    # A rewrite starts a new access log.
    assert [r.reader for r in shards.read_access_log(tmp_path)] == ["client_0000"]
