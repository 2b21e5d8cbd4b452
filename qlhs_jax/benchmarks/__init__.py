"""Benchmarks: training-step throughput (step.py) and the input pipeline (input.py)."""
