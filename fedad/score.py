"""`python -m fedad.score DETECTOR INPUT.csv [-o OUT.csv]`: score raw rows with a saved detector."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np

from fedad import rundir
from fedad.detector.inputs import CHUNK_ROWS, check_output, chunks, open_input
from fedad.detector.scorer import Detector, Truth
from fedad.errors import FedadError, exit_with
from fedad.evaluation.metrics import TABLE_METRICS, compute_metrics

log = logging.getLogger("fedad")
# Label values named in a message; the rest are counted.
LISTED = 10


def score_file(
    detector: Detector,
    source: str | Path,
    out: str | Path | None,
    rule: str | None = None,
    chunk_rows: int = CHUNK_ROWS,
    overwrite: bool = False,
) -> dict:
    """Score every row of ``source`` into a CSV; nothing is written unless all rows score.

    The output is checked before any row is read: it may not be the input or
    a file of the detector, and it is not replaced unless ``overwrite``. It is
    written to a temporary file beside it and renamed into place once
    complete, so a failure (a full disk) leaves the earlier file, or none.

    Parameters
    ----------
    detector : Detector
        The loaded detector.
    source : str or Path
        Raw rows in the training file's format; the label is optional.
    out : str or Path or None
        Output CSV (one row per input row); None writes it to standard output.
    rule : str, optional
        Decision rule (``argmax``, ``target_fpr``, ``threshold``); default: the
        detector's default rule.
    chunk_rows : int
        Rows read, scored and written at a time (memory stays flat in the file size).
    overwrite : bool
        Replace an existing ``out``.

    Returns
    -------
    dict
        ``rows``, ``rule``, ``ignored_columns``, ``unseen_categories``,
        ``too_large`` and ``beyond_training`` (cells per column), ``warnings``
        (sentences) and, when the input holds labels, ``labelled_rows``,
        ``unknown_labels`` and ``metrics``.

    Raises
    ------
    FedadError
        For a bad output path, a bad input file, labels none of which the
        detector knows, or a failed write.
    """
    rule = rule or detector.default_rule
    detector.check_rule(rule)
    if out is not None:
        check_output(out, [Path(source), *detector.files], overwrite, "the scores")
    found = open_input(detector, source)
    target = Path(out) if out is not None else None
    counts: dict[str, dict[str, int]] = {"unseen": {}, "too_large": {}, "beyond_training": {}}
    labels = {"known": 0, "unknown": dict[str, int](), "checked": True}
    rows = 0
    labelled: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    try:
        with _sink(target, overwrite) as sink:
            for frame in chunks(detector, found, chunk_rows):
                scored = detector.score(frame, rule)
                table = detector.table(scored, rule)
                table.insert(0, "row", np.arange(rows + 1, rows + len(frame) + 1))
                truth = detector.true_classes(frame)
                if truth is not None:
                    names = np.asarray(["", *detector.class_names], dtype=object)
                    table["true_class"] = names[truth.codes + 1]
                    known = truth.codes >= 0
                    labelled.append(
                        (truth.codes[known], scored.scores[known], scored.predicted[known])
                    )
                    _tally(labels, truth)
                table.to_csv(sink, header=rows == 0, index=False)
                rows += len(frame)
                for key, found_now in (
                    ("unseen", scored.unseen),
                    ("too_large", scored.too_large),
                    ("beyond_training", scored.beyond_training),
                ):
                    for col, n in found_now.items():
                        counts[key][col] = counts[key].get(col, 0) + n
            if rows == 0:
                raise FedadError(
                    f"Input file {source} has a header but no rows to score. Give a file with "
                    "one row per flow."
                )
            warnings = _label_warnings(detector, source, labels) if labelled else []
    except FileExistsError:
        raise FedadError(
            f"Cannot write the scores to {target}: the file appeared while the rows were scored "
            "and was left as it is. Give --overwrite to replace it, or another path."
        ) from None
    except OSError as err:
        if target is not None:
            raise FedadError(rundir.write_failure(target, err)) from None
        raise FedadError(
            f"Staging the scores in {tempfile.gettempdir()} failed: {err.strerror or err}; "
            "nothing was written to standard output. Free space there (or point TMPDIR to a "
            "folder with room), or give -o a file."
        ) from None
    warnings += _value_warnings(detector, counts)
    summary: dict = {
        "rows": rows,
        "rule": rule,
        "ignored_columns": found.ignored,
        "unseen_categories": counts["unseen"],
        "too_large": counts["too_large"],
        "beyond_training": counts["beyond_training"],
        "warnings": warnings,
    }
    if labelled:
        y, scores, predicted = (np.concatenate(parts) for parts in zip(*labelled, strict=True))
        summary["labelled_rows"] = int(len(y))
        summary["unknown_labels"] = labels["unknown"]
        if len(y):
            summary["metrics"] = compute_metrics(y, scores, detector.class_names, predicted)
    return summary


@contextmanager
def _sink(target: Path | None, overwrite: bool) -> Iterator[IO]:
    """A text file that becomes ``target`` (or goes to standard output) only once complete."""
    if target is not None:
        with rundir.atomic(target, "w", overwrite) as f:
            yield f
        return
    with tempfile.NamedTemporaryFile("w+", suffix=".csv") as tmp:
        yield tmp
        tmp.flush()
        tmp.seek(0)
        try:
            shutil.copyfileobj(tmp, sys.stdout)
            sys.stdout.flush()
        except BrokenPipeError:
            # The reader stopped early (| head): the rest goes nowhere, quietly.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _tally(labels: dict, truth: Truth) -> None:
    labels["known"] += truth.known
    labels["checked"] = truth.checked
    for value, n in truth.unknown.items():
        labels["unknown"][value] = labels["unknown"].get(value, 0) + n


def _label_warnings(detector: Detector, source: str | Path, labels: dict) -> list[str]:
    """What the labels say of the file: a refusal when none is known, else warnings."""
    unknown: dict[str, int] = labels["unknown"]
    if not unknown:
        return []
    spec = detector.manifest["labels"]
    column = spec["label_column"]
    if spec["task"] != "binary":
        column = spec.get("class_column") or column
    found = _listing(unknown)
    if not labels["checked"]:
        if labels["known"]:
            return []  # some rows are normal: the other labels are attack names it never kept
        return [
            f"No labelled row of {source} carries the normal value '{spec['normal_value']}' in "
            f"column '{column}', so every one counts as an attack: {found}. If the file names "
            "normal traffic otherwise, the metrics are meaningless: map its labels to the "
            "detector's, or leave the label column out to score without metrics."
        ]
    if not labels["known"]:
        raise FedadError(
            f"None of the {sum(unknown.values())} labels in column '{column}' of {source} is one "
            f"the detector {detector.name} knows: {found}. It knows {_vocabulary(detector)}. The "
            "file labels its rows in another vocabulary, so its metrics would be meaningless; "
            "nothing was written. Map its labels to the detector's, or remove or rename the "
            "label column to score without metrics."
        )
    fate = (
        "they count as attacks, as the run counted every label other than the normal value"
        if spec["task"] == "binary"
        else "they are left out of the metrics (their true_class is empty)"
    )
    return [
        f"{sum(unknown.values())} labelled row(s) of {source} carry labels in column "
        f"'{column}' that the detector {detector.name} does not know: {found}; {fate}. It knows "
        f"{_vocabulary(detector)}."
    ]


def _vocabulary(detector: Detector) -> str:
    spec = detector.manifest["labels"]
    if spec["task"] != "binary":
        return f"the classes {', '.join(detector.class_names)}"
    normal = f"the normal value '{spec['normal_value']}'"
    if spec.get("class_map"):
        names = list(spec["class_map"])
        more = f" and {len(names) - LISTED} more" if len(names) > LISTED else ""
        return f"{normal} and the attack names {', '.join(names[:LISTED])}{more}"
    return f"{normal} and, for attacks, any other number"


def _value_warnings(detector: Detector, counts: dict[str, dict[str, int]]) -> list[str]:
    warnings = []
    if counts["beyond_training"]:
        scale = " (on the log scale the model reads)" if detector.preprocessor.log_transform else ""
        warnings.append(
            f"{sum(counts['beyond_training'].values())} cell(s) lie outside the range of the "
            f"detector's {detector.manifest['data']['n_train']} training rows: more than "
            f"{detector.training_reach:.0f} standard deviations from their mean{scale}, where no "
            f"training value lies: {_listing(counts['beyond_training'])}. They were scored as "
            "they are, so their scores extrapolate: check the units and column order of those rows."
        )
    if counts["too_large"]:
        warnings.append(
            f"{sum(counts['too_large'].values())} cell(s) are too large for float32 (beyond "
            "±3.4e38) and were scored as the column's training median, as the run's "
            f"preparation does: {_listing(counts['too_large'])}."
        )
    return warnings


def _listing(counts: dict[str, int]) -> str:
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    shown = ", ".join(f"'{value}' ({n})" for value, n in ranked[:LISTED])
    return shown + (f" and {len(ranked) - LISTED} more" if len(ranked) > LISTED else "")


def main(argv: list[str] | None = None) -> None:
    """``python -m fedad.score DETECTOR INPUT.csv [-o OUT.csv] [--rule R] [--overwrite]``."""
    parser = argparse.ArgumentParser(
        prog="python -m fedad.score",
        description="Score raw rows (in the training file's own format) with a saved detector: "
        "one output row per input row, with the class probabilities (classifiers), the attack "
        "score (1 - p(normal), or an autoencoder's reconstruction error), the predicted class "
        "and the threshold used. With a label column, prints the metrics. Outputs appear "
        "complete or not at all, never replace the input, and replace an existing file only "
        "with --overwrite.",
    )
    parser.add_argument("detector", help="a detector folder: <run>/detector/<model>")
    parser.add_argument("input", help="CSV of raw rows, as the dataset's own files")
    parser.add_argument("-o", "--output", help="output CSV (default: standard output)")
    parser.add_argument(
        "--rule",
        help="decision rule: argmax (a classifier's default), target_fpr (the threshold chosen "
        "on validation rows for detector.target_fpr, where the detector has one) or threshold "
        "(an autoencoder's, its default: the threshold its federated run chose)",
    )
    parser.add_argument("--metrics-json", help="also write every metric to this JSON file")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace existing output files (default: refuse)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="fedad: %(levelname)s: %(message)s")
    try:
        detector = Detector.load(args.detector)
        if args.metrics_json:
            if args.output and rundir.same_file(args.metrics_json, args.output):
                raise FedadError(
                    f"--metrics-json and -o both name {args.output}: give the metrics a file "
                    "of their own."
                )
            inputs = [Path(args.input), *detector.files]
            check_output(args.metrics_json, inputs, args.overwrite, "the metrics")
        summary = score_file(detector, args.input, args.output, args.rule, overwrite=args.overwrite)
        for warning in summary["warnings"]:
            log.warning(warning)
        report = sys.stderr if args.output is None else sys.stdout
        print(_describe(detector, summary, args), file=report)
        if args.metrics_json and "metrics" in summary:
            _write_metrics(args.metrics_json, summary["metrics"], args.overwrite)
    except FedadError as err:
        exit_with(err)


def _write_metrics(path: str, metrics: dict, overwrite: bool) -> None:
    try:
        rundir.write_json(path, metrics, overwrite)
    except FileExistsError:
        raise FedadError(
            f"Cannot write the metrics to {path}: the file appeared while the rows were scored "
            "and was left as it is (the scores were written). Give --overwrite to replace it."
        ) from None
    except OSError as err:
        raise FedadError(rundir.write_failure(path, err) + " The scores were written.") from None


def _describe(detector: Detector, summary: dict, args: argparse.Namespace) -> str:
    lines = [
        f"{summary['rows']} rows scored by {detector.name} (rule {summary['rule']})"
        + (f" -> {args.output}" if args.output else "")
    ]
    if summary["ignored_columns"]:
        lines.append("columns ignored: " + ", ".join(summary["ignored_columns"]))
    if summary["unseen_categories"]:
        cells = ", ".join(f"{c} ({n})" for c, n in summary["unseen_categories"].items())
        lines.append(f"categories unseen in training, scored as in training: {cells}")
    if "metrics" in summary:
        m = summary["metrics"]
        shown = "  ".join(
            f"{k} {m[k]:.4f}" if m[k] is not None else f"{k} –" for k in TABLE_METRICS
        )
        lines.append(f"metrics on {summary['labelled_rows']} labelled rows: {shown}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
