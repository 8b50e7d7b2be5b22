"""Command-line tools that are not part of a training run (e.g. building the embedded tiny model)."""
