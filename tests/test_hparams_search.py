"""conf/hparams_search/optuna.yaml composes into a valid Optuna search (no trial is run)."""

from __future__ import annotations

import warnings

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep
from omegaconf import OmegaConf

from fedad.config import compose

with warnings.catch_warnings():
    # optuna 2.10 uses names SQLAlchemy 2 deprecates; only its RDB storage (unused) needs them.
    warnings.simplefilter("ignore", DeprecationWarning)
    pytest.importorskip(
        "hydra_plugins.hydra_optuna_sweeper",
        reason="hydra-optuna-sweeper is not installed: pip install -e '.[optuna]'",
    )

SEARCHED = {
    "train.learning_rate",
    "train.local_epochs",
    "train.batch_size",
    "strategy.proximal_mu",
}


def _compose(*overrides: str):
    return compose(["hparams_search=optuna", *overrides], hydra=True)


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
    # Parsed by Hydra's override grammar, which the sweeper turns into Optuna distributions.
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    space = {o.get_key_element(): o.value() for o in parsed}
    assert all(o.is_sweep_override() for o in parsed)
    assert space["train.learning_rate"].start < cfg.train.learning_rate
    assert space["train.learning_rate"].end > cfg.train.learning_rate
    # Learning rate and proximal_mu span orders of magnitude: sampled on a log scale.
    for key in ("train.learning_rate", "strategy.proximal_mu"):
        assert isinstance(space[key], IntervalSweep) and "log" in space[key].tags, key
    assert space["train.local_epochs"] == ChoiceSweep(list=[1, 2, 3])
    assert space["train.batch_size"] == ChoiceSweep(list=[32, 64, 128])


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
