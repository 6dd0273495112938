"""A trained detector in use: saved with its preprocessing, loaded, and scoring raw rows."""

from fedad.detector.artifact import FORMAT_VERSION, read_manifest
from fedad.detector.scorer import Detector, Scored

__all__ = ["FORMAT_VERSION", "Detector", "Scored", "read_manifest"]
