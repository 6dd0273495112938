"""`python -m fedad.serve DETECTOR`: a REST service scoring raw rows with a saved detector."""

from fedad.serve.app import create_app
from fedad.serve.cli import main
from fedad.serve.requests import Limits

__all__ = ["Limits", "create_app", "main"]
