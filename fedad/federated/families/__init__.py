"""Model families the sites train: base (interface), registry, classifier, autoencoder, booster."""
