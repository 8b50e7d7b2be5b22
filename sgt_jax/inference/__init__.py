"""Inference: the SGT artifact (load, transform, generate) and sampling."""
