"""The server's (and, in pFedACnnL, each client's) closed-form ridge solve.

eq. 5 (and 11, per group):  W = (A_0 + gamma I)^-1 A_1.
eq. 13 (personalization):   W = (G_i + eps I)^-1 (H_i + eps M),
i.e. ridge regression shrunk towards a prior M instead of towards 0. Both are
one Cholesky factorization (`cho_factor`/`cho_solve`), never an inverse;
`solve_statistics` solves every segment (group, client) of a layer's sums.
"""

import jax
import jax.numpy as jnp
from jax.scipy import linalg

from afl import statistics


def ridge_solve(
    gram: jax.Array,
    cross: jax.Array,
    reg: float,
    prior: jax.Array | None = None,
) -> jax.Array:
  """(gram + reg I)^-1 (cross + reg prior) for one system.

  Args:
    gram: [d, d] symmetric positive semi-definite.
    cross: [d, k].
    reg: gamma (eq. 5) or eps (eq. 13), > 0.
    prior: [d, k] or None (zeros).

  Returns:
    [d, k] in the dtype of `gram`.
  """
  rhs = cross if prior is None else cross + reg * prior
  eye = jnp.eye(gram.shape[-1], dtype=gram.dtype)
  return linalg.cho_solve(linalg.cho_factor(gram + reg * eye, lower=True), rhs)


def solve_statistics(
    stats: statistics.Statistics,
    encoding: jax.Array,
    reg: float,
    prior: jax.Array,
) -> jax.Array:
  """eq. 5 / 11 / 13 for every segment of `stats`: W [S, d, d_l].

  One system after another (`lax.map`), each assembled from its segment's
  sums inside the loop (no [S, d, d] copy with the bias row), rather than
  jaxlib's batched LAPACK call: measured about 1.5x faster on CPU, and the
  batched call's parallel batch map deadlocks when several virtual CPU
  devices run it at once.

  Args:
    stats: summed statistics, [S, ...].
    encoding: Q_l [d_y, d_l] (identity for the output layer).
    reg: gamma or eps.
    prior: [S, d, d_l] (zeros for eq. 5 and 11).
  """

  def one(system):
    segment, segment_prior = system
    return ridge_solve(
        segment.full_gram(), segment.cross(encoding), reg, segment_prior
    )

  return jax.lax.map(one, (stats, prior))
