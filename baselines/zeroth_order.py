"""Zeroth-order gradient estimates: FedZO's sphere and BAFFLE's Gaussian.

Both replace back-propagation by forward passes at perturbed parameters; the
perturbations are drawn at once and the perturbed losses evaluated with one
`vmap`, never a Python loop over directions.

* FedZO (Fang et al., 2022; DESIGN.md section 4), b2 directions u_j uniform on
  the unit sphere of R^d, smoothing mu:
      g = d / (mu b2) sum_j (f(x + mu u_j) - f(x)) u_j.
* BAFFLE (Feng et al., 2023), K Gaussian perturbations delta_k ~ N(0, sigma^2
  I) and Stein's identity, E[f(x + delta) delta] = sigma^2 grad f(x) + O(sigma^3):
      forward:  g = 1 / (K sigma^2) sum_k (f(x + delta_k) - f(x)) delta_k,
      central:  g = 1 / (2 K sigma^2) sum_k (f(x + delta_k) - f(x - delta_k))
                delta_k.
  f is a batch's mean loss, as in the authors' code.

pFedZO uses the sphere estimate inside pFedMe's inner problem.

Drawing the perturbations is most of an estimate's cost (b2 d or K d normals
per step against b2 or K forward passes of a small batch), so `normal` draws
them from Threefry-2x32 directly, with one counter per number: on a CPU this
is about 3x faster than `jax.random.normal`, whose default (partitionable)
Threefry derives every counter from a 64-bit index and keeps one of the two
output words, and which XLA fuses poorly into the estimate (a FedZO step on
MNIST-MLP: 20 ms instead of 71 ms).
"""

from typing import Callable

import jax
import jax.numpy as jnp
from jax.extend import random as jax_random
from jax.flatten_util import ravel_pytree
import numpy as np

LossFn = Callable[..., jax.Array]  # params pytree -> scalar


def normal(key: jax.Array, num: int, dim: int) -> jax.Array:
  """[num, dim] float32 standard normals: Threefry-2x32 under `key` of the
  counters 0 .. num dim - 1, each word made uniform on (-1, 1) (23 bits, as
  `jax.random.uniform`) and mapped through sqrt(2) erfinv, as
  `jax.random.normal` does."""
  if num * dim >= 2**32:
    raise ValueError(f"{num} x {dim} normals exceed the 2^32 counters")
  counters = jax.lax.iota(jnp.uint32, num * dim)
  bits = jax_random.threefry_2x32(jax.random.key_data(key), counters)
  one_two = jax.lax.bitcast_convert_type(  # [1, 2)
      (bits.reshape(num, dim) >> 9) | np.uint32(0x3F800000), jnp.float32
  )
  low = np.nextafter(np.float32(-1), np.float32(0))
  uniform = jnp.maximum(low, 2 * one_two - 3)  # (-1, 1)
  return np.float32(np.sqrt(2)) * jax.lax.erf_inv(uniform)


def sphere_directions(key: jax.Array, num: int, dim: int) -> jax.Array:
  """[num, dim] directions uniform on the unit sphere (normalized Gaussians)."""
  u = normal(key, num, dim)
  return u / jnp.linalg.norm(u, axis=1, keepdims=True)


def sphere_gradient(
    loss_fn: LossFn, params, key: jax.Array, mu: float, num_directions: int
):
  """FedZO's estimate of grad loss_fn(params).

  Args:
    loss_fn: params -> scalar loss (e.g. the mean loss of a batch).
    params: pytree of float32 arrays, d numbers in all.
    key: PRNG key of the directions.
    mu: smoothing radius.
    num_directions: b2.

  Returns:
    (loss_fn(params), estimate with the structure of params).
  """
  flat, unravel = ravel_pytree(params)
  directions = sphere_directions(key, num_directions, flat.size)  # [b2, d]
  loss = loss_fn(params)
  perturbed = jax.vmap(lambda u: loss_fn(unravel(flat + mu * u)))(directions)
  scale = flat.size / (mu * num_directions)
  return loss, unravel(scale * (perturbed - loss) @ directions)


def gaussian_gradient(
    loss_fn: LossFn,
    params,
    key: jax.Array,
    sigma: float,
    num_perturbations: int,
    central: bool = False,
):
  """BAFFLE's estimate of grad loss_fn(params) from K = num_perturbations
  perturbations delta_k ~ N(0, sigma^2 I), forward or central differences.

  Returns:
    (loss_fn(params), estimate with the structure of params).
  """
  flat, unravel = ravel_pytree(params)
  deltas = sigma * normal(key, num_perturbations, flat.size)  # [K, d]
  loss = loss_fn(params)
  plus = jax.vmap(lambda p: loss_fn(unravel(flat + p)))(deltas)  # [K]
  if central:
    differences = plus - jax.vmap(lambda p: loss_fn(unravel(flat - p)))(deltas)
  else:
    differences = plus - loss
  scale = 1.0 / (num_perturbations * sigma**2 * (2.0 if central else 1.0))
  return loss, unravel(scale * differences @ deltas)
