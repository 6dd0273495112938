"""The sweep report: tidy table, mean ± std over seeds, gaps, failures, figures and CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedad.errors import FedadError
from fedad.report import collect, summarize
from fedad.report.__main__ import main, write_report
from fedad.report.tables import finished_jobs, group_keys, job_gaps
from fedad.versions import __version__

METRICS = ("accuracy", "precision", "recall", "f1", "macro_f1", "roc_auc", "pr_auc", "fpr")
# Federated, twin centralized and best-baseline macro-F1 per (strategy, seed).
F1 = {
    ("fedavg", 0): (0.80, 0.95, 0.97),
    ("fedavg", 1): (0.90, 0.97, 0.99),
    ("fedprox", 0): (0.82, 0.95, 0.97),
    ("fedprox", 1): (0.86, 0.97, 0.99),
}
STD_FEDAVG = math.sqrt(2 * 0.05**2)  # pandas' sample std (ddof=1) of 0.80 and 0.90


def _scores(macro_f1: float, kind: str) -> dict:
    # Every other metric is derived from macro-F1 so each aggregate is known exactly.
    return {
        "kind": kind,
        **{m: round(macro_f1 - 0.01, 4) for m in METRICS},
        "macro_f1": macro_f1,
        "fpr": round(1 - macro_f1, 4),
        "weighted_f1": macro_f1,
        "train_seconds": 1.5,
    }


def make_run(
    job: Path,
    overrides: list[str],
    settings: dict | None = None,
    models: dict[str, tuple[float, str]] | None = None,
    status: str = "done",
    error: str | None = None,
    rounds: int = 3,
    clients: list[float] | None = None,
) -> Path:
    """Fabricate what ``fedad.simulate`` writes into one run directory.

    ``models`` maps a model name to ``(macro_f1, kind)``; ``settings`` overrides the
    defaults of results.json; ``error`` adds failed.json; ``clients`` lists client macro-F1.
    """
    job.mkdir(parents=True)
    (job / ".hydra").mkdir()
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (job / ".hydra" / "config.yaml").write_text("seed: 0\n")
    base = {
        "dataset": "synthetic",
        "task": "binary",
        "partition": "dirichlet",
        "alpha": 0.5,
        "num_clients": 4,
        "num_rounds": rounds,
        "model": "cnn",
        "strategy": "fedavg",
        "seed": 0,
    }
    results = {
        "status": status,
        "settings": {**base, **(settings or {})},
        "versions": {"fedad": __version__},
        "data": {"n_train": 100, "n_test": 50},
        "partition": {"clients": 4, "label_skew": 0.3},
        "models": {name: _scores(f1, kind) for name, (f1, kind) in (models or {}).items()},
        "wall_seconds": 12.0,
    }
    (job / "results.json").write_text(json.dumps(results))
    if error is not None:
        (job / "failed.json").write_text(json.dumps({"status": "failed", "error": error}))
    if models:
        rows = [
            {"model": n, "federated": v["kind"] == "federated", **v}
            for n, v in results["models"].items()
        ]
        pd.DataFrame(rows).to_csv(job / "comparison.csv", index=False)
    (job / "partition.csv").write_text("client,n,normal,attack\n0,30,20,10\n1,20,5,15\n")
    (job / "partition.png").write_bytes(b"\x89PNG fake heatmap")
    fed = [f1 for f1, kind in (models or {}).values() if kind == "federated"]
    if fed:
        history = pd.DataFrame(
            {
                "round": range(rounds + 1),
                "loss": [1.0 / (r + 1) for r in range(rounds + 1)],
                "macro_f1": [fed[0] * r / rounds for r in range(rounds + 1)],
                "seconds": 0.5,
                "failures": 0,
            }
        )
        history.to_csv(job / "history.csv", index=False)
        scores = clients if clients is not None else [fed[0] - 0.2, fed[0], fed[0] + 0.05]
        pd.DataFrame({"client": range(len(scores)), "n_examples": 25, "macro_f1": scores}).to_csv(
            job / "clients.csv", index=False
        )
    return job


@pytest.fixture()
def sweep(tmp_path) -> Path:
    """A 2 strategies × 2 seeds Hydra multirun; every job is done."""
    root = tmp_path / "multirun"
    for num, ((strategy, seed), (fed, twin, forest)) in enumerate(F1.items()):
        make_run(
            root / str(num),
            [f"strategy={strategy}", f"seed={seed}"],
            {"strategy": strategy, "seed": seed},
            {
                "federated_cnn": (fed, "federated"),
                "central_cnn": (twin, "supervised"),
                "random_forest": (forest, "supervised"),
            },
        )
    (root / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    return root


def test_collect_has_one_row_per_job_and_model(sweep):
    tidy = collect(sweep)
    assert len(tidy) == 12
    assert sorted(tidy["job"].unique()) == ["0", "1", "2", "3"]
    assert list(tidy.columns[:4]) == ["job", "status", "strategy", "seed"]
    assert {"federated_model", "alpha", "model", "kind", "federated", "macro_f1"} <= set(tidy)
    assert set(tidy["status"]) == {"done"}
    fed = tidy[tidy["federated"].astype(bool)]
    assert fed["model"].unique().tolist() == ["federated_cnn"]
    row = tidy[(tidy["job"] == "3") & (tidy["model"] == "random_forest")].iloc[0]
    assert (row["strategy"], row["seed"], row["macro_f1"]) == ("fedprox", 1, 0.99)


def test_summarize_gives_exact_mean_and_sample_std(sweep):
    summary = summarize(collect(sweep))
    assert len(summary) == 6  # 2 strategies × 3 models; seed is averaged out
    assert list(summary.columns[:5]) == ["strategy", "model", "kind", "federated", "n"]
    fedavg = summary[(summary["strategy"] == "fedavg") & (summary["model"] == "federated_cnn")]
    row = fedavg.iloc[0]
    assert row["n"] == 2
    assert row["macro_f1_mean"] == pytest.approx(0.85)
    assert row["macro_f1_std"] == pytest.approx(STD_FEDAVG)  # ddof=1
    assert row["fpr_mean"] == pytest.approx(0.15)
    assert row["f1_mean"] == pytest.approx(0.84)
    forest = summary[summary["model"] == "random_forest"]
    assert forest["macro_f1_mean"].tolist() == pytest.approx([0.98, 0.98])


def test_report_lists_gap_spread_and_failed_job(sweep, tmp_path):
    make_run(
        sweep / "4",
        ["strategy=fedyogi", "seed=0"],
        {"strategy": "fedyogi"},
        status="running",
        error="The fedyogi server diverged: loss became NaN in round 2. Lower the server rate.",
    )
    make_run(
        sweep / "5",
        ["strategy=fedavg", "seed=2"],
        {"seed": 2},
        {"random_forest": (0.5, "supervised")},
        status="running",
    )
    out = tmp_path / "report"
    report = write_report(sweep, out)
    assert report == out / "report.md"
    text = report.read_text()
    tidy = pd.read_csv(out / "report.csv")
    assert len(tidy) == 12 + 1 + 1
    assert set(tidy.loc[tidy["job"] == 4, "status"]) == {"failed"}
    # Headline: best federated is fedavg (0.85), best centralized random_forest (0.98).
    assert "`federated_cnn` (strategy=fedavg): macro-F1 0.850 ± 0.071 (n=2)" in text
    assert "`random_forest`: macro-F1 0.980 ± 0.014 (n=2)" in text
    assert "-0.130 macro-F1" in text
    # Gaps are against the twin central_cnn, worst first: fedprox -0.12, then fedavg -0.11.
    gap = text.split("## The price of federation per setting and family")[1].split("##")[0]
    fedprox = "| fedprox | `federated_cnn` | central_cnn | 2 | 0.840 ± 0.028 | 0.960 ± 0.014 |"
    fedavg = "| fedavg | `federated_cnn` | central_cnn | 2 | 0.850 ± 0.071 | 0.960 ± 0.014 |"
    assert gap.index(fedprox) < gap.index(fedavg)
    assert fedavg + " -0.110 ± 0.057 |" in gap
    assert "**Largest loss:** strategy=fedprox: gap -0.120 ± 0.014 against `central_cnn`" in text
    # Site spread: worst client is federated − 0.2, so fedavg's worst is 0.65 ± 0.071.
    assert "| fedavg | 2 | 3 | 0.650 ± 0.071 | 0.850 ± 0.071 | 0.900 ± 0.071 |" in text
    failed = text.split("## Failed or incomplete jobs")[1]
    assert "- `4` (strategy=fedyogi, seed=0) — **failed**: The fedyogi server diverged" in failed
    assert "- `5` (strategy=fedavg, seed=2) — **incomplete**" in failed
    assert "`random_forest`" in failed
    # Failed and incomplete jobs stay out of the aggregates.
    assert "fedyogi" not in text.split("## Failed or incomplete jobs")[0]
    summary = pd.read_csv(out / "summary.csv")
    assert summary["n"].max() == 2
    for name in ("convergence", "gap", "site_spread"):
        assert (out / f"{name}.png").stat().st_size > 0
        assert f"({name}.png)" in text
    assert not (out / "f1_vs_alpha.png").exists()  # alpha was not swept
    assert (out / "heatmaps" / "partition.png").exists()
    assert "(heatmaps/partition.png)" in text


def test_alpha_and_clients_sweeps_get_their_plots(tmp_path):
    root = tmp_path / "sweep"
    num = 0
    for alpha in (0.1, 1.0):
        for clients in (4, 8):
            for seed in (0, 1):
                fed = 0.6 + alpha / 10 - clients / 100 + seed / 100
                make_run(
                    root / str(num),
                    [
                        f"partition.alpha={alpha}",
                        f"simulation.num_clients={clients}",
                        f"seed={seed}",
                    ],
                    {"alpha": alpha, "num_clients": clients, "seed": seed},
                    {"federated_logistic": (fed, "federated"), "xgboost": (0.9, "supervised")},
                )
                num += 1
    text = write_report(root).read_text()
    summary = summarize(collect(root))
    assert list(summary.columns[:3]) == ["alpha", "num_clients", "model"]
    row = summary[(summary["alpha"] == 0.1) & (summary["num_clients"] == 8)].iloc[0]
    assert row["macro_f1_mean"] == pytest.approx(0.6 + 0.01 - 0.08 + 0.005)
    for name in ("f1_vs_alpha", "f1_vs_clients", "convergence", "gap", "site_spread"):
        assert (root / f"{name}.png").exists()
    # No central_logistic: the reference is the job's best centralized model.
    assert "| 0.1 | 8 | `federated_logistic` | xgboost | 2 |" in text
    heatmaps = sorted(p.name for p in (root / "heatmaps").iterdir())
    assert heatmaps == [f"alpha={a}_num_clients={c}.png" for a in (0.1, 1) for c in (4, 8)]


def test_single_run_and_comparison_fallback(tmp_path):
    run = make_run(
        tmp_path / "run",
        [],
        models={"federated_cnn": (0.7, "federated"), "knn": (0.8, "supervised")},
    )
    data = json.loads((run / "results.json").read_text())
    del data["models"]
    (run / "results.json").write_text(json.dumps(data))
    tidy = collect(run)
    assert tidy["job"].tolist() == [".", "."]
    assert tidy["macro_f1"].tolist() == [0.7, 0.8]
    text = write_report(run).read_text()
    assert "-0.100 macro-F1" in text
    assert "None: every job finished." in text


def test_empty_folder_is_a_user_error(tmp_path):
    with pytest.raises(FedadError, match="holds no run"):
        collect(tmp_path)


def test_cli_missing_path_exits_2_with_one_paragraph(tmp_path, capsys):
    with pytest.raises(SystemExit) as ended:
        main([str(tmp_path / "nope")])
    assert ended.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("fedad: error: ")
    assert "does not exist" in err and "Traceback" not in err
    assert "\n\n" not in err.strip()


def test_cli_writes_report_into_out(sweep, tmp_path, capsys):
    main([str(sweep), "--out", str(tmp_path / "out")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "out" / "report.md")


def _break(job: Path, what: str) -> str:
    """Damage one file of a job folder as ``what`` says; return the reason the report gives."""
    results = json.loads((job / "results.json").read_text())
    if what == "results_list":
        (job / "results.json").write_text("[1, 2]")
        return "results.json is unreadable: it holds a JSON list, not an object"
    if what == "results_not_utf8":
        (job / "results.json").write_bytes(b'{"status": "done", "x": "\xff\xfe"}')
        return "results.json is unreadable: 'utf-8' codec can't decode byte 0xff"
    if what == "failed_list":
        (job / "failed.json").write_text('["boom"]')
        return "failed.json is unreadable: it holds a JSON list, not an object"
    if what == "failed_truncated":
        (job / "failed.json").write_text('{"status": "fai')
        return "failed.json is unreadable: Unterminated string"
    if what == "overrides_bad_yaml":
        (job / ".hydra" / "overrides.yaml").write_text("- seed=0\n  strategy: [\n")
        return ".hydra/overrides.yaml is unreadable:"
    if what == "overrides_mapping":
        (job / ".hydra" / "overrides.yaml").write_text("seed: 0\n")
        return ".hydra/overrides.yaml is unreadable: it holds a mapping, not a list"
    if what == "model_not_mapping":
        results["models"]["federated_cnn"] = 0.9
        (job / "results.json").write_text(json.dumps(results))
        return "results.json is unreadable: model 'federated_cnn' is a float"
    if what == "settings_text":
        results["settings"] = "fedavg"
        (job / "results.json").write_text(json.dumps(results))
        return "results.json is unreadable: its 'settings' is a text"
    raise ValueError(what)


@pytest.mark.parametrize(
    "what",
    [
        "results_list",
        "results_not_utf8",
        "failed_list",
        "failed_truncated",
        "overrides_bad_yaml",
        "overrides_mapping",
        "model_not_mapping",
        "settings_text",
    ],
)
def test_an_unreadable_job_is_listed_as_failed_and_the_rest_reported(sweep, tmp_path, what):
    job = make_run(
        sweep / "4",
        ["strategy=fedavg", "seed=2"],
        {"seed": 2},
        {"federated_cnn": (0.5, "federated"), "central_cnn": (0.6, "supervised")},
    )
    reason = _break(job, what)
    before = {p: p.read_bytes() for p in job.rglob("*") if p.is_file()}
    main([str(sweep), "--out", str(tmp_path / "out")])
    text = (tmp_path / "out" / "report.md").read_text()
    failed = text.split("## Failed or incomplete jobs")[1]
    line = next(x for x in failed.splitlines() if x.startswith("- `4`"))
    assert "**failed**" in line and reason in line, line
    # The other four jobs are reported as before; the damaged one is in no aggregate.
    assert "`federated_cnn` (strategy=fedavg): macro-F1 0.850 ± 0.071 (n=2)" in text
    assert {p: p.read_bytes() for p in job.rglob("*") if p.is_file()} == before


def test_a_sweep_without_federated_training_reports(tmp_path):
    """`-m federated=false ...` once clashed with the per-row `federated` column."""
    root = tmp_path / "sweep"
    for num, seed in enumerate((0, 1)):
        make_run(
            root / str(num),
            ["federated=false", f"seed={seed}"],
            {"seed": seed},
            {"random_forest": (0.9 + seed / 100, "supervised"), "xgboost": (0.8, "supervised")},
        )
    tidy = collect(root)
    assert tidy["federated_run"].tolist() == [False] * 4
    assert not tidy["federated"].astype(bool).any()
    text = write_report(root).read_text()
    assert "No finished federated model to compare with" in text
    assert "federated_run=False" in text
    assert "| random_forest | supervised | 2 | 0.905 ± 0.007 |" in text


def test_the_price_per_family_and_macro_f1_against_megabytes(tmp_path):
    """A sweep over model families: each federated model against its own twin, and its MB."""
    sweep = tmp_path / "families"
    for job, (model, twin) in enumerate((("cnn", "central_cnn"), ("xgboost", "xgboost"))):
        for seed in (0, 1):
            run = make_run(
                sweep / f"{job}{seed}",
                [f"model={model}", f"seed={seed}"],
                {"model": model, "seed": seed},
                {
                    f"federated_{model}": (0.80 + 0.02 * seed, "federated"),
                    f"local_{model}": (0.70, "local"),
                    twin: (0.90, "supervised"),
                    "random_forest": (0.95, "supervised"),
                },
            )
            results = json.loads((run / "results.json").read_text())
            for name, entry in results["models"].items():
                entry["mb_exchanged"] = 40.0 if name.startswith("federated") else 5.0
            (run / "results.json").write_text(json.dumps(results))
            # The comparison's calibrated-decision and cost cells, read back beside results.json.
            pd.DataFrame(
                {
                    "model": [f"federated_{model}", twin],
                    "argmax_macro_f1": [0.70 + 0.02 * seed, 0.88],
                    "kept_round": [4 + 2 * seed, None],
                    "kept_seconds": [10.0 + seed, None],
                    "kept_mb": [20.0, None],
                }
            ).to_csv(run / "comparison.csv", index=False)
    text = write_report(sweep, tmp_path / "out").read_text()
    price = text.split("## The price of federation per setting and family")[1].split("##")[0]
    # Each family against its own twin (xgboost's is `xgboost`, not the best forest), with
    # the ROC-AUC and FPR gaps and the gain over the sites alone.
    assert (
        "| xgboost | `federated_xgboost` | xgboost | 2 | 0.810 ± 0.014 | 0.900 ± 0.000 |" in price
    )
    # Then the same gap at argmax, and the cost of the answer: the kept round, seconds and MB.
    gaps = "-0.090 ± 0.014 | -0.090 ± 0.014 | +0.090 ± 0.014 | -0.170 ± 0.014 | +0.110 ± 0.014 |"
    assert gaps + " 5.0 ± 1.4 | 10.5 ± 0.7 | 20.0 ± 0.0 |" in price
    assert (tmp_path / "out" / "f1_vs_mb.png").stat().st_size > 0
    assert "(f1_vs_mb.png)" in text


def test_a_job_of_another_fedad_version_is_listed_apart_never_averaged(tmp_path):
    root = tmp_path / "sweep"
    for num, seed in enumerate((0, 1)):
        make_run(
            root / str(num),
            [f"seed={seed}"],
            {"seed": seed},
            {"federated_cnn": (0.80, "federated"), "central_cnn": (0.90, "supervised")},
        )
    old = make_run(
        root / "2",
        ["seed=2"],
        {"seed": 2},
        {"federated_cnn": (0.10, "federated"), "central_cnn": (0.90, "supervised")},
    )
    results = json.loads((old / "results.json").read_text())
    results["versions"]["fedad"] = "0.0.1"
    (old / "results.json").write_text(json.dumps(results))
    text = write_report(root, tmp_path / "out").read_text()
    assert "3 job(s): 2 done, 0 failed, 0 incomplete, 1 of another fedad version." in text
    assert f"written by fedad 0.0.1; this report is fedad {__version__}" in text
    # The old job's 0.10 is in no aggregate.
    assert "| `federated_cnn` | central_cnn | 2 | 0.800 ± 0.000 | 0.900 ± 0.000 |" in text


# --- the sites section (clients.csv: global, personal and lone scores per site) -------------


def test_the_sites_section_audits_every_model_of_each_site(tmp_path):
    from fedad.evaluation import fairness
    from fedad.report.sites import SITES_CSV, SITES_PNG

    job = make_run(
        tmp_path / "run",
        ["personalize=finetune"],
        models={"federated_cnn": (0.8, "federated"), "central_cnn": (0.9, "supervised")},
    )
    clients = pd.DataFrame(
        {
            "client": [0, 1, 2, 3],
            "macro_f1": [0.40, 0.70, 0.90, 0.85],
            "fpr": [0.30, 0.10, 0.00, float("nan")],
            "recall": [0.60, 0.80, 0.95, 0.90],
            "personal_macro_f1": [0.75, 0.72, 0.88, 0.86],
            "personal_fpr": [0.05, 0.08, 0.01, float("nan")],
            "personal_recall": [0.70, 0.82, 0.93, 0.91],
            "alone_macro_f1": [0.60, 0.65, 0.80, 0.88],
            "alone_fpr": [0.10, 0.20, 0.02, float("nan")],
            "alone_recall": [0.50, 0.70, 0.85, 0.92],
        }
    )
    clients.to_csv(job / "clients.csv", index=False)
    text = write_report(job).read_text()
    assert "## Sites" in text and f"]({SITES_PNG})" in text
    assert (job / SITES_PNG).stat().st_size > 0
    table = pd.read_csv(job / SITES_CSV).set_index("model")
    summary = fairness.audit(clients)
    for model in ("global", "personal", "alone"):
        assert table.loc[model, "macro_f1_worst"] == summary["models"][model]["macro_f1"]["worst"]
        assert table.loc[model, "fpr_worst"] == clients[f"{fairness.MODELS[model]}fpr"].max()
    # The global model leaves sites 0 and 3 worse off than alone; the personal one only site 3.
    assert table.loc["global", "worse_than_alone"] == 2
    assert table.loc["personal", "worse_than_alone"] == 1
    assert "| global | 4 | 0.400 |" in text and "2 of 4" in text


def test_gaps_are_taken_against_the_twin_the_comparison_names(tmp_path):
    root = tmp_path / "multirun"
    models = {
        "federated_xgboost": (0.8, "federated"),
        "xgboost_pinned": (0.8, "supervised"),
        "xgboost": (0.83, "supervised"),
    }
    for seed in (0, 1):
        job = make_run(
            root / str(seed),
            ["strategy=fedxgb_histogram", f"seed={seed}"],
            {"strategy": "fedxgb_histogram", "seed": seed, "model": "xgboost"},
            models,
        )
        # As a histogram run's comparison names it: the pinned twin, not TWINS' xgboost.
        comparison = pd.read_csv(job / "comparison.csv")
        comparison["twin"] = np.where(comparison["federated"], "xgboost_pinned", None)
        comparison.to_csv(job / "comparison.csv", index=False)
    done = finished_jobs(collect(root))
    gaps = job_gaps(done, group_keys(done))
    assert gaps["reference"].tolist() == ["xgboost_pinned", "xgboost_pinned"]
    assert gaps["gap"].tolist() == [0.0, 0.0]
    # Without the name (an older comparison), TWINS' twin is the reference.
    for seed in (0, 1):
        comparison = pd.read_csv(root / str(seed) / "comparison.csv")
        comparison.drop(columns="twin").to_csv(root / str(seed) / "comparison.csv", index=False)
    done = finished_jobs(collect(root))
    assert job_gaps(done, group_keys(done))["reference"].tolist() == ["xgboost", "xgboost"]
