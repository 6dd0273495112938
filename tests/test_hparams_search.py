"""conf/hparams_search/optuna.yaml composes into a valid Optuna search (no trial is run)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

with warnings.catch_warnings():
    # optuna 2.10 uses names SQLAlchemy 2 deprecates; only its RDB storage (unused) needs them.
    warnings.simplefilter("ignore", DeprecationWarning)
    pytest.importorskip(
        "hydra_plugins.hydra_optuna_sweeper",
        reason="hydra-optuna-sweeper is not installed: pip install -e '.[optuna]'",
    )
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
    from optuna.distributions import CategoricalDistribution

CONF = Path(__file__).resolve().parents[1] / "conf"
SEARCHED = {
    "train.learning_rate",
    "train.local_epochs",
    "train.batch_size",
    "strategy.proximal_mu",
}


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            "config", overrides=["hparams_search=optuna", *overrides], return_hydra_config=True
        )


def test_selects_the_optuna_sweeper_maximizing():
    sweeper = _compose().hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert sweeper.direction == "maximize"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert isinstance(sweeper.sampler.seed, int)
    assert sweeper.n_trials == 20
    assert sweeper.n_jobs == 1
    # optuna 2.10 cannot open an RDB storage under SQLAlchemy 2: it must stay in memory.
    assert sweeper.storage is None


def test_searches_the_federated_model_only():
    cfg = _compose()
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.baselines.name == "none"
    assert not cfg.baselines.models
    assert cfg.federated is True
    assert cfg.strategy.name == "fedprox"


def test_search_space_names_existing_keys_with_sensible_distributions():
    cfg = _compose()
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    assert set(params) == SEARCHED
    for key in params:
        # The sweeper overrides these keys; an absent one would fail every trial.
        assert OmegaConf.select(cfg, key) is not None, key
    # Parsed as the sweeper parses them at launch.
    space, fixed = create_params_from_overrides([f"{k}={v}" for k, v in params.items()])
    assert not fixed
    assert space["train.learning_rate"].low < cfg.train.learning_rate
    assert space["train.learning_rate"].high > cfg.train.learning_rate
    # Learning rate and proximal_mu span orders of magnitude: sampled on a log scale.
    for key in ("train.learning_rate", "strategy.proximal_mu"):
        dist = space[key]
        assert getattr(dist, "log", None) or type(dist).__name__ == "LogUniformDistribution", key
    assert space["train.local_epochs"] == CategoricalDistribution([1, 2, 3])
    assert space["train.batch_size"] == CategoricalDistribution([32, 64, 128])


def test_a_sampled_trial_composes():
    """The overrides of one trial, as the sweeper passes them, give a valid job config."""
    cfg = _compose(
        "train.learning_rate=0.0003",
        "train.local_epochs=3",
        "train.batch_size=128",
        "strategy.proximal_mu=0.01",
    )
    assert cfg.train.learning_rate == 0.0003
    assert cfg.train.local_epochs == 3
    assert cfg.strategy.proximal_mu == 0.01
