"""Centralized baselines trained and scored on the same split as the federated model."""
