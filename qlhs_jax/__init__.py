"""qlhs_jax: ConvNets from quasi-linear hyperbolic PDEs, in JAX/Flax.

Liu, Shao, Bai, "A Novel Convolutional Neural Network Architecture with a Continuous
Symmetry". See README.md for the map of the package.
"""

__version__ = "0.1.0"
