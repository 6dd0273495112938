"""Federated training across simulated IoT sites with Flower: see fedad.federated.simulation."""
