"""Past one machine: a simulation attached to a real two-node Ray cluster on this machine."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedad.config import compose
from fedad.federated.shards import read_access_log
from fedad.federated.simulation import run_federated
from fedad.run.pipeline import prepare_run

pytestmark = [
    pytest.mark.slow,
    pytest.mark.long,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
    pytest.mark.skipif(shutil.which("ray") is None, reason="Ray's `ray` command is not on PATH"),
]
OVERRIDES = [
    "dataset.n_rows=2000",
    "model=logistic",
    "partition=iid",
    "simulation.num_clients=4",
    "simulation.num_rounds=2",
]
STARTED = "Ray runtime started."
START_TIMEOUT_S = 180
STOP_GRACE_S = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node(folder: Path, name: str, *options: str) -> subprocess.Popen:
    """``ray start --block`` for one node of 1 CPU, in a session of its own; its output to a file.

    Every port is a free one, so the two nodes on this machine (and anyone else's Ray) never meet.
    """
    ports = (
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "runtime-env-agent-port",
        "metrics-export-port",
    )
    command = [
        "ray",
        "start",
        "--block",
        "--num-cpus=1",
        "--object-store-memory=100000000",
        "--disable-usage-stats",
        f"--temp-dir={folder}",
        *(f"--{port}={free_port()}" for port in ports),
        *options,
    ]
    with open(folder / f"{name}.log", "w") as out:
        return subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_started(folder: Path, name: str, node: subprocess.Popen) -> None:
    log = folder / f"{name}.log"
    deadline = time.time() + START_TIMEOUT_S
    while STARTED not in log.read_text():
        if node.poll() is not None or time.time() > deadline:
            pytest.fail(f"Ray's {name} node did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def our_processes(sessions: set[int], folder: Path) -> list[int]:
    """Processes of the nodes' sessions, or naming the cluster's folder: ours and no one else's."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            command = Path(entry.path, "cmdline").read_bytes()
        except OSError:  # ended while listing
            continue
        session = int(stat[stat.rindex(")") + 2 :].split()[3])
        if session in sessions or str(folder).encode() in command:
            found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A head node and a second node, 1 CPU each; stopped by their pids afterwards."""
    # Short: Ray's socket paths under it must stay within the 107 characters Linux allows.
    folder = Path(tempfile.mkdtemp(prefix="fedad-ray-", dir="/tmp"))
    port = free_port()
    nodes = []
    try:
        nodes.append(
            start_node(
                folder,
                "head",
                "--head",
                f"--port={port}",
                "--include-dashboard=false",
                f"--ray-client-server-port={free_port()}",
            )
        )
        wait_started(folder, "head", nodes[0])
        nodes.append(start_node(folder, "second", f"--address=127.0.0.1:{port}"))
        wait_started(folder, "second", nodes[1])
        yield f"127.0.0.1:{port}"
    finally:
        sessions = {node.pid for node in nodes}
        for node in nodes:
            node.send_signal(signal.SIGTERM)
        for node in nodes:
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
        # A process that outlives its node is told to end by the kernel (Ray's fate sharing);
        # give such a one, or a zombie not yet reaped, a moment.
        deadline = time.time() + STOP_GRACE_S
        while (left := our_processes(sessions, folder)) and time.time() < deadline:
            time.sleep(0.5)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # ended since it was listed
                continue
        shutil.rmtree(folder, ignore_errors=True)
        assert not left, f"processes of the test's Ray cluster outlived its nodes: {left}"


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory):
    """The same seeded run attached to the cluster, then on a local Ray of its own."""
    local_cfg = compose(OVERRIDES)
    prepared = prepare_run(local_cfg, tmp_path_factory.mktemp("data"))
    attached_cfg = compose([*OVERRIDES, f"simulation.address={cluster}"])
    out = {}
    for name, cfg in (("cluster", attached_cfg), ("local", local_cfg)):
        run_dir = tmp_path_factory.mktemp(name)
        out[name] = (run_federated(cfg, prepared.data, prepared.parts, run_dir)[0], run_dir)
    return out


def test_the_sites_ran_on_both_nodes_of_the_cluster(runs):
    _, run_dir = runs["cluster"]
    reads = read_access_log(run_dir)
    # The server and the local-only rows read in the driver; the sites in actors.
    sites = [read for read in reads if read.reader.startswith("client_")]
    assert {read.reader for read in sites} == {f"client_{i:04d}" for i in range(4)}
    # One actor of 1 CPU on each node: the sites' reads name both nodes.
    assert len({read.node for read in sites}) == 2 and all(read.node for read in sites)
    _, local_dir = runs["local"]
    local_sites = [read for read in read_access_log(local_dir) if read.reader.startswith("client_")]
    assert len({read.node for read in local_sites}) == 1


def test_the_cluster_run_equals_a_local_run_with_the_same_seed(runs):
    attached, local = runs["cluster"][0], runs["local"][0]
    np.testing.assert_allclose(attached.scores, local.scores, atol=1e-6)
    for key in ("accuracy", "macro_f1", "roc_auc", "pr_auc", "fpr"):
        assert attached.metrics[key] == pytest.approx(local.metrics[key], abs=1e-6)
    columns = ["loss", "roc_auc", "macro_f1", "client_loss", "train_loss"]
    np.testing.assert_allclose(attached.history[columns], local.history[columns], atol=1e-6)
    assert list(attached.history["failures"]) == [0, 0, 0]
