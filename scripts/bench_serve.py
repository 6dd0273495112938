"""Latency and throughput of a saved detector: the REST service on loopback, and fedad.score."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
from benchlib import REPO, ProcessTree, load, machine

from fedad import rundir
from fedad.config import compose
from fedad.detector import Detector
from fedad.score import score_file

# Targets on 2 cores, for the federated CNN's detector (issue 15).
TARGETS = {"p99_ms": 20.0, "batch_rows_per_s": 50_000.0, "score_rows_per_s": 100_000.0}
BATCH = 1000


def main(argv: list[str] | None = None) -> None:
    """Build (or take) a federated CNN detector on NSL-KDD, then measure it."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--detector", help="a detector folder (default: train one, 1 round)")
    parser.add_argument("--data-dir", default=os.environ.get("FEDAD_DATA_DIR", "./data"))
    parser.add_argument("--requests", type=int, default=2000, help="single-row requests per run")
    parser.add_argument("--batches", type=int, default=50, help="1,000-row requests")
    parser.add_argument("--seconds", type=float, default=60.0, help="longest a measurement runs")
    parser.add_argument("--quick", action="store_true", help="a few requests: correctness only")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.batches, args.seconds = 20, 2, 20.0
    test_file = Path(args.data_dir) / compose(["dataset=nsl_kdd"]).dataset.test_file
    if not test_file.is_file():
        parser.error(f"the NSL-KDD test file is not at {test_file}: set --data-dir")
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="fedad-bench-serve-") as tmp:
        folder = Path(args.detector) if args.detector else _train(Path(tmp), args.data_dir)
        print(f"detector: {folder}")
        raw = _records(folder, test_file)
        with _server(folder) as url:
            for clients in (1, 8):
                figures = _single_rows(url, raw, clients, args.requests, args.seconds)
                print(
                    f"single-row, {clients} client(s): {figures['requests']} requests, "
                    f"p50 ms {figures['p50_ms']:.2f}, p99 ms {figures['p99_ms']:.2f}, "
                    f"req/s {figures['per_s']:.0f}"
                )
            rows_per_s = _batches(url, raw, args.batches, args.seconds)
            print(f"{BATCH}-row batches: {args.batches} requests, rows/s {rows_per_s:.0f}")
        scored = _score(folder, test_file, Path(tmp))
        print(
            f"fedad.score on {test_file.name}: {scored['rows']} rows, rows/s "
            f"{scored['per_s']:.0f}, peak memory MB {scored['peak_mb']:.0f}"
        )
    print("targets: " + ", ".join(f"{k} {v:g}" for k, v in TARGETS.items()))
    print(load())


def _train(tmp: Path, data_dir: str) -> Path:
    """A federated CNN on NSL-KDD, one round of two sites: the detector's cost, not its skill."""
    from fedad.simulate import run

    cfg = compose(
        [
            "dataset=nsl_kdd",
            f"data_dir={data_dir}",
            "simulation.num_clients=2",
            "simulation.num_rounds=1",
            "baselines=none",
            "explain=false",
        ]
    )
    run(cfg, tmp / "run")
    return tmp / "run" / rundir.DETECTOR_DIR / f"federated_{cfg.model.name}"


def _records(folder: Path, test_file: Path) -> list[dict]:
    detector = Detector.load(folder)
    columns = detector.manifest["reader"]["columns"]
    frame = pd.read_csv(test_file, header=None, names=columns, nrows=5000)
    return json.loads(frame[detector.features].to_json(orient="records"))


class _server:
    """``python -m fedad.serve`` on a free loopback port, for the length of a ``with`` block."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __enter__(self) -> str:
        import httpx

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        command = [sys.executable, "-m", "fedad.serve", str(self.folder), "--port", str(port)]
        self.process = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    return url
            except httpx.TransportError:
                time.sleep(0.3)
        self.process.kill()
        raise SystemExit("the server did not start")

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def _single_rows(url: str, raw: list[dict], clients: int, requests: int, seconds: float) -> dict:
    import httpx

    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    per_client = max(1, requests // clients)

    def client(offset: int) -> None:
        with httpx.Client(base_url=url) as http:
            http.post("/score", json={"records": raw[:1]})  # connection and first-call warm-up
            for i in range(per_client):
                if time.monotonic() > deadline:
                    break
                started = time.perf_counter()
                answer = http.post("/score", json={"records": [raw[(offset + i) % len(raw)]]})
                took = time.perf_counter() - started
                answer.raise_for_status()
                with lock:
                    latencies.append(took)

    threads = [threading.Thread(target=client, args=(k * per_client,)) for k in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {
        "requests": len(ms),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "per_s": len(ms) / wall,
    }


def _batches(url: str, raw: list[dict], batches: int, seconds: float) -> float:
    import httpx

    batch = {"records": (raw * (BATCH // len(raw) + 1))[:BATCH]}
    deadline = time.monotonic() + seconds
    rows = 0
    with httpx.Client(base_url=url, timeout=60) as http:
        http.post("/score", json=batch).raise_for_status()  # warm-up
        started = time.perf_counter()
        for _ in range(batches):
            if time.monotonic() > deadline:
                break
            answer = http.post("/score", json=batch)
            answer.raise_for_status()
            rows += answer.json()["rows"]
        return rows / (time.perf_counter() - started)


def _score(folder: Path, test_file: Path, tmp: Path) -> dict:
    """``fedad.score`` in this process, after the detector is loaded (start-up excluded)."""
    detector = Detector.load(folder)
    score_file(detector, test_file, tmp / "warm.csv", chunk_rows=1000)  # first calls trace
    with ProcessTree() as tree:
        started = time.perf_counter()
        summary = score_file(detector, test_file, tmp / "scores.csv")
        wall = time.perf_counter() - started
    return {"rows": summary["rows"], "per_s": summary["rows"] / wall, "peak_mb": tree.peak_mb}


if __name__ == "__main__":
    main()
