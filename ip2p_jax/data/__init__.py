"""Training data: the shapes world, TFDS builders and grain input pipelines."""
