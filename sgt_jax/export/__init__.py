"""Export: an SGT artifact as a self-contained PyTorch module."""
