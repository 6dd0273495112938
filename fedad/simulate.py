"""`python -m fedad.simulate`: one federated run and its centralized baselines on one split."""

from __future__ import annotations

import json
import logging
import platform
import sys
import time
from pathlib import Path

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from fedad import __version__, cache, comparison
from fedad.baselines.runner import ModelResult, run_baselines
from fedad.data.partition import label_skew, partition, plot_heatmap, summarize
from fedad.data.prepare import prepare
from fedad.data.prepared import PreparedData
from fedad.errors import FedadError, exit_with
from fedad.explain import permutation_importance_table, plot_importance_side_by_side
from fedad.plots import plot_confusion, plot_roc

log = logging.getLogger("fedad")
# Flower's import sets up alembic, whose INFO lines would bury the run's own.
logging.getLogger("alembic").setLevel(logging.WARNING)
# Keras warns about tf.function retracing when batch shapes vary; harmless here.
logging.getLogger("tensorflow").setLevel(logging.ERROR)
CONF = Path(__file__).resolve().parent.parent / "conf"


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
    started = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    # An earlier attempt's failure no longer describes this folder.
    (run_dir / "failed.json").unlink(missing_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    results: dict = {"status": "running", "settings": _settings(cfg), "versions": _versions()}
    _save(results, run_dir)

    data = prepare(
        cfg.dataset, cfg.preprocess, cfg.task, to_absolute_path(cfg.data_dir), int(cfg.seed)
    )
    results["data"] = _describe(data)
    parts, results["partition"] = _partition(cfg, data, run_dir)
    _save(results, run_dir)

    models: list[ModelResult] = []
    if cfg.federated:
        models.append(_federated(cfg, data, parts, run_dir, resume))
        _record(results, models, run_dir)
    epochs = int(cfg.simulation.num_rounds) * int(cfg.train.local_epochs)
    inputs = {
        "dataset": cfg.dataset,
        "preprocess": cfg.preprocess,
        "task": cfg.task,
        "seed": cfg.seed,
        "baselines": cfg.baselines,
        "train": cfg.train,
        "epochs": epochs,
        "models": _model_cfgs(cfg),
    }
    models += cache.cached(
        _cache_dir(cfg),
        inputs,
        lambda: run_baselines(
            cfg.baselines,
            data,
            cfg.train,
            keras_epochs=epochs,
            seed=int(cfg.seed),
            model_cfgs=inputs["models"],
        ),
    )
    _record(results, models, run_dir)
    if models:
        _figures(models, data, run_dir)
        if cfg.explain:
            results["importance"] = _explain(models, data, run_dir, int(cfg.seed))

    federated = [m for m in models if m.kind == "federated"]
    results["validation_macro_f1"] = federated[0].info["validation_macro_f1"] if federated else None
    results["status"] = "done"
    results["wall_seconds"] = round(time.perf_counter() - started, 2)
    _save(results, run_dir)
    print(comparison.to_markdown(comparison.table(models)) if models else "no models ran")
    log.info("outputs in %s", run_dir)
    return results


def _partition(cfg: DictConfig, data: PreparedData, run_dir: Path) -> tuple[list[np.ndarray], dict]:
    parts = partition(
        cfg.partition,
        data.y_train,
        int(cfg.simulation.num_clients),
        int(cfg.seed),
        groups=data.groups_train,
    )
    summary = summarize(parts, data.y_train, data.class_names)
    summary.to_csv(run_dir / "partition.csv", index=False)
    plot_heatmap(
        summary,
        data.class_names,
        run_dir / "partition.png",
        f"{cfg.partition.name} partition of {cfg.dataset.name}",
    )
    skew = label_skew(summary, data.class_names)
    log.info(
        "partition %s: %d clients, sizes %d..%d (median %d), label skew %.3f (0 = IID)",
        cfg.partition.name,
        len(parts),
        summary["n"].min(),
        summary["n"].max(),
        int(summary["n"].median()),
        skew,
    )
    log.info("class counts per client:\n%s", summary.head(20).to_string(index=False))
    return parts, {"clients": len(parts), "label_skew": skew}


def _federated(
    cfg: DictConfig, data: PreparedData, parts: list[np.ndarray], run_dir: Path, resume: bool
) -> ModelResult:
    from fedad.federated import run_federated

    fed = run_federated(cfg, data, parts, run_dir, resume=resume)
    validation = fed.history["client_macro_f1"].dropna()
    return ModelResult(
        name=f"federated_{cfg.model.name}",
        kind="federated",
        metrics=fed.metrics,
        scores=fed.scores,
        train_seconds=fed.train_seconds,
        model=fed.model_path,
        info={
            "strategy": cfg.strategy.name,
            "rounds": int(cfg.simulation.num_rounds),
            # Clients' held-out slices of their own shards: safe to tune on, unlike the test set.
            "validation_macro_f1": float(validation.iloc[-1]) if len(validation) else None,
        },
    )


def _cache_dir(cfg: DictConfig) -> Path | None:
    """Baselines are shared by the jobs of one sweep; a single run computes its own."""
    if cfg.baselines_cache == "auto":
        if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
            return None
        return Path(to_absolute_path(HydraConfig.get().sweep.dir)) / "baseline_cache"
    return Path(to_absolute_path(cfg.baselines_cache)) if cfg.baselines_cache else None


def _model_cfgs(cfg: DictConfig) -> dict:
    """Architectures for the central Keras baselines: the federated one as configured."""
    cfgs = {}
    for path in sorted((CONF / "model").glob("*.yaml")):
        cfgs[path.stem] = OmegaConf.load(path)
    cfgs[cfg.model.name] = cfg.model
    return cfgs


def _record(results: dict, models: list[ModelResult], run_dir: Path) -> None:
    table = comparison.table(models)
    comparison.write(table, run_dir)
    results["models"] = {
        m.name: {"kind": m.kind, **m.metrics, "train_seconds": m.train_seconds, "info": m.info}
        for m in models
    }
    _save(results, run_dir)


def _figures(models: list[ModelResult], data: PreparedData, run_dir: Path) -> None:
    plot_roc(models, run_dir / "roc.png", y_true=data.y_test)
    for m in models:
        names = data.class_names if len(m.metrics["confusion"]) == data.n_classes else None
        plot_confusion(
            m.metrics["confusion"],
            names or ["normal", "attack"],
            m.name,
            run_dir / f"confusion_{m.name}.png",
        )


def _explain(
    models: list[ModelResult], data: PreparedData, run_dir: Path, seed: int
) -> dict[str, list[str]]:
    """Permutation importance of the federated model and the best centralized one."""
    _, X_test = data.scaled()
    supervised = [m for m in models if m.kind == "supervised"]
    chosen = [m for m in models if m.kind == "federated"]
    if supervised:
        chosen.append(max(supervised, key=lambda m: m.metrics.get("macro_f1") or 0.0))
    tables = {}
    for m in chosen:
        predict = _keras_predict(m.model) if m.kind == "federated" else m.model.predict_scores
        table = permutation_importance_table(
            predict, X_test, data.y_test, data.feature_names, seed=seed
        )
        table.to_csv(run_dir / f"importance_{m.name}.csv", index=False)
        tables[m.name] = table
    if tables:
        plot_importance_side_by_side(tables, run_dir / "importance.png")
    return {name: t["feature"].head(10).tolist() for name, t in tables.items()}


def _keras_predict(model_path: Path):
    import keras

    model = keras.models.load_model(model_path)
    # A direct call, not predict(): permutation importance calls this hundreds of times.
    return lambda X: keras.ops.convert_to_numpy(model(X, training=False))


def _describe(data: PreparedData) -> dict:
    notes = {k: v for k, v in data.notes.items() if k != "audit"}
    return {
        "n_train": int(len(data.y_train)),
        "n_test": int(len(data.y_test)),
        "n_features": data.n_features,
        "classes": data.class_names,
        "train_class_counts": np.bincount(data.y_train, minlength=data.n_classes).tolist(),
        "test_class_counts": np.bincount(data.y_test, minlength=data.n_classes).tolist(),
        **notes,
    }


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
    }


def _versions() -> dict:
    import flwr
    import sklearn

    return {
        "fedad": __version__,
        "python": platform.python_version(),
        "flwr": flwr.__version__,
        "scikit-learn": sklearn.__version__,
    }


def _save(results: dict, run_dir: Path) -> None:
    tmp = run_dir / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2, default=_jsonable))
    tmp.replace(run_dir / "results.json")


def _jsonable(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; a user error ends the run with one paragraph, not a traceback.

    Returns the federated model's validation macro-F1, the objective a Hydra
    sweeper such as Optuna maximizes (never a test-set score). A folder that
    already holds this run is skipped if it finished and resumed if it has a
    checkpoint (see :func:`_previous_run`); Ctrl-C or SIGTERM end the run (and
    a sweep) with status 130 and a line saying how to continue.
    """
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    sweeping = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        if cfg.resume:
            run_dir = _resume_dir(str(cfg.resume), sweeping)
        previous = _previous_run(cfg, run_dir, required=bool(cfg.resume))
        if previous == "done":
            log.info("%s holds this run, finished: skipping it", run_dir)
            return json.loads((run_dir / "results.json").read_text())["validation_macro_f1"]
        return run(cfg, run_dir, resume=previous == "resume")["validation_macro_f1"]
    except FedadError as err:
        _fail(run_dir, " ".join(str(err).split()))
        if not sweeping:
            exit_with(err)
    except Exception as err:
        if not sweeping:
            raise
        # One broken job must not end the sweep; the report lists it as failed.
        log.exception("job failed")
        _fail(run_dir, f"{type(err).__name__}: {err}")
    except KeyboardInterrupt:
        print(f"fedad: interrupted; {_how_to_continue(run_dir, sweeping)}.", file=sys.stderr)
        raise SystemExit(130) from None
    return None


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


def _previous_run(cfg: DictConfig, run_dir: Path, required: bool) -> str | None:
    """What ``run_dir`` holds of this run: ``"done"``, ``"resume"`` (a checkpoint) or None.

    "done" needs ``results.json`` saying so and a ``config.yaml`` equal to
    ``cfg`` up to the runtime settings. A checkpoint of other settings, or a
    finished run of other settings and no checkpoint to continue, raise
    :class:`FedadError` naming the keys that differ, so nothing finished is
    overwritten. With ``required``, a folder without a checkpoint raises too.
    """
    finished = _status(run_dir) == "done"
    # Checked by name: the checkpoint module imports TensorFlow, which a fresh run
    # (and an early data error) need not wait for.
    if not finished and not (run_dir / "checkpoint" / "meta.json").exists():
        if required:
            raise FedadError(
                f"Cannot resume {run_dir}: it holds no checkpoint (checkpoint/meta.json). "
                "It stopped before its first round, or ran with simulation.checkpoint_every=0."
            )
        return None
    from fedad.federated import checkpoint

    differing = ["its settings are unknown (config.yaml is missing)"]
    saved = run_dir / "config.yaml"
    if finished and saved.exists():
        runtime = checkpoint.RUNTIME_KEYS
        ours = checkpoint.config_fingerprint(cfg, ignore=runtime)
        differing = checkpoint.differences(
            checkpoint.config_fingerprint(OmegaConf.load(saved), ignore=runtime), ours
        )
        if not differing:
            return "done"
    meta = checkpoint.read_meta(run_dir)
    if meta is not None:
        checkpoint.require_compatible(meta, cfg, where=run_dir)
        # A damaged state file fails here, before the data is prepared again.
        checkpoint.load(run_dir)
        return "resume"
    raise FedadError(
        f"{run_dir} holds a finished run of other settings, left as it is; differing: "
        f"{'; '.join(differing)}. Write to another folder (hydra.run.dir=..., or "
        "hydra.sweep.dir=... for a multirun), or delete this one to run it again."
    )


def _status(run_dir: Path) -> str | None:
    """The ``status`` in ``run_dir/results.json``; None if there is none or it is unreadable."""
    try:
        return json.loads((run_dir / "results.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def _fail(run_dir: Path, error: str) -> None:
    # A finished run that a new one refused to overwrite keeps its record as it is.
    if _status(run_dir) != "done":
        failed = json.dumps({"status": "failed", "error": error}, indent=2)
        (run_dir / "failed.json").write_text(failed)
    log.error("job failed: %s", error)


if __name__ == "__main__":
    main()
