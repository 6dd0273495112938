"""Checkpoints, resuming killed runs and sweeps, and sites that fail, hang or crash mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from flwr.app import ArrayRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvgM
from generated import binary_data
from omegaconf import OmegaConf

from fedad import rundir
from fedad.config import content
from fedad.data.prepared import PreparedData
from fedad.errors import FedadError
from fedad.federated import checkpoint, shards, site_state
from fedad.federated.grid import PAYLOAD
from fedad.federated.rounds import Rounds
from fedad.federated.simulation import run_federated
from fedad.run.resume import Decision, decide

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
# Small and fast: the cost of a run is Python, TensorFlow and Ray starting up.
BASE = [
    "dataset.n_rows=3000",
    "simulation.num_clients=3",
    "model=logistic",
    "partition=iid",
    "baselines=none",
    "explain=false",
]
# Timings differ between runs; so does the payload of a resumed one, which asks every site
# for its scaling sums again (real traffic, counted).
TIMING = ["seconds", "started_at", *PAYLOAD, "mb_cumulative"]


# --- checkpoint files, strategy state, settings -------------------------------------------


def _checkpoint(server_round: int, strategy=None) -> checkpoint.Checkpoint:
    rng = np.random.default_rng(server_round)
    return checkpoint.Checkpoint(
        round=server_round,
        arrays=[rng.normal(size=(4, 2)).astype(np.float32), np.zeros(2, np.float32)],
        strategy_state=checkpoint.strategy_state(strategy) if strategy else {},
        history=[{"round": r, "auc": float("nan") if r == 0 else 1 / r} for r in range(3)],
        fingerprint={"content": {"seed": 0}, "data": "abc"},
    )


def test_checkpoint_keeps_model_history_and_the_server_optimizer_state(tmp_path):
    adam = FedAdam()
    adam.m_t = {"0": np.ones((4, 2)), "1": np.full(2, 0.5)}
    adam.v_t = {"0": np.full((4, 2), 2.0), "1": np.zeros(2)}
    momentum = FedAvgM(server_momentum=0.9)
    momentum.momentum_vector = [np.full((4, 2), 3.0), np.ones(2)]
    for strategy, fresh in ((adam, FedAdam()), (momentum, FedAvgM(server_momentum=0.9))):
        saved = _checkpoint(3, strategy)
        checkpoint.save(tmp_path, saved)
        loaded = checkpoint.load(tmp_path)
        assert loaded.round == 3
        for a, b in zip(loaded.arrays, saved.arrays, strict=True):
            np.testing.assert_array_equal(a, b)
        assert loaded.history[1] == saved.history[1]
        assert np.isnan(loaded.history[0]["auc"])
        checkpoint.restore_strategy_state(fresh, loaded.strategy_state)
        for name in checkpoint.STATE_ATTRIBUTES[type(strategy).__name__]:
            before, after = getattr(strategy, name, None), getattr(fresh, name, None)
            if isinstance(before, dict):
                assert before.keys() == after.keys()
                before, after = list(before.values()), list(after.values())
            for x, y in zip(before or [], after or [], strict=True):
                np.testing.assert_array_equal(x, y)
    with pytest.raises(FedadError, match="momentum_vector"):
        checkpoint.restore_strategy_state(FedAdam(), checkpoint.load(tmp_path).strategy_state)


def test_a_crash_while_saving_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, _checkpoint(1))
    real_replace = os.replace

    def crash_on_meta(src, dst):
        if Path(dst).name == rundir.CHECKPOINT_META:
            raise KeyboardInterrupt("killed between the state file and meta.json")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_meta)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, _checkpoint(2))
    monkeypatch.undo()
    loaded = checkpoint.load(tmp_path)
    assert loaded.round == 1
    np.testing.assert_array_equal(loaded.arrays[0], _checkpoint(1).arrays[0])
    assert not list((tmp_path / rundir.CHECKPOINT_DIR).glob("*.tmp"))
    checkpoint.save(tmp_path, _checkpoint(2))
    assert sorted(p.name for p in (tmp_path / rundir.CHECKPOINT_DIR).iterdir()) == [
        "meta.json",
        "state-00002.npz",
    ]


def test_checkpointer_saves_every_k_rounds_the_last_and_on_flush(tmp_path):
    saver = checkpoint.Checkpointer(tmp_path, 2, 5, {}, FedAdam())
    for server_round in range(4):
        saver.round_done(server_round, _checkpoint(server_round).arrays, [])
    assert checkpoint.read_meta(tmp_path)["round"] == 2
    assert saver.flush() == 3
    assert checkpoint.read_meta(tmp_path)["round"] == 3
    saver.round_done(4, _checkpoint(4).arrays, [])
    saver.round_done(5, _checkpoint(5).arrays, [])
    assert checkpoint.read_meta(tmp_path)["round"] == 5
    never = checkpoint.Checkpointer(tmp_path / "off", 0, 5, {}, FedAdam())
    never.round_done(0, _checkpoint(0).arrays, [])
    assert never.flush() is None
    assert checkpoint.read_meta(tmp_path / "off") is None


def _finished(run_dir: Path, cfg, rounds: int | None = None) -> None:
    """Make ``run_dir`` look like a finished run of ``cfg`` (with a checkpoint of ``rounds``)."""
    (run_dir / rundir.CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (run_dir / rundir.RESULTS_FILE).write_text(json.dumps({"status": "done"}))
    if rounds is not None:
        saved = _checkpoint(rounds)
        saved.fingerprint = {"content": content(cfg), "data": ""}
        checkpoint.save(run_dir, saved)


def test_settings_that_matter_are_named_and_the_others_may_change(make_cfg, tmp_path):
    cfg = make_cfg(*BASE, "simulation.num_rounds=3")
    _finished(tmp_path, cfg, rounds=3)
    runtime = make_cfg(
        *BASE,
        "simulation.num_rounds=9",  # train longer
        "simulation.round_timeout=5",
        "simulation.min_clients=1",
        "simulation.checkpoint_every=3",
        "simulation.failure_mode=hang",
        "simulation.client_resources.num_cpus=2",
        "resume=/somewhere",
    )
    assert decide(runtime, tmp_path) is Decision.RESUME
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(FedadError) as error:
        decide(make_cfg(*BASE, "seed=1", "strategy=fedadam"), tmp_path)
    message = str(error.value)
    assert "seed (was 0, now 1)" in message
    assert "strategy.name (was 'fedavg', now 'fedadam')" in message
    assert "strategy.eta (was not set, now " in message
    assert "dataset" not in message
    # What the run contains beyond the federated model counts too: nothing is overwritten.
    for changed in ("federated=false", "baselines=all", "explain=true"):
        with pytest.raises(FedadError, match=changed.split("=")[0]):
            decide(make_cfg(*BASE, "simulation.num_rounds=3", changed), tmp_path)
    with pytest.raises(FedadError, match="num_rounds .2 is below the 3 rounds"):
        decide(make_cfg(*BASE, "simulation.num_rounds=2"), tmp_path)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_folder_is_done_resumable_or_fresh(make_cfg, tmp_path):
    ten = "simulation.num_rounds=10"
    cfg = make_cfg(*BASE, ten)
    assert decide(cfg, tmp_path) is Decision.FRESH
    with pytest.raises(FedadError, match="holds no checkpoint"):
        decide(cfg, tmp_path, required=True)
    _finished(tmp_path, cfg)
    assert decide(cfg, tmp_path) is Decision.DONE
    assert decide(make_cfg(*BASE, ten, "simulation.round_timeout=9"), tmp_path) is Decision.DONE
    longer = make_cfg(*BASE, "simulation.num_rounds=20")
    # Finished, and no checkpoint to continue from: left as it is.
    with pytest.raises(FedadError, match="no checkpoint to continue from"):
        decide(longer, tmp_path)
    _finished(tmp_path, cfg, rounds=10)
    assert decide(cfg, tmp_path, required=True) is Decision.DONE
    assert decide(longer, tmp_path) is Decision.RESUME
    with pytest.raises(FedadError, match=r"model\.name"):
        decide(make_cfg(*BASE, ten, "model=cnn"), tmp_path)


def test_a_site_keeps_on_its_disk_the_states_a_resume_may_need(tmp_path):
    shards.shard_path(tmp_path, 0).mkdir(parents=True)

    def state_of(server_round: int) -> RecordDict:
        return RecordDict({"optimizer": ArrayRecord([np.full(3, server_round), np.array(7)])})

    for server_round in (1, 2, 3, 5, 6):  # round 4 sampled other sites
        site_state.save(tmp_path, 0, server_round, state_of(server_round), checkpoint_every=2)
    files = sorted(p.name for p in shards.shard_path(tmp_path, 0).glob("state-*"))
    # A checkpoint is at most 2 rounds behind round 6: rounds 5 and 6, and the newest before.
    assert files == ["state-round0003.npz", "state-round0005.npz", "state-round0006.npz"]
    for resumed_at, expected in ((7, 6), (6, 5), (5, 3)):
        state = RecordDict()
        site_state.restore(tmp_path, 0, resumed_at, state)
        arrays = state["optimizer"].to_numpy_ndarrays()
        assert arrays[0].tolist() == [expected] * 3 and int(arrays[1]) == 7
    kept = state_of(9)
    site_state.restore(tmp_path, 0, 7, kept)  # a state in memory wins over the disk
    assert kept["optimizer"].to_numpy_ndarrays()[0].tolist() == [9] * 3
    site_state.clear(tmp_path)
    assert not list(shards.shard_path(tmp_path, 0).glob("state-*"))


@pytest.mark.parametrize("damage", ["meta_cut", "meta_fields", "state_cut"])
def test_a_damaged_checkpoint_is_refused_and_kept(tmp_path, damage):
    checkpoint.save(tmp_path, _checkpoint(2))
    folder = tmp_path / rundir.CHECKPOINT_DIR
    target = folder / ("state-00002.npz" if damage == "state_cut" else rundir.CHECKPOINT_META)
    content = target.read_bytes()
    target.write_bytes(b'{"round": 2}' if damage == "meta_fields" else content[: len(content) // 2])
    before = {p: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(FedadError, match=f"checkpoint file {target} is damaged"):
        checkpoint.load(tmp_path)
    assert {p: p.read_bytes() for p in folder.iterdir()} == before


class _Strategy:
    """Records the rounds it is called with; samples three sites."""

    def __init__(self) -> None:
        self.rounds: list[int] = []

    def configure_train(self, server_round, arrays, config, grid):
        self.rounds.append(server_round)
        return ["a", "b", "c"]

    def aggregate_train(self, server_round, replies):
        self.rounds.append(server_round)
        return None, None


def _reply(error: bool) -> SimpleNamespace:
    return SimpleNamespace(has_error=lambda: error)


def test_rounds_continue_the_numbering_and_need_min_clients_replies():
    inner = _Strategy()
    rounds = Rounds(inner, done=3, seed=0, min_replies=2)
    rounds.configure_train(1, None, None, None)
    rounds.aggregate_train(1, [_reply(False), _reply(False), _reply(True)])
    assert inner.rounds == [4, 4]
    rounds.configure_train(2, None, None, None)
    with pytest.raises(FedadError, match=r"Round 5 .* only 1 of the 3 .*min_clients=2"):
        rounds.aggregate_train(2, [_reply(False), _reply(True)])


# --- real runs: a killed sweep, a killed single run with a hanging site -----------------


def _descendants(pid: int) -> dict[int, str]:
    """Every process below ``pid``, with its command line."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = _cmdline(child)
            todo.append(child)
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class _Launch:
    """``python -m fedad.simulate`` in the background, watched until a checkpoint appears."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.log = cwd / f"launch_{time.monotonic_ns()}.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fedad.simulate", *args],
                cwd=cwd,
                env={**os.environ, "PYTHONPATH": str(REPO)},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.processes: dict[int, str] = {}

    def wait_for_checkpoint(self, run_dir: Path, server_round: int, timeout: float = 300) -> None:
        meta = run_dir / rundir.CHECKPOINT_DIR / rundir.CHECKPOINT_META
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.processes.update(_descendants(self.proc.pid))
            if meta.exists() and json.loads(meta.read_text())["round"] >= server_round:
                self.processes.update(_descendants(self.proc.pid))
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.proc.kill()
        raise AssertionError(f"no checkpoint of round {server_round}:\n{self.output()}")

    def stop(self, *signals: signal.Signals) -> int:
        for sig in signals:
            self.proc.send_signal(sig)
            time.sleep(1)
        try:
            return self.proc.wait(timeout=120)
        finally:
            self.proc.kill()

    def survivors(self) -> list[str]:
        """Processes the run started that are still alive (same pid, same command)."""
        time.sleep(1)
        return [cmd for pid, cmd in self.processes.items() if cmd and _cmdline(pid) == cmd]

    def output(self) -> str:
        return self.log.read_text()


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedad.simulate", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=400,
    )


def _history(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "history.csv").drop(columns=TIMING)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """FedAdam over two jobs that differ only in checkpoint_every (so their results must not).

    The sweep is interrupted with SIGINT during job 1, after its round-2
    checkpoint, and launched again with the same arguments.
    """
    root = tmp_path_factory.mktemp("sweep")
    sweep_dir = root / "sweep"
    args = [
        "-m",
        *BASE,
        "strategy=fedadam",
        "simulation.num_rounds=4",
        "simulation.checkpoint_every=1,2",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    first = _Launch(args, root)
    first.wait_for_checkpoint(sweep_dir / "1", 2)
    finished = (sweep_dir / "0" / "results.json").stat().st_mtime_ns
    code = first.stop(signal.SIGINT)
    survivors = first.survivors()
    interrupted = checkpoint.read_meta(sweep_dir / "1")["round"]
    again = _cli(*args, cwd=root)
    return SimpleNamespace(
        dir=sweep_dir,
        code=code,
        output=first.output(),
        survivors=survivors,
        interrupted=interrupted,
        finished_mtime=finished,
        again=again,
    )


@pytest.mark.slow
def test_ctrl_c_stops_the_sweep_cleanly(sweep):
    assert sweep.code == 130, sweep.output
    assert "SIGINT: stopping after the running client tasks" in sweep.output
    assert f"launch the same command with hydra.sweep.dir={sweep.dir}" in sweep.output
    assert sweep.survivors == []
    assert sweep.interrupted >= 2


@pytest.mark.slow
def test_relaunched_sweep_skips_the_finished_job_and_resumes_the_cut_one(sweep):
    assert sweep.again.returncode == 0, sweep.again.stderr
    log = sweep.again.stdout + sweep.again.stderr
    assert f"{sweep.dir / '0'} holds this run, finished: skipping it" in log
    assert f"resuming after round {sweep.interrupted} of 4 from {sweep.dir / '1'}" in log
    assert (sweep.dir / "0" / "results.json").stat().st_mtime_ns == sweep.finished_mtime
    for job in ("0", "1"):
        assert json.loads((sweep.dir / job / "results.json").read_text())["status"] == "done"


@pytest.mark.slow
def test_actors_end_without_a_retried_task(sweep):
    # Flower's terminate task, retried while ray.shutdown() ran, once ended a sweep
    # silently after a job's last round (see engine._actors_killed_at_the_end).
    log = sweep.again.stdout + sweep.again.stderr
    assert "ClientAppActor" not in log


@pytest.mark.slow
def test_resumed_fedadam_run_equals_the_uninterrupted_one(sweep):
    resumed, uninterrupted = _history(sweep.dir / "1"), _history(sweep.dir / "0")
    assert list(resumed["round"]) == [0, 1, 2, 3, 4]
    # Per-round seeds, restored server moments, deterministic ops: bit-identical.
    pd.testing.assert_frame_equal(resumed, uninterrupted, check_exact=True)
    metrics = [
        json.loads((sweep.dir / job / "results.json").read_text())["models"]["federated_logistic"]
        for job in ("1", "0")
    ]
    for key in ("accuracy", "macro_f1", "roc_auc", "pr_auc", "fpr"):
        assert metrics[0][key] == metrics[1][key]


@pytest.fixture(scope="module")
def hung(tmp_path_factory):
    """A run whose failing site hangs past the round timeout, killed with two SIGTERMs after
    round 1; a resume with other settings is refused; the resume that follows makes the
    failing site crash instead (the failure mode is a runtime setting)."""
    root = tmp_path_factory.mktemp("hang")
    run_dir = root / "run"
    args = [
        *BASE,
        "simulation.num_rounds=2",
        "simulation.client_failure_rate=0.34",
        "simulation.failure_mode=hang",
        "simulation.round_timeout=12",
    ]
    first = _Launch([*args, f"hydra.run.dir={run_dir}"], root)
    first.wait_for_checkpoint(run_dir, 1)
    code = first.stop(signal.SIGTERM, signal.SIGTERM)
    survivors = first.survivors()
    again = [*args, f"resume={run_dir}", f"hydra.run.dir={root / 'again'}"]
    refused = _cli(*again, "seed=3", "simulation.num_clients=4", cwd=root)
    # A crashed site's actor restarts (a TensorFlow import) before it can reply: give the
    # round time for that on a busy machine; the timeout is a runtime setting.
    crash = [arg for arg in again if not arg.startswith("simulation.round_timeout=")]
    resumed = _cli(
        *crash, "simulation.failure_mode=crash", "simulation.round_timeout=120", cwd=root
    )
    return SimpleNamespace(
        dir=run_dir,
        code=code,
        output=first.output(),
        survivors=survivors,
        refused=refused,
        resumed=resumed,
    )


@pytest.mark.slow
def test_a_second_sigterm_stops_at_once_and_leaves_nothing_running(hung):
    assert hung.code == 130, hung.output
    assert "SIGTERM: stopping" in hung.output
    assert hung.survivors == []
    assert checkpoint.load(hung.dir).round >= 1


@pytest.mark.slow
def test_a_hanging_site_is_logged_and_counted_and_the_round_completes(hung):
    assert "failed (round 1 train): no reply within 12 s" in hung.output
    history = pd.read_csv(hung.dir / "history.csv")
    assert list(history["failures"]) == [0, 1, 1]
    assert history["train_loss"].iloc[1:].notna().all()


@pytest.mark.slow
def test_resume_with_other_settings_is_refused_naming_them(hung):
    assert hung.refused.returncode == 2
    message = " ".join(hung.refused.stderr.split())
    assert "seed (was 0, now 3)" in message
    assert "simulation.num_clients (was 3, now 4)" in message
    assert "Traceback" not in hung.refused.stderr


@pytest.mark.slow
def test_resume_continues_after_the_last_checkpointed_round(hung):
    assert hung.resumed.returncode == 0, hung.resumed.stderr
    assert f"resuming after round 1 of 2 from {hung.dir}" in hung.resumed.stdout
    history = pd.read_csv(hung.dir / "history.csv")
    assert list(history["round"]) == [0, 1, 2]
    assert json.loads((hung.dir / "results.json").read_text())["status"] == "done"


@pytest.mark.slow
def test_a_crashing_site_is_restarted_and_the_round_completes(hung):
    assert "failed (round 2 train): injected failure" in hung.resumed.stdout
    assert "its process was killed, then restarted" in hung.resumed.stdout
    history = pd.read_csv(hung.dir / "history.csv")
    # Messages sent to the restarting actor wait for it: only the crashed site fails.
    assert history["failures"].iloc[2] == 1
    assert history["eval_failures"].iloc[2] == 1
    clients = pd.read_csv(hung.dir / "clients.csv")
    assert sorted(clients["client"]) == [0, 1, 2]
    assert "error" not in clients.columns


# --- an in-process run with too few replies ----------------------------------------------


@pytest.fixture(scope="module")
def data() -> PreparedData:
    return binary_data(1600, 400, 12, n_informative=6, weights=[0.2], random_state=0)


def _cfg(**simulation):
    base = OmegaConf.load(CONF / "config.yaml")
    cfg = OmegaConf.create(
        {
            "seed": 1,
            "model": OmegaConf.load(CONF / "model" / "logistic.yaml"),
            "strategy": OmegaConf.load(CONF / "strategy" / "fedavg.yaml"),
            "train": base.train,
            "simulation": base.simulation,
        }
    )
    cfg.simulation.num_clients = 3
    for key, value in simulation.items():
        OmegaConf.update(cfg, f"simulation.{key}", value)
    return cfg


def _partitions(n: int) -> list[np.ndarray]:
    return np.array_split(np.random.default_rng(0).permutation(n), 3)


@pytest.mark.slow
def test_too_few_replies_stop_the_run_with_a_resumable_checkpoint(data, tmp_path, make_cfg):
    cfg = _cfg(num_rounds=3, client_failure_rate=0.67)
    with pytest.raises(FedadError) as error:
        run_federated(cfg, data, _partitions(len(data.y_train)), tmp_path)
    message = str(error.value)
    assert "Round 1 got training replies from only 1 of the 3 sampled sites" in message
    assert "simulation.min_clients=2" in message
    assert f"resume={tmp_path}" in message
    meta = checkpoint.read_meta(tmp_path)
    assert meta["round"] == 0
    # Lowering the minimum is allowed on resume.
    cfg.simulation.min_clients = 1
    assert decide(cfg, tmp_path) is Decision.RESUME


@pytest.mark.long
def test_an_interrupted_continuation_leaves_the_finished_run_as_it_was(tmp_path):
    """A finished 2-round run continued to 8 rounds and interrupted after round 3: the folder
    still says done, with the earlier results, comparison and detector, byte for byte."""
    run_dir = tmp_path / "run"
    args = [*BASE, "simulation.stop.patience=0", f"hydra.run.dir={run_dir}"]
    finished = _cli(*args, "simulation.num_rounds=2", cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr
    kept = ["results.json", "comparison.csv", "comparison.md", "history.csv"]
    before = {name: (run_dir / name).read_bytes() for name in kept}
    files = [p for p in (run_dir / "detector").rglob("*") if p.is_file()]
    detector = {p.relative_to(run_dir): p.read_bytes() for p in files}
    assert detector

    longer = _Launch([*args, "simulation.num_rounds=8"], tmp_path)
    longer.wait_for_checkpoint(run_dir, 3)
    assert longer.stop(signal.SIGINT) == 130, longer.output()
    assert "keeps the finished run it held" in longer.output()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "done" and results["settings"]["num_rounds"] == 2
    assert results["continuation"]["status"] == "failed"
    assert "interrupted" in results["continuation"]["error"]
    for name in kept[1:]:
        assert (run_dir / name).read_bytes() == before[name], name
    for name, saved in detector.items():
        assert (run_dir / name).read_bytes() == saved, name
    assert not (run_dir / "failed.json").exists() and not (run_dir / "last_complete").exists()
    # The checkpoint went on: the same continuation resumes after round 3 and completes.
    again = _cli(*args, "simulation.num_rounds=8", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "resuming after round" in again.stdout + again.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "done" and "continuation" not in results
    assert results["settings"]["num_rounds"] == 8
