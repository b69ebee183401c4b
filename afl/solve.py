"""The server's (and, in pFedACnnL, each client's) closed-form ridge solve.

eq. 5 (and 11, per group):  W = (A_0 + gamma I)^-1 A_1.
eq. 13 (personalization):   W = (G_i + eps I)^-1 (H_i + eps M),
i.e. ridge regression shrunk towards a prior M instead of towards 0. Both are
one Cholesky factorization (`cho_factor`/`cho_solve`), never an inverse;
leading axes (groups, clients) are solved one after another.
"""

import jax
import jax.numpy as jnp
from jax.scipy import linalg


def ridge_solve(gram: jax.Array, cross: jax.Array, reg: float,
                prior: jax.Array | None = None) -> jax.Array:
  """(gram + reg I)^-1 (cross + reg prior), batched over leading axes.

  Args:
    gram: [..., d, d] symmetric positive semi-definite.
    cross: [..., d, k].
    reg: gamma (eq. 5) or eps (eq. 13), > 0.
    prior: [..., d, k] or None (zeros).

  Returns:
    [..., d, k] in the dtype of `gram`.
  """
  rhs = cross if prior is None else cross + reg * prior
  eye = jnp.eye(gram.shape[-1], dtype=gram.dtype)

  def solve_one(system):
    gram, rhs = system
    return linalg.cho_solve(linalg.cho_factor(gram + reg * eye, lower=True),
                            rhs)

  if gram.ndim == 2:
    return solve_one((gram, rhs))
  # One system after another (`lax.map`), not jaxlib's batched LAPACK call:
  # measured 1.5x faster on CPU, and the batched call's parallel batch map
  # deadlocks when several virtual CPU devices run it at once.
  lead = gram.shape[:-2]
  flat = (gram.reshape((-1,) + gram.shape[-2:]),
          rhs.reshape((-1,) + rhs.shape[-2:]))
  return jax.lax.map(solve_one, flat).reshape(lead + rhs.shape[-2:])
