"""fedad: federated learning of IoT intrusion and anomaly detectors, simulated with Flower."""

import os

# TensorFlow's C++ start-up chatter drowns the per-round lines; keep warnings and errors.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from fedad.versions import __version__

__all__ = ["__version__"]
