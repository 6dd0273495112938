"""Data layer: load, audit, split, preprocess and partition IoT traffic."""
