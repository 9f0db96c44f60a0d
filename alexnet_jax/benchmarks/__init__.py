"""Throughput benchmarks, run as commands (python -m alexnet_jax.benchmarks.<name>)."""
