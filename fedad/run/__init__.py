"""One run's life: the command line, checks, data preparation, resume, caches, tracking."""
