"""A small CNN for iNaturalist 12K in JAX/Flax: training, sweeps, evaluation, guided backprop."""
