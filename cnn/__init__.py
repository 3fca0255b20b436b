"""A small CNN trained from scratch in JAX/Flax: training, sweeps, evaluation, guided backprop."""

__version__ = '0.2.0'
