"""`python -m fedad.simulate`: one federated run and its centralized baselines on one split."""

from __future__ import annotations

import errno
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from fedad import rundir
from fedad.baselines.runner import run_baselines, with_twin
from fedad.baselines.twins import cache_inputs
from fedad.config import CONF_DIR, CONFIG_NAME, available_options, load_option
from fedad.data.federation import check_files
from fedad.detector.build import write_detectors
from fedad.errors import FedadError, JobSkipped, exit_with
from fedad.evaluation import comparison
from fedad.evaluation.comparison import ModelResult
from fedad.evaluation.decision import Rule
from fedad.evaluation.importance import explain
from fedad.evaluation.plots import plot_confusion, plot_eda, plot_roc
from fedad.evaluation.shapley import explain_shap
from fedad.run import cache, commandline, continuation
from fedad.run.cross_source import cross_source_matrix
from fedad.run.pipeline import RunData, prepare_run
from fedad.run.resume import Decision, decide
from fedad.run.validate import validate
from fedad.versions import versions

if TYPE_CHECKING:
    from fedad.federated.engine import EngineStart

log = logging.getLogger("fedad")
# Errors of a write the user can fix (space, permissions); any other OSError is a bug to show.
WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
# Flower's import sets up alembic, whose INFO lines would bury the run's own.
logging.getLogger("alembic").setLevel(logging.WARNING)
# Keras warns about tf.function retracing when batch shapes vary; harmless here.
logging.getLogger("tensorflow").setLevel(logging.ERROR)


def run(cfg: DictConfig, run_dir: Path, resume: bool = False) -> dict:
    """Prepare the data, partition it, train every selected model and write the outputs.

    Each finished step writes its files at once, so an error later in the run
    loses nothing already computed.

    Parameters
    ----------
    cfg : DictConfig
        The composed ``conf/config.yaml``.
    run_dir : Path
        Where outputs go (Hydra's run directory).
    resume : bool
        Continue the federated training from the checkpoint in ``run_dir``;
        data preparation and partitioning are deterministic and run again
        (the checkpoint's data fingerprint shows they came out the same).

    Returns
    -------
    dict
        The content of ``results.json``.
    """
    validate(cfg)
    started = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    # An earlier attempt's failure no longer describes this folder.
    (run_dir / rundir.FAILED_FILE).unlink(missing_ok=True)
    if resume and continuation.keep(run_dir):
        log.info(
            "%s holds a finished run: it is kept in %s/ until this continuation completes",
            run_dir,
            continuation.KEPT_DIR,
        )
    rundir.write_text(run_dir / rundir.CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))
    results: dict = {"status": rundir.RUNNING, "settings": _settings(cfg), "versions": versions()}
    rundir.save_results(run_dir, results)

    models: list[ModelResult] = []
    # Ray and the actors start while the data is prepared (a failure on the way ends them),
    # once the data files are known to be there: a missing one is reported at once.
    check_files(cfg.dataset, to_absolute_path(cfg.data_dir))
    engine = _start_engine(cfg) if cfg.federated else None
    try:
        prepared = prepare_run(cfg, run_dir)
        results.update(prepared.facts)
        if cfg.eda:
            data = prepared.data  # training rows only: the test set stays unseen
            results["eda_features"] = plot_eda(
                data.X_train,
                data.y_train != 0,
                data.feature_names,
                run_dir / rundir.EDA_PNG,
                int(cfg.seed),
            )
        rundir.save_results(run_dir, results)
        if cfg.federated:
            models += _federated(cfg, prepared, run_dir, resume, engine)
            _record(results, models, run_dir)
    except BaseException:
        if engine is not None:
            engine.close(keep=False)  # a multirun's next job starts afresh
        raise
    if engine is not None:
        engine.close()
    models += _baselines(cfg, prepared)
    if prepared.data.sources_test is not None:
        results["cross_source"] = cross_source_matrix(cfg, prepared.data, models, run_dir)
    _record(results, models, run_dir)
    if models:
        _figures(models, prepared, run_dir)
        if cfg.explain:
            results["importance"] = explain(models, prepared.data, run_dir, int(cfg.seed))
            results["shap"] = explain_shap(models, prepared.data, run_dir, int(cfg.seed))
    if cfg.detector.write and models:
        results["detectors"] = write_detectors(cfg, prepared.data, prepared.parts, models, run_dir)

    federated = [m for m in models if m.kind == "federated"]
    results["validation_macro_f1"] = federated[0].info["validation_macro_f1"] if federated else None
    results["status"] = rundir.DONE
    results["wall_seconds"] = round(time.perf_counter() - started, 2)
    rundir.save_results(run_dir, results)
    continuation.finish(run_dir)
    table = comparison.table(models, results["data"]["pooling_mb"])
    small = results["data"]["small_test_classes"]
    print(comparison.to_markdown(table, small) if models else "no models ran")
    log.info("outputs in %s", run_dir)
    return results


def _federated(
    cfg: DictConfig, prepared: RunData, run_dir: Path, resume: bool, started: EngineStart | None
) -> list[ModelResult]:
    """The federated model (a histogram run's pinned twin after it), then each site alone."""
    from fedad.federated.histogram.twin import with_booster_facts
    from fedad.federated.simulation import run_federated

    models = run_federated(cfg, prepared.data, prepared.parts, run_dir, resume, started)
    return with_booster_facts(cfg, prepared.data, prepared.parts, run_dir, models)


def _start_engine(cfg: DictConfig) -> EngineStart:
    # Imported here, not with the module: Flower and Ray take seconds, which a
    # run without federated training (or a bad setting) does not need.
    from fedad.federated.simulation import start_engine

    engine = start_engine(cfg)
    # A multirun's jobs run one after another in this process: one whose simulation ends
    # normally leaves Ray and the actors to the next (EngineStart.keep).
    engine.keep = _sweeping()
    return engine


def _baselines(cfg: DictConfig, prepared: RunData) -> list[ModelResult]:
    """The centralized baselines, reused from the sweep's cache when they ran before."""
    epochs = int(cfg.simulation.num_rounds) * int(cfg.train.local_epochs)
    # Architectures for the central Keras baselines: the federated one as configured.
    model_cfgs = {name: load_option("model", name) for name in available_options("model")}
    model_cfgs[cfg.model.name] = cfg.model
    decision = Rule(str(cfg.decision.rule), target_fpr=cfg.decision.target_fpr)
    # The twin (always run beside a federated model) fits on every training row unless capped.
    baselines = with_twin(cfg.baselines, cfg.model.name) if cfg.federated else cfg.baselines
    inputs = {
        "dataset": cfg.dataset,
        "preprocess": cfg.preprocess,
        "task": cfg.task,
        "seed": cfg.seed,
        # The caps that apply, not which model is the twin: a sweep over models shares its
        # baselines wherever no cap bites.
        "baselines": cache_inputs(baselines, prepared.data),
        "train": cfg.train,
        "epochs": epochs,
        "models": model_cfgs,
        # The validation refit and its threshold exist to choose and tune a detector.
        "detector": cfg.detector,
        # A calibrated rule rescores every model (argmax, as before it existed, adds nothing).
        **({"decision": cfg.decision} if decision.rule != "argmax" else {}),
    }
    return cache.cached(
        _cache_dir(cfg),
        inputs,
        lambda: run_baselines(
            baselines,
            prepared.data,
            cfg.train,
            keras_epochs=epochs,
            seed=int(cfg.seed),
            model_cfgs=model_cfgs,
            validate=bool(cfg.detector.write),
            target_fpr=cfg.detector.target_fpr,
            decision=decision,
        ),
    )


def _cache_dir(cfg: DictConfig) -> Path | None:
    """Baselines are shared by the jobs of one sweep; a single run computes its own."""
    if cfg.baselines_cache == "auto":
        if not _sweeping():
            return None
        return Path(to_absolute_path(HydraConfig.get().sweep.dir)) / "baseline_cache"
    return Path(to_absolute_path(cfg.baselines_cache)) if cfg.baselines_cache else None


def _sweeping() -> bool:
    """Whether this is a job of a Hydra multirun (its jobs share this process)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _record(results: dict, models: list[ModelResult], run_dir: Path) -> None:
    table = comparison.table(models, results["data"]["pooling_mb"])
    comparison.write(table, run_dir, results["data"]["small_test_classes"])
    moved = dict(zip(table["model"], table["mb_exchanged"], strict=True))
    results["models"] = {
        m.name: {
            "kind": m.kind,
            **m.metrics,
            "train_seconds": m.train_seconds,
            "mb_exchanged": moved[m.name],
            "info": m.info,
        }
        for m in models
    }
    rundir.save_results(run_dir, results)


def _figures(models: list[ModelResult], prepared: RunData, run_dir: Path) -> None:
    data = prepared.data
    scored = [m for m in models if m.scores is not None]
    plot_roc(scored, run_dir / rundir.ROC_PNG, y_true=data.y_test)
    for m in models:
        names = data.class_names if len(m.metrics["confusion"]) == data.n_classes else None
        plot_confusion(
            m.metrics["confusion"],
            names or ["normal", "attack"],
            m.name,
            run_dir / rundir.confusion_png(m.name),
        )


def _settings(cfg: DictConfig) -> dict:
    return {
        "dataset": cfg.dataset.name,
        "task": cfg.task,
        "partition": cfg.partition.name,
        "alpha": cfg.partition.get("alpha"),
        "num_clients": cfg.simulation.num_clients,
        "num_rounds": cfg.simulation.num_rounds,
        "model": cfg.model.name,
        "strategy": cfg.strategy.name,
        "seed": cfg.seed,
        "attack": cfg.get("attack", {}).get("name", "none"),
        "privacy": cfg.get("privacy", {}).get("name", "none"),
        "decision": cfg.decision.rule,
    }


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=CONFIG_NAME)
def job(cfg: DictConfig) -> float | None:
    """One Hydra job; a user error ends it with one paragraph, not a traceback.

    Returns the federated model's validation macro-F1, the objective a Hydra
    sweeper such as Optuna maximizes (never a test-set score). A folder that
    already holds this run is skipped if it finished and resumed if it has a
    checkpoint (see :func:`fedad.run.resume.decide`); Ctrl-C or SIGTERM end the
    run (and a sweep) with status 130 and a line saying how to continue.
    """
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    sweeping = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        if cfg.resume:
            run_dir = _resume_dir(str(cfg.resume), sweeping)
        decision = decide(cfg, run_dir, required=bool(cfg.resume))
        if decision is Decision.DONE:
            log.info("%s holds this run, finished: skipping it", run_dir)
            return rundir.read_results(run_dir)["validation_macro_f1"]
        return run(cfg, run_dir, resume=decision is Decision.RESUME)["validation_macro_f1"]
    except JobSkipped as err:
        if not sweeping:
            exit_with(err)
        # Valid settings the chosen method cannot serve: the sweep goes on without this job.
        rundir.mark_skipped(run_dir, " ".join(str(err).split()), _settings(cfg))
        log.warning("job skipped: %s", err)
    except FedadError as err:
        _failed(run_dir, " ".join(str(err).split()))
        log.error("job failed: %s", err)
        if not sweeping:
            exit_with(err)
    except KeyboardInterrupt:
        _failed(run_dir, "interrupted (Ctrl-C or SIGTERM)")
        print(f"fedad: interrupted; {_how_to_continue(run_dir, sweeping)}.", file=sys.stderr)
        raise SystemExit(130) from None
    except OSError as err:
        if err.errno not in WRITE_ERRORS:
            raise
        problem = FedadError(
            f"Writing into {run_dir} failed: {err.strerror} ({err.filename}). Free space or "
            "fix the folder's permissions, or write elsewhere (hydra.run.dir=...). Every file "
            "fedad writes is replaced whole or not at all, so what was complete is kept."
        )
        _failed(run_dir, str(problem))
        if not sweeping:
            exit_with(problem)
        log.error("job failed: %s", problem)
    except Exception as err:
        _failed(run_dir, f"{type(err).__name__}: {err}")
        if not sweeping:
            raise
        # One broken job must not end the sweep; the report lists it as failed.
        log.exception("job failed")
    return None


def _failed(run_dir: Path, error: str) -> None:
    """Record the failure; a failed continuation gives the folder back its complete run."""
    try:
        restored = continuation.fail(run_dir, error)
    except OSError:
        # A full disk may refuse this record too; the complete files are kept either way.
        return
    if restored:
        log.warning(
            "the continuation did not complete (%s); %s keeps the finished run it held "
            "(results.json, comparison, models and detectors put back)",
            error,
            run_dir,
        )


def _how_to_continue(run_dir: Path, sweeping: bool) -> str:
    from fedad.federated import checkpoint

    meta = checkpoint.read_meta(run_dir)
    if sweeping:
        sweep_dir = Path(to_absolute_path(HydraConfig.get().sweep.dir))
        return f"launch the same command with hydra.sweep.dir={sweep_dir} to resume the sweep"
    if meta is None:
        return "no round was checkpointed, so there is nothing to resume"
    return f"round {meta['round']} is checkpointed: add resume={run_dir} to the same command"


def _resume_dir(resume: str, sweeping: bool) -> Path:
    if sweeping:
        raise FedadError(
            "resume= continues one run. A multirun resumes by itself: launch it again with "
            "the same arguments and the same hydra.sweep.dir (see docs/long_runs.md)."
        )
    run_dir = Path(to_absolute_path(resume))
    if not run_dir.is_dir():
        raise FedadError(f"resume={resume}: there is no such folder.")
    return run_dir


def main(argv: list[str] | None = None) -> None:
    """``python -m fedad.simulate [overrides]``: check every job's settings, then run them.

    Parameters
    ----------
    argv : list[str], optional
        Default: ``sys.argv[1:]``. A bad setting in any job ends the command
        with one paragraph (status 2) before any data is read.
    """
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        commandline.check(sys.argv[1:])
    except FedadError as err:
        exit_with(err)
    job()


if __name__ == "__main__":
    main()
