"""Sparse-predictor trainer over collected activations."""
