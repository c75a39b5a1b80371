"""Neuro-Plastic Transformer equivalence training and evaluation."""
