"""Every named experiment in conf/experiment composes and says what its file says."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fedad.baselines.supervised import SUPERVISED_DEFAULTS

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def _compose(*overrides: str, hydra_cfg: bool = False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra_cfg)


def test_config_yaml_lists_the_groups_after_self():
    """`experiment=<name>` needs a defaults entry; after _self_, so its values win."""
    defaults = yaml.safe_load((CONF / "config.yaml").read_text())["defaults"]
    self_at = defaults.index("_self_")
    later = {k for entry in defaults[self_at + 1 :] if isinstance(entry, dict) for k in entry}
    assert {"experiment", "hparams_search"} <= later, (
        "conf/config.yaml must end its defaults list with\n"
        "  - _self_\n  - experiment: null\n  - hparams_search: null"
    )


def test_the_named_experiments_exist():
    assert {"synthetic_default", "nsl_kdd_cnn", "nsl_kdd_sweep"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes(name):
    text = (CONF / "experiment" / f"{name}.yaml").read_text()
    # Without the header the values would land under `experiment.` and change nothing.
    assert text.startswith("# @package _global_\n")
    assert _compose(f"experiment={name}", hydra_cfg=True).hydra.runtime.choices.experiment == name
    OmegaConf.to_container(_compose(f"experiment={name}"), resolve=True)  # no broken ${...}


def test_synthetic_default_is_the_default_run():
    named = OmegaConf.to_container(_compose("experiment=synthetic_default"))
    assert named == OmegaConf.to_container(_compose())


def test_nsl_kdd_cnn():
    cfg = _compose("experiment=nsl_kdd_cnn", hydra_cfg=True)
    assert cfg.dataset.name == "nsl_kdd"
    assert cfg.dataset.test_file  # a separate test file, not a split of train
    assert cfg.partition.name == "dirichlet"
    assert cfg.partition.alpha == 0.5
    assert cfg.simulation.num_clients == 10
    assert cfg.simulation.num_rounds == 10
    assert cfg.train.local_epochs == 1
    assert cfg.model.name == "cnn"
    assert cfg.strategy.name == "fedavg"
    assert cfg.baselines.name == "supervised"
    assert cfg.federated is True
    assert cfg.hydra.mode is None or cfg.hydra.mode.name == "RUN"


def _sweep_jobs(params: dict) -> list[list[str]]:
    """The jobs the BasicSweeper launches: the product of the comma-separated values."""
    axes = [
        [f"{key}={value}" for value in str(values).split(",")] for key, values in params.items()
    ]
    return [list(job) for job in itertools.product(*axes)]


def test_nsl_kdd_sweep():
    cfg = _compose("experiment=nsl_kdd_sweep", hydra_cfg=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.hydra.sweeper._target_ == "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
    assert cfg.hydra.sweep.dir == "multirun/nsl_kdd_sweep"  # fixed: a re-launch reuses its cache
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    assert params == {
        "partition.alpha": "0.1,0.5,1.0",
        "strategy": "fedavg,fedprox",
        "seed": "0,1,2",
    }
    assert cfg.dataset.name == "nsl_kdd"
    assert cfg.partition.name == "dirichlet"
    assert cfg.simulation.num_clients == 10
    assert cfg.simulation.num_rounds == 5
    assert cfg.baselines.name == "sweep"
    assert set(cfg.baselines.models) == {"central_cnn", "logistic_regression", "random_forest"}
    assert cfg.baselines_cache == "auto"  # the baselines are fitted once per seed
    jobs = _sweep_jobs(params)
    assert len(jobs) == 18
    for job in jobs:
        one = _compose("experiment=nsl_kdd_sweep", *job)
        assert one.dataset.name == "nsl_kdd"
        assert one.strategy.name in {"fedavg", "fedprox"}
        assert one.partition.alpha in {0.1, 0.5, 1.0}


def test_sweep_baselines_are_known_models_with_known_settings():
    models = OmegaConf.to_container(OmegaConf.load(CONF / "baselines" / "sweep.yaml").models)
    for name, settings in models.items():
        assert name in SUPERVISED_DEFAULTS, name
        assert set(settings) <= set(SUPERVISED_DEFAULTS[name]), name
