"""`python -m fedad.score DETECTOR INPUT.csv [-o OUT.csv]`: score raw rows with a saved detector."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from fedad import rundir
from fedad.detector.inputs import CHUNK_ROWS, chunks, open_input
from fedad.detector.scorer import Detector
from fedad.errors import FedadError, exit_with
from fedad.evaluation.metrics import TABLE_METRICS, compute_metrics

log = logging.getLogger("fedad")
# Printed with labels; the rest of compute_metrics goes to --metrics-json.


def score_file(
    detector: Detector,
    source: str | Path,
    out: str | Path | None,
    rule: str | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> dict:
    """Score every row of ``source`` into a CSV; nothing is written unless all rows score.

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

    Returns
    -------
    dict
        ``rows``, ``rule``, ``ignored_columns``, ``unseen_categories`` and, when
        the input holds labels, ``labelled_rows`` and ``metrics``.
    """
    rule = rule or detector.default_rule
    detector.check_rule(rule)
    found = open_input(detector, source)
    target = Path(out) if out is not None else None
    folder = target.parent if target is not None else Path(tempfile.gettempdir())
    if target is not None and (target.is_dir() or not folder.is_dir()):
        raise FedadError(
            f"Cannot write the scores to {target}: "
            + ("it is a folder." if target.is_dir() else f"there is no folder {folder}.")
            + " Give -o a file path in an existing folder."
        )
    rows, unseen = 0, dict[str, int]()
    labelled: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False) as tmp:
        try:
            for frame in chunks(detector, found, chunk_rows):
                scored = detector.score(frame, rule)
                table = detector.table(scored, rule)
                table.insert(0, "row", np.arange(rows + 1, rows + len(frame) + 1))
                truth = detector.true_classes(frame)
                if truth is not None:
                    names = np.asarray(["", *detector.class_names], dtype=object)
                    table["true_class"] = names[truth + 1]
                    known = truth >= 0
                    labelled.append((truth[known], scored.scores[known], scored.predicted[known]))
                table.to_csv(tmp, header=rows == 0, index=False)
                rows += len(frame)
                for col, n in scored.unseen.items():
                    unseen[col] = unseen.get(col, 0) + n
            if rows == 0:
                raise FedadError(
                    f"Input file {source} has a header but no rows to score. Give a file with "
                    "one row per flow."
                )
            tmp.flush()
            os.fsync(tmp.fileno())
        except BaseException:
            os.unlink(tmp.name)
            raise
    if target is None:
        try:
            with open(tmp.name) as f:
                shutil.copyfileobj(f, sys.stdout)
            sys.stdout.flush()
        except BrokenPipeError:
            # The reader stopped early (| head): the rest goes nowhere, quietly.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        finally:
            os.unlink(tmp.name)
    else:
        os.replace(tmp.name, target)
    summary: dict = {
        "rows": rows,
        "rule": rule,
        "ignored_columns": found.ignored,
        "unseen_categories": unseen,
    }
    if labelled:
        y, scores, predicted = (np.concatenate(parts) for parts in zip(*labelled, strict=True))
        summary["labelled_rows"] = int(len(y))
        if len(y):
            summary["metrics"] = compute_metrics(y, scores, detector.class_names, predicted)
    return summary


def main(argv: list[str] | None = None) -> None:
    """``python -m fedad.score DETECTOR INPUT.csv [-o OUT.csv] [--rule R]``."""
    parser = argparse.ArgumentParser(
        prog="python -m fedad.score",
        description="Score raw rows (in the training file's own format) with a saved detector: "
        "one output row per input row, with the class probabilities (classifiers), the attack "
        "score (1 - p(normal), or an autoencoder's reconstruction error), the predicted class "
        "and the threshold used. With a label column, prints the metrics.",
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="fedad: %(levelname)s: %(message)s")
    try:
        detector = Detector.load(args.detector)
        summary = score_file(detector, args.input, args.output, args.rule)
    except FedadError as err:
        exit_with(err)
    report = sys.stderr if args.output is None else sys.stdout
    print(_describe(detector, summary, args), file=report)
    if args.metrics_json and "metrics" in summary:
        rundir.write_json(args.metrics_json, summary["metrics"])


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
