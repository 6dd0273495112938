"""Exact federated XGBoost: histogram sessions through XGBoost's own federated communicator."""
