"""fedad: federated learning of IoT intrusion and anomaly detectors, simulated with Flower."""

__version__ = "0.1.0"
