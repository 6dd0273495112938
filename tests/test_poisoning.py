"""Malicious sites: who they are, what their replies hold, what the robust strategies assume.

A malicious site's reply is checked against its definition on real shards, with the same
function the train handler calls (``attacks.train_site`` around ``family.fit``); bad attack
settings go through ``python -m fedad.simulate`` as a user would type them; the report's
poisoning section is checked on run folders written as the runs write them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.app import ConfigRecord
from generated import binary_data

from fedad.config import compose, make_settings
from fedad.data.prepared import PreparedData
from fedad.errors import FedadError, JobSkipped
from fedad.evaluation.metrics import attack_success_rate
from fedad.federated import attacks
from fedad.federated.families.registry import family_for
from fedad.federated.shards import write_shards
from fedad.federated.simulation import validate as validate_sites
from fedad.federated.task import load_site
from fedad.report.__main__ import write_report
from fedad.run.commandline import check
from fedad.run.validate import validate

REPO = Path(__file__).resolve().parents[1]
SITES = 4


@pytest.fixture(scope="module")
def data() -> PreparedData:
    return binary_data(1200, 400, 10, n_informative=6, weights=[0.4], random_state=2)


def _site_setup(data, tmp_path, *overrides):
    """Real shards and the flat settings the ClientApp reads, for a logistic model."""
    parts = np.array_split(np.arange(len(data.y_train)), SITES)
    write_shards(data, parts, tmp_path)
    cfg = compose(["model=logistic", f"simulation.num_clients={SITES}", "seed=5", *overrides])
    settings = make_settings(cfg, data, SITES, tmp_path)
    family = family_for(settings)
    family.init_runtime()
    family.seed_initial(0)
    start = [w + np.float32(0.1) for w in family.initial_arrays()]
    return settings, family, start


def _reply(family, settings, start, pid, server_round=1):
    site = load_site(settings, pid, ConfigRecord())
    config = ConfigRecord({"server-round": server_round})
    return attacks.train_site(family, start, site, config, settings, pid, SITES, seed=pid)


def _fit(family, settings, start, pid, relabel=None):
    """What ``family.fit`` replies for the site, its labels optionally replaced."""
    site = load_site(settings, pid, ConfigRecord())
    if relabel is not None:
        site.y_train, site.y_val = relabel(site.y_train), relabel(site.y_val)
    return family.fit(start, site, ConfigRecord({"server-round": 1}), seed=pid)


def _split(settings):
    bad = attacks.malicious_sites(int(settings["seed"]), SITES, settings["attack.fraction"])
    good = [p for p in range(SITES) if p not in bad]
    return bad, good


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_sign_flip_site_sends_the_reversed_update_and_honest_sites_their_own(data, tmp_path):
    settings, family, start = _site_setup(
        data, tmp_path, "attack=sign_flip", "attack.fraction=0.5", "attack.k=3"
    )
    bad, good = _split(settings)
    assert len(bad) == 2
    honest, _ = _reply(family, settings, start, good[0])
    assert _same(honest, _fit(family, settings, start, good[0])[0])
    poisoned, metrics = _reply(family, settings, start, bad[0])
    local, fit_metrics = _fit(family, settings, start, bad[0])
    for sent, w, v in zip(poisoned, start, local, strict=True):
        np.testing.assert_allclose(sent, w - 3 * (v - w), rtol=1e-5, atol=1e-6)
    assert metrics["num-examples"] == fit_metrics["num-examples"]  # its honest weight
    # Before attack.start_round the malicious site is honest.
    later = {**settings, "attack.start_round": 2}
    assert _same(_reply(family, later, start, bad[0])[0], local)


def test_label_flip_site_trains_on_flipped_labels(data, tmp_path):
    settings, family, start = _site_setup(
        data, tmp_path, "attack=label_flip", "attack.fraction=0.5"
    )
    bad, good = _split(settings)
    poisoned, _ = _reply(family, settings, start, bad[0])
    assert _same(poisoned, _fit(family, settings, start, bad[0], relabel=lambda y: 1 - y)[0])
    assert not _same(poisoned, _fit(family, settings, start, bad[0])[0])
    assert _same(
        _reply(family, settings, start, good[0])[0], _fit(family, settings, start, good[0])[0]
    )


def test_targeted_site_relabels_attacks_as_normal_and_gaussian_site_sends_noise(data, tmp_path):
    settings, family, start = _site_setup(
        data, tmp_path, "attack=targeted_flip", "attack.fraction=0.25"
    )
    (bad,), _ = _split(settings)
    poisoned, _ = _reply(family, settings, start, bad)
    assert _same(poisoned, _fit(family, settings, start, bad, relabel=np.zeros_like)[0])
    noisy = {**settings, "attack.name": "gaussian", "attack.sigma": 0.5}
    sent, _ = _reply(family, noisy, start, bad)
    noise = np.concatenate([(s - w).ravel() for s, w in zip(sent, start, strict=True)])
    assert abs(noise.std() - 0.5) < 0.1  # noise instead of an update
    assert _same(sent, _reply(family, noisy, start, bad)[0])  # drawn from the round's seed


def test_malicious_sites_are_drawn_by_the_seed_and_fixed():
    chosen = attacks.malicious_sites(3, 20, 0.2)
    assert len(chosen) == 4 and chosen == sorted(set(chosen))
    assert chosen == attacks.malicious_sites(3, 20, 0.2)
    assert any(attacks.malicious_sites(s, 20, 0.2) != chosen for s in range(4, 10))
    assert attacks.malicious_sites(3, 100, 0.29) == attacks.malicious_sites(3, 100, 0.29)
    assert len(attacks.malicious_sites(3, 100, 0.29)) == 29  # not 28 from 0.29 * 100


def test_multiclass_label_flip_gives_every_row_another_class():
    y = np.repeat(np.arange(5), 200)
    flipped = attacks.poison_labels(y, 5, None, np.random.default_rng(0))
    assert not np.any(flipped == y)
    assert set(np.unique(flipped[y == 0])) == {1, 2, 3, 4}
    targeted = attacks.poison_labels(y, 5, [3], np.random.default_rng(0))
    assert np.array_equal(targeted, np.where(y == 3, 0, y))


def test_attack_success_is_the_share_of_targeted_rows_scored_normal():
    confusion = [[50, 5, 0], [10, 30, 0], [4, 4, 12]]
    assert attack_success_rate(confusion, [1]) == pytest.approx(10 / 40)
    assert attack_success_rate(confusion, [1, 2]) == pytest.approx(14 / 60)
    assert attack_success_rate([[5, 0], [0, 0]], [1]) is None


def test_robust_strategies_assume_the_true_attacker_count_unless_told():
    base = ["strategy=krum", "simulation.num_clients=20"]
    assert (
        compose([*base, "attack=label_flip", "attack.fraction=0.2"]).strategy.num_malicious_nodes
        == 4
    )
    assert compose(base).strategy.num_malicious_nodes == 0
    told = compose([*base, "attack=label_flip", "strategy.num_malicious_nodes=1"])
    assert told.strategy.num_malicious_nodes == 1
    # Capped by the sites a round samples.
    few = compose(
        [*base, "attack=sign_flip", "attack.fraction=0.5", "simulation.fraction_train=0.1"]
    )
    assert few.strategy.num_malicious_nodes == 2
    with pytest.raises(JobSkipped, match="n >= 4f \\+ 3"):
        validate(compose(["strategy=bulyan", "attack=sign_flip", "attack.fraction=0.3"]))


def test_target_class_must_be_an_attack_class_of_the_data(data):
    cfg = compose(["task=multiclass", "attack=targeted_flip", "attack.target_class=worm"])
    with pytest.raises(FedadError, match="not an attack class of this data"):
        validate_sites(cfg, [np.arange(10)] * 10, ["normal", "dos", "probe"])


def _simulate(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "fedad.simulate", *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (
            ["attack=label_flip", "attack.fraction=1.0"],
            "attack.fraction must be a number in [0, 1)",
        ),
        (["attack=sign_flip", "attack.start_round=51"], "attack.start_round=51 is past the last"),
        (
            ["privacy=central", "privacy.clipping_norm=0"],
            "privacy.clipping_norm must be a number > 0",
        ),
        (["privacy=client", "privacy.noise_multiplier=0"], "privacy.noise_multiplier must be"),
        (
            ["strategy=krum", "attack=sign_flip", "attack.fraction=0.4"],
            "krum tolerates f attackers",
        ),
    ],
)
def test_bad_attack_and_privacy_settings_exit_2_before_the_run_starts(tmp_path, overrides, named):
    run_dir = tmp_path / "run"
    done = _simulate(tmp_path, f"hydra.run.dir={run_dir}", *overrides)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("fedad: error:") and "Traceback" not in done.stderr
    assert named in " ".join(done.stderr.split())
    assert done.stderr.count("\n\n") == 0  # one paragraph
    assert not run_dir.exists()  # refused before Hydra made the run folder, let alone Ray


def test_a_sweep_skips_jobs_outside_a_strategys_bound_and_the_report_lists_them(tmp_path):
    # Every job is out of bound, so the sweep runs no simulation.
    assert check(["-m", "strategy=krum", "attack=sign_flip", "attack.fraction=0.4,0.5"]) == 2
    sweep = tmp_path / "sweep"
    done = _simulate(
        tmp_path,
        "-m",
        f"hydra.sweep.dir={sweep}",
        "strategy=krum",
        "attack=sign_flip",
        "attack.fraction=0.4,0.5",
    )
    assert done.returncode == 0, done.stderr
    for job in ("0", "1"):
        results = json.loads((sweep / job / "results.json").read_text())
        assert results["status"] == "skipped"
        assert "krum tolerates f attackers" in results["error"]
        assert not (sweep / job / "failed.json").exists()
    text = write_report(sweep).read_text()
    assert "2 skipped" in text and "**skipped**: Cannot start the run: krum tolerates" in text
    assert "Skipped, outside a strategy's bound" in text


def _job(root: Path, name: str, strategy: str, seed: int, attack: str, f1: float, **extra):
    """A finished run folder as fedad.simulate writes it (results.json only)."""
    job = root / name
    job.mkdir(parents=True)
    share = 0.0 if attack == "none" else 0.2
    info = {"attack": {"name": attack, "share": share}, "privacy": extra.pop("privacy", {})}
    model = {
        "kind": "federated",
        "macro_f1": f1,
        "fpr": 0.1,
        "confusion": extra.pop("confusion", [[90, 10], [30, 70]]),
        "per_class_recall": {"normal": 0.9, "attack": 0.7},
        "info": info,
        **extra,
    }
    settings = {"strategy": strategy, "seed": seed, "num_clients": 20, "dataset": "nsl_kdd"}
    (job / "results.json").write_text(
        json.dumps({"status": "done", "settings": settings, "models": {"federated_cnn": model}})
    )


def test_report_shows_macro_f1_drop_and_attack_success_against_the_share(tmp_path):
    clean = {("fedavg", 0): 0.80, ("fedavg", 1): 0.82, ("krum", 0): 0.78, ("krum", 1): 0.80}
    attacked = {("fedavg", 0): 0.50, ("fedavg", 1): 0.62, ("krum", 0): 0.77, ("krum", 1): 0.80}
    for (strategy, seed), f1 in clean.items():
        _job(tmp_path, f"clean_{strategy}_{seed}", strategy, seed, "none", f1)
    for (strategy, seed), f1 in attacked.items():
        success = 0.9 if strategy == "fedavg" else 0.35
        _job(
            tmp_path,
            f"t_{strategy}_{seed}",
            strategy,
            seed,
            "targeted_flip",
            f1,
            attack_success=success,
        )
    text = write_report(tmp_path).read_text()
    table = pd.read_csv(tmp_path / "poisoning.csv")
    fedavg = table[(table["strategy"] == "fedavg") & (table["share"] == 0.2)].iloc[0]
    assert fedavg["drop_mean"] == pytest.approx(np.mean([0.30, 0.20]))
    assert fedavg["attack_success_mean"] == pytest.approx(0.9)
    krum_clean = table[(table["strategy"] == "krum") & (table["share"] == 0)].iloc[0]
    assert krum_clean["drop_mean"] == pytest.approx(0.0)
    assert krum_clean["attack_success_mean"] == pytest.approx(30 / 100)  # from its confusion
    assert "FedAvg drops 0.250 ± 0.071" in text
    assert "best defence krum drops 0.005 ± 0.007 (within 0.02 of its clean run)" in text
    assert (tmp_path / "poisoning_f1.png").exists() and (tmp_path / "attack_success.png").exists()


def test_poisoning_experiment_is_the_issues_grid_within_every_bound():
    cfg = compose(["experiment=nsl_kdd_poisoning"], hydra=True)
    params = dict(cfg.hydra.sweeper.params)
    assert params["attack"].split(",") == ["none", "label_flip", "targeted_flip", "sign_flip"]
    assert len(params["strategy"].split(",")) == 6 and params["seed"] == "0,1,2"
    job = compose(["experiment=nsl_kdd_poisoning", "attack=sign_flip", "strategy=bulyan"])
    assert job.simulation.num_clients == 20 and job.partition.alpha == 0.5
    assert job.strategy.num_malicious_nodes == 4
    validate(job)  # Bulyan's 4f + 3 = 19 replies fit in 20
