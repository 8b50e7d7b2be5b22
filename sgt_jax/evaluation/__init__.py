"""Evaluation: utility and obfuscation metrics, ROUGE, learned inversion attacks, the frontier, lm-eval adapter."""
