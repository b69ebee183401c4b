"""Analytic (gradient-free) personalized federated learning in JAX.

FedACnnL and pFedACnnL (Gu et al., "Analytic Personalized Federated
Meta-Learning") on Flax models, with the data pipeline and evaluation they
share with the gradient and zeroth-order baselines.

Importing `afl` enables float64 in JAX (`jax_enable_x64`): client statistics
are accumulated and solved in float64 (see `afl.statistics`). Models, data and
forward passes stay float32; code that creates arrays should give dtypes.
"""

import jax

jax.config.update("jax_enable_x64", True)
