"""`python -m fedad.export DETECTOR --format tflite`: the detector's model for edge devices."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fedad import rundir
from fedad.data.sources import resolve
from fedad.detector.adapters import load_keras
from fedad.detector.artifact import read_file
from fedad.detector.inputs import check_output, chunks, open_input
from fedad.detector.scorer import Detector
from fedad.errors import FedadError, exit_with
from fedad.models.inference import reconstruction_error

log = logging.getLogger("fedad")

FORMATS = ("tflite", "onnx")
# The file name each format's output must end with: a name without it is refused (not
# extended), so the file written is always the one named.
SUFFIXES = {"tflite": ".tflite", "onnx": ".onnx"}
# What the ONNX format needs beyond fedad's own dependencies: the pyproject extra holding it.
ONNX_MODULES = ("tf2onnx", "onnx", "onnxruntime")
EDGE_EXTRA = "fedad[edge]"
# Model kinds held as Keras models, which export: the classifiers and the autoencoder.
EXPORTABLE = ("keras", "autoencoder")
# Largest difference allowed between the scores the exported model gives and the detector's,
# relative where a score is above 1: probabilities are checked to 1e-5 absolute, an
# autoencoder's reconstruction errors (hundreds for outliers) relatively.
TOLERANCE = 1e-5


def export(
    detector: Detector,
    fmt: str,
    out: str | Path,
    rows: str | Path | None = None,
    overwrite: bool = False,
) -> dict:
    """Write the detector's Keras model in an edge format and check it against the original.

    The exported model takes the preprocessed vector (the encoded features of
    ``schema.encoded_features``, before standardization: the standardization
    is inside it) and returns what the Keras model returns: the class
    probabilities, or the autoencoder's reconstruction of the standardized
    row. The check compares scores: the probabilities, or the reconstruction
    error computed from the exported model's reconstruction as the detector
    computes it from the Keras model's.

    Parameters
    ----------
    detector : Detector
        A loaded detector holding a Keras model (a classifier or the autoencoder).
    fmt : str
        ``tflite`` (run with the LiteRT interpreter) or ``onnx`` (run with ONNX Runtime).
    out : str or Path
        The file to write, ending in the format's suffix (:data:`SUFFIXES`); it
        appears only once the check passed, and never replaces an input.
    rows : str or Path, optional
        Raw rows to compare the scores on; default: the dataset's test file.
    overwrite : bool
        Replace an existing ``out`` (default: refuse).

    Returns
    -------
    dict
        ``path``, ``kb`` (file size), ``rows`` checked, ``max_difference`` (relative
        where a score is above 1, see :data:`TOLERANCE`), ``output`` (what was
        compared) and ``within`` (the bound, in words).
    """
    if fmt not in FORMATS:
        raise FedadError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'.")
    model_info = detector.manifest["model"]
    if model_info["kind"] not in EXPORTABLE:
        raise FedadError(
            f"The detector {detector.name} holds a {model_info['kind']} model; only Keras models "
            "(the federated CNN, logistic, MLP or autoencoder, the central Keras baselines) "
            f"export to {fmt}. Export the run's federated detector instead."
        )
    check_format(fmt, out)
    rows = rows or _test_file(detector)
    check_output(out, [Path(rows), *detector.files], overwrite, f"the {fmt} model")
    import keras

    name = model_info["file"]
    model = load_keras(
        detector.folder / name,
        read_file(detector.folder, detector.manifest, name),
        detector.trust_custom_code,
    )
    inputs = keras.Input(shape=(len(detector.mean),), name="features")
    # Constants rather than a Normalization layer's variables, which the ONNX converter
    # turns into extra model inputs.
    scaled = keras.layers.Rescaling(
        scale=(1.0 / detector.std).astype(np.float32),
        offset=(-detector.mean / detector.std).astype(np.float32),
    )(inputs)
    edge = keras.Model(inputs, model(scaled), name=f"{detector.name}_edge")

    source = open_input(detector, rows)
    X = np.concatenate([detector.preprocessor.transform(f) for f in chunks(detector, source)])
    standardized = detector.standardize(X)
    expected = detector.predict_model(standardized)
    edge(X[:1])  # the ONNX exporter needs a model that has been called once
    out = Path(out)
    try:
        difference = _write_checked(edge, fmt, out, X, standardized, expected, detector, overwrite)
    except FileExistsError:
        raise FedadError(
            f"Cannot write the {fmt} model to {out}: the file appeared during the export and was "
            "left as it is. Give --overwrite to replace it, or another path."
        ) from None
    except OSError as err:
        raise FedadError(rundir.write_failure(out, err)) from None
    if difference > TOLERANCE:
        raise FedadError(
            f"The {fmt} model's {_output(detector)} differ from the Keras model's by up to "
            f"{difference:.2e} on the {len(X)} rows of {rows} (allowed: {TOLERANCE:g}, "
            "relative where a score is above 1); nothing was written."
        )
    return {
        "path": str(out),
        "kb": out.stat().st_size / 1024,
        "rows": len(X),
        "max_difference": difference,
        "checked_on": str(rows),
        "output": _output(detector),
        # Probabilities never pass 1, so their check is an absolute one.
        "within": f"{TOLERANCE:g}" + (" (relative where above 1)" if detector.anomaly else ""),
    }


def check_format(fmt: str, out: str | Path) -> None:
    """Refuse an output name without the suffix of ``fmt`` (one of FORMATS), or it uninstalled."""
    if Path(out).suffix != SUFFIXES[fmt]:
        raise FedadError(
            f"The {fmt} model's file name must end in {SUFFIXES[fmt]}, but {out} does not; "
            f"nothing was written. Give -o a name ending in {SUFFIXES[fmt]} (fedad does not add "
            "the suffix itself, so the file written is always the one named)."
        )
    missing = [m for m in ONNX_MODULES if fmt == "onnx" and importlib.util.find_spec(m) is None]
    if missing:
        raise FedadError(
            f"The onnx format needs {', '.join(missing)}, which this Python lacks: install "
            f"fedad's edge extra with pip install '{EDGE_EXTRA}' (or use --format tflite, which "
            "needs nothing more)."
        )


def _write_checked(
    edge: Any,
    fmt: str,
    out: Path,
    X: np.ndarray,
    standardized: np.ndarray,
    expected: np.ndarray,
    detector: Detector,
    overwrite: bool,
) -> float:
    """Export ``edge`` beside ``out``, compare its scores, and move it into place if they match.

    Returns the largest difference; ``out`` is written only when it is within
    :data:`TOLERANCE`.
    """
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        staged = Path(tmp) / out.name
        edge.export(str(staged), format="litert" if fmt == "tflite" else "onnx", verbose=False)
        got = _run_tflite(staged, X) if fmt == "tflite" else _run_onnx(staged, X)
        if detector.anomaly:
            # Compared as scores: a reconstruction differs by float32 steps of its inputs,
            # which reach hundreds of standard deviations for outliers.
            got = reconstruction_error(standardized, got)
        difference = float((np.abs(got - expected) / np.maximum(1.0, np.abs(expected))).max())
        if difference <= TOLERANCE:
            rundir.place(staged, out, overwrite)
    return difference


def _output(detector: Detector) -> str:
    return "reconstruction errors" if detector.anomaly else "scores"


def _run_tflite(path: Path, X: np.ndarray) -> np.ndarray:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # TensorFlow's own copy, deprecated but present in 2.21
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter  # noqa: N806
    interpreter = Interpreter(model_path=str(path))
    (entry,) = interpreter.get_input_details()
    interpreter.resize_tensor_input(entry["index"], X.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(entry["index"], X.astype(np.float32))
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def _run_onnx(path: Path, X: np.ndarray) -> np.ndarray:
    try:
        import onnxruntime
    except ImportError:
        raise FedadError(
            f"Checking an ONNX export needs onnxruntime: pip install '{EDGE_EXTRA}'."
        ) from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: X.astype(np.float32)})[0]


def main(argv: list[str] | None = None) -> None:
    """``python -m fedad.export DETECTOR --format tflite|onnx [--rows CSV] [-o OUT]``."""
    parser = argparse.ArgumentParser(
        prog="python -m fedad.export",
        description="Export a detector's Keras model for edge devices, checked against the "
        "Keras model on real rows. The exported model takes the encoded feature vector "
        "(preprocessing.json of the detector) and returns class probabilities, or an "
        "autoencoder's reconstruction of the standardized row. The file appears only once the "
        f"check passed; the onnx format needs the edge extra (pip install '{EDGE_EXTRA}').",
    )
    parser.add_argument("detector", help="a detector folder: <run>/detector/<model>")
    parser.add_argument("--format", default="tflite", help="tflite (default) or onnx")
    parser.add_argument(
        "--rows", help="raw rows to check the scores on (default: the dataset's test file)"
    )
    parser.add_argument(
        "-o",
        "--output",
        help="output file, ending in .tflite or .onnx as the format (a name without that suffix "
        "is refused, not extended); default: <detector>.<format>, beside the detector folder",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing output file (default: refuse)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="fedad: %(levelname)s: %(message)s")
    try:
        detector = Detector.load(args.detector)
        out = args.output or f"{Path(args.detector).resolve()}{SUFFIXES.get(args.format, '')}"
        done = export(detector, args.format, out, args.rows, args.overwrite)
    except FedadError as err:
        exit_with(err)
    print(
        f"{done['path']}: {done['kb']:.1f} KB; on {done['rows']} rows of {done['checked_on']} "
        f"its {done['output']} match the Keras model's within {done['within']} (largest difference "
        f"{done['max_difference']:.1e})"
    )


def _test_file(detector: Detector) -> Path:
    data = detector.manifest["data"]
    if data.get("test_file") and data.get("data_dir"):
        path = resolve(data["data_dir"], data["test_file"])
        if path.is_file():
            return path
    raise FedadError(
        f"The detector {detector.name} knows no test file on this machine to check the export "
        "on: give raw rows in the training file's format with --rows FILE.csv."
    )


if __name__ == "__main__":
    main()
