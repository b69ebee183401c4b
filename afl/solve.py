"""The server's (and, in pFedACnnL, each client's) closed-form ridge solve.

eq. 5 (and 11, per group):  W = (A_0 + gamma I)^-1 A_1.
eq. 13 (personalization):   W = (G_i + eps I)^-1 (H_i + eps M),
i.e. ridge regression shrunk towards a prior M instead of towards 0.

Solved in label space: A_1 = X^T Z = (X^T Y) Q_l (eq. 2), so eq. 5 is
W = P Q_l with P = (A_0 + gamma I)^-1 X^T Y, d x d_y; a meta-model is then
M = P^[k] Q_l too, and eq. 13 is W = (G_i + eps I)^-1 (X_i^T Y_i + eps P^[k])
Q_l. The same numbers, with d_y right-hand sides instead of d_l (10 instead
of 128 on MNIST's first layer), which also makes refinement cheap:

Every system is one Cholesky factorization (`cho_factor`/`cho_solve`), never
an inverse, in one of two precisions chosen per system at run time:
* float64, when the system may be ill-conditioned;
* float32 factorization (about 2.6x faster on CPU) followed by
  `REFINEMENT_STEPS` step of iterative refinement with a float64 residual,
  when kappa(A) <= (trace(G) + reg) / reg <= `MIXED_PRECISION_BOUND`: the
  float32 solve is off by about kappa u_32 <= 2e-5 and one step squares
  that, to about 3e-10 relative, 200x below the float32 rounding of the
  weights these solutions become (W = P Q_l is stored in float32). The
  personalization systems of pFedACnnL on MNIST have the bound <= 66
  (eps = 2500); the server's pooled systems (bound about 5e4 with
  gamma = 100) stay float64.
"""

import jax
import jax.numpy as jnp
from jax.scipy import linalg

from afl import statistics

MIXED_PRECISION_BOUND = 300.0
REFINEMENT_STEPS = 1


def ridge_solve(
    gram: jax.Array,
    cross: jax.Array,
    reg: float,
    prior: jax.Array | None = None,
) -> jax.Array:
  """(gram + reg I)^-1 (cross + reg prior) for one system.

  Args:
    gram: [d, d] symmetric positive semi-definite, float64.
    cross: [d, k].
    reg: gamma (eq. 5) or eps (eq. 13), > 0.
    prior: [d, k] or None (zeros).

  Returns:
    [d, k] in the dtype of `gram`.
  """
  return _solve(lambda system: system, (gram, cross), reg, prior)


def segment_solve(
    stats: statistics.Statistics, reg: float, prior: jax.Array | None = None
) -> jax.Array:
  """`ridge_solve` of one segment's statistics (no segment axis): P [d, d_y]
  of eq. 5 / 11 / 13 in label space.

  The [d, d] gram with its bias row is assembled inside the solve's
  precision branch, fused into the conversion that the factorization reads:
  assembled before the branch, it is materialized and copied, which cost
  1.5 ms more per MNIST system (150 ms of pFedACnnL's 100 client solves).
  Systems are solved one at a time, each as its segment is complete
  (`federated.segment_sum`'s finalize): jaxlib's batched LAPACK call was
  measured slower on CPU, and its parallel batch map deadlocks when several
  virtual CPU devices run it at once.
  """
  return _solve(lambda s: (s.full_gram(), s.labels()), stats, reg, prior)


def dual_solve(
    rows: jax.Array, labels: jax.Array, reg: float, prior: jax.Array
) -> jax.Array:
  """eq. 13 in its dual (kernel) form, for a client with fewer rows than
  features:

    (X^T X + reg I)^-1 (X^T Y + reg P) = P + X^T (X X^T + reg I)^-1 (Y - X P)

  (push-through identity, (X^T X + reg I)^-1 X^T = X^T (X X^T + reg I)^-1).
  An n x n system instead of d x d: for n << d both the products (n^2 d
  instead of n d^2) and the factorization (n^3 instead of d^3) shrink.
  The kernel's trace is the gram's, so `ridge_solve` picks the same
  precision.

  Args:
    rows: [n, d] design rows X with the bias column; zero rows (padding)
      drop out.
    labels: [n, k] Y (one-hot rows), zero where rows are.
    reg: eps (> 0).
    prior: [d, k] float64, P.

  Returns:
    [d, k] float64.
  """
  kernel = (rows @ rows.T).astype(jnp.float64)
  wide = rows.astype(jnp.float64)
  residual = labels.astype(jnp.float64) - wide @ prior
  return prior + wide.T @ ridge_solve(kernel, residual, reg)


def _solve(assemble, system, reg, prior):
  """ridge_solve of the (gram, cross) that `assemble(system)` gives."""

  def direct(system, prior):
    gram, cross = assemble(system)
    rhs = cross if prior is None else cross + reg * prior
    eye = jnp.eye(gram.shape[-1], dtype=gram.dtype)
    return linalg.cho_solve(
        linalg.cho_factor(gram + reg * eye, lower=True), rhs
    )

  def refined(system, prior):
    gram, cross = assemble(system)
    rhs = cross if prior is None else cross + reg * prior
    eye = jnp.eye(gram.shape[-1], dtype=jnp.float32)
    factor = linalg.cho_factor(gram.astype(jnp.float32) + reg * eye, lower=True)

    def correction(residual):
      return linalg.cho_solve(factor, residual.astype(jnp.float32)).astype(
          gram.dtype
      )

    solution = correction(rhs)
    for _ in range(REFINEMENT_STEPS):
      # (G + reg I) x as G x + reg x: XLA's CPU dot is several times slower
      # on a fused G + reg I operand (measured 10.6 vs 4.3 ms per MNIST
      # system).
      solution = solution + correction(rhs - (gram @ solution + reg * solution))
    return solution

  bound = (jnp.trace(assemble(system)[0]) + reg) / reg  # >= kappa(system)
  return jax.lax.cond(
      bound <= MIXED_PRECISION_BOUND, refined, direct, system, prior
  )
