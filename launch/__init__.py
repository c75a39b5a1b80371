"""Entry points: torchrun infer.py, shell scripts per model size, smoke tests."""
