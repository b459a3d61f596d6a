"""Metrics and the paper's experiments (Section 5), on the built-in world or real models."""
