"""Export: an SGT artifact as a PyTorch module on transformers' decoder classes."""
