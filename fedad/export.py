"""`python -m fedad.export DETECTOR --format tflite`: the detector's model for edge devices."""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from fedad.data.sources import resolve
from fedad.detector.adapters import load_keras
from fedad.detector.inputs import chunks, open_input
from fedad.detector.scorer import Detector
from fedad.errors import FedadError, exit_with
from fedad.models.inference import reconstruction_error

log = logging.getLogger("fedad")

FORMATS = ("tflite", "onnx")
# Model kinds held as Keras models, which export: the classifiers and the autoencoder.
EXPORTABLE = ("keras", "autoencoder")
# Largest difference allowed between the scores the exported model gives and the detector's,
# relative where a score is above 1: probabilities are checked to 1e-5 absolute, an
# autoencoder's reconstruction errors (hundreds for outliers) relatively.
TOLERANCE = 1e-5


def export(detector: Detector, fmt: str, out: str | Path, rows: str | Path | None = None) -> dict:
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
        The file to write; it appears only once the check passed.
    rows : str or Path, optional
        Raw rows to compare the scores on; default: the dataset's test file.

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
    rows = rows or _test_file(detector)
    import keras

    model = load_keras(detector.folder / model_info["file"])
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
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        staged = Path(tmp) / out.name
        edge.export(str(staged), format="litert" if fmt == "tflite" else "onnx", verbose=False)
        got = _run_tflite(staged, X) if fmt == "tflite" else _run_onnx(staged, X)
        if detector.anomaly:
            # Compared as scores: a reconstruction differs by float32 steps of its inputs,
            # which reach hundreds of standard deviations for outliers.
            got = reconstruction_error(standardized, got)
        difference = float((np.abs(got - expected) / np.maximum(1.0, np.abs(expected))).max())
        if difference > TOLERANCE:
            raise FedadError(
                f"The {fmt} model's {_output(detector)} differ from the Keras model's by up to "
                f"{difference:.2e} on the {len(X)} rows of {rows} (allowed: {TOLERANCE:g}, "
                "relative where a score is above 1); nothing was written."
            )
        os.replace(staged, out)
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
            "Checking an ONNX export needs onnxruntime: pip install 'fedad[edge]'."
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
        "autoencoder's reconstruction of the standardized row.",
    )
    parser.add_argument("detector", help="a detector folder: <run>/detector/<model>")
    parser.add_argument("--format", default="tflite", help="tflite (default) or onnx")
    parser.add_argument(
        "--rows", help="raw rows to check the scores on (default: the dataset's test file)"
    )
    parser.add_argument("-o", "--output", help="output file (default: <detector>.<format>)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="fedad: %(levelname)s: %(message)s")
    try:
        detector = Detector.load(args.detector)
        out = args.output or f"{Path(args.detector).resolve()}.{args.format}"
        done = export(detector, args.format, out, args.rows)
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
