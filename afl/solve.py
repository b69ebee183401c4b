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
  when kappa(A) <= (trace(G) + reg) / reg <= `MIXED_PRECISION_BOUND` (and
  trace(G) + reg fits float32): the
  float32 solve is off by about kappa u_32 <= 2e-5 and one step squares
  that, to about 3e-10 relative, 200x below the float32 rounding of the
  weights these solutions become (W = P Q_l is stored in float32). The
  personalization systems of pFedACnnL on MNIST have the bound <= 66
  (eps = 2500); the server's pooled systems (bound about 5e4 with
  gamma = 100) stay float64.

Numeric guards. Every solve also returns its `Diagnostics`, computed in the
same compiled call from what the solve has at hand (a few reductions of
d or d x d_y entries per system, nothing of d x d beyond the one product of
the float64 path's residual), and `check` reads them on the host, once per
round, after the round has blocked on its solutions anyway:
* The statistics are finite iff trace(G) is. G = sum_n x_n x_n^T is a sum
  of positive semi-definite terms, so |G_ij| <= sqrt(G_ii G_jj) and
  |(X^T Y)_jk| <= sqrt(n G_jj): a NaN or Inf anywhere in a sample's row, or
  a product that overflowed (float32 products overflow for |x| beyond about
  1.8e19, x^2 > 3.4e38), reaches the diagonal. The trace is already formed
  for the bound, so this check is free.
* The Cholesky factorization succeeded iff its diagonal is finite: jax's
  `cholesky` returns NaN where the matrix is not (numerically) positive
  definite, which with reg > 0 means reg is lost in G's rounding.
* The solution is finite and fits float32 (the weights W = P Q_l are
  float32): max |P| <= the largest float32.
* The condition bound b = (trace(G) + reg) / reg >= kappa(G + reg I)
  (kappa = (lambda_max + reg) / (lambda_min + reg), lambda_max <= trace). A
  backward-stable Cholesky solve has relative forward error about
  kappa u_64 (u_64 = 2^-53 = 1.1e-16). Above `ACCURACY_BOUND` = 1e-6 / u_64
  (9.0e9) float64 no longer guarantees 1e-6 relative accuracy (about 16
  float32 ulps of the weights): `check` warns (`ConditioningWarning`).
  Above `RESOLUTION_BOUND` = 1 / u_64 (9.0e15) not one correct digit is
  guaranteed: reg is below float64's resolution of the statistics' scale
  (reg < u_64 trace(G)), as when one sample is scaled to 1e20 (its x^2 =
  1e40 swamps every other sample) or gamma / eps is far too small for the
  data; `check` raises `NumericalError`.
* The relative residual ||(G + reg I) x - rhs||_F / ||rhs||_F: for a
  float64 system of the returned solution (one more G x, d^2 d_y flops,
  about 3 d_y / d of the factorization's); for a refined system the
  residual of the float32 solution that the last refinement step corrects
  (computed by the refinement anyway), which that step shrinks by about
  kappa u_32 <= 2e-5, so the returned solution's is smaller still.
The largest bound and residual over a round's systems go into the round's
metrics (`afl.analytic`).
"""

import warnings
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy import linalg

from afl import statistics

MIXED_PRECISION_BOUND = 300.0
REFINEMENT_STEPS = 1
UNIT_ROUNDOFF = 2.0**-53  # u_64
ACCURACY_BOUND = 1e-6 / UNIT_ROUNDOFF  # 9.0e9: warn beyond (see above)
RESOLUTION_BOUND = 1.0 / UNIT_ROUNDOFF  # 9.0e15: raise beyond (see above)
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class NumericalError(ArithmeticError):
  """A solve's statistics or solution are unusable (the message says which
  layer, which clients or groups, and the likely cause)."""


class ConditioningWarning(RuntimeWarning):
  """A solve's condition bound exceeds `ACCURACY_BOUND`."""


class Diagnostics(NamedTuple):
  """What `check` reads of one system (float64 scalars; stacked [S] over a
  round's segments, zeros for a segment that was not solved).

  Attributes:
    bound: (trace(G) + reg) / reg >= kappa(G + reg I); not finite when the
      statistics are not.
    residual: relative residual (module docstring).
    nonfinite_statistics: 1 where trace(G) is not finite, else 0.
    not_positive_definite: 1 where the Cholesky factorization failed.
    nonfinite_solution: 1 where max |P| is not finite in float32.
  """

  bound: jax.Array
  residual: jax.Array
  nonfinite_statistics: jax.Array
  not_positive_definite: jax.Array
  nonfinite_solution: jax.Array


class Solved(NamedTuple):
  """A solve's result: P [..., d, k] and its Diagnostics [...]."""

  solution: jax.Array
  diagnostics: Diagnostics


class _Dense(NamedTuple):
  """A system given as its [d, d] gram and [d, k] right-hand side, with
  the methods `_solve` reads (as `statistics.Statistics` has them)."""

  gram: jax.Array
  cross: jax.Array

  def lower_system(self, reg, dtype) -> jax.Array:
    system = self.gram.astype(dtype)
    return system + reg * jnp.eye(system.shape[-1], dtype=dtype)

  def gram_times(self, x: jax.Array) -> jax.Array:
    return self.gram @ x

  def trace(self) -> jax.Array:
    return jnp.trace(self.gram)

  def labels(self) -> jax.Array:  # the solution takes the gram's dtype
    return self.cross.astype(self.gram.dtype)


def ridge_solve(
    gram: jax.Array,
    cross: jax.Array,
    reg: float,
    prior: jax.Array | None = None,
) -> Solved:
  """(gram + reg I)^-1 (cross + reg prior) for one system.

  Args:
    gram: [d, d] symmetric positive semi-definite, float64.
    cross: [d, k].
    reg: gamma (eq. 5) or eps (eq. 13), > 0.
    prior: [d, k] or None (zeros).

  Returns:
    the solution [d, k] in the dtype of `gram`, and its Diagnostics.
  """
  return _solve(_Dense(gram, cross), reg, prior)


def segment_solve(
    stats: statistics.Statistics, reg: float, prior: jax.Array | None = None
) -> Solved:
  """`ridge_solve` of one segment's statistics (no segment axis): P [d, d_y]
  of eq. 5 / 11 / 13 in label space, and its Diagnostics.

  The [d, d] gram is never put together: the factorization reads a lower
  triangle formed from the statistics' tiles in the precision branch
  (`Statistics.lower_system`, one pass fused into the conversion), and the
  residuals multiply by the tiles (`Statistics.gram_times`). Assembling the
  symmetric gram first cost 1.0 ms more per MNIST system (4.67 against
  3.64 ms), a materialized gram before the branch 1.5 ms more.
  Systems are solved one at a time, each as its segment is complete
  (`federated.segment_sum`'s finalize): jaxlib's batched LAPACK call was
  measured slower on CPU, and its parallel batch map deadlocks when several
  virtual CPU devices run it at once.
  """
  return _solve(stats, reg, prior)


def project_psd(gram: jax.Array) -> jax.Array:
  """[d, d] the nearest positive semi-definite matrix to a symmetric `gram`
  in Frobenius norm: its eigenvalues floored at 0 (`jnp.linalg.eigh`).

  For statistics made indefinite by differential-privacy noise
  (`afl.privacy`): with it, gram + reg I has every eigenvalue >= reg and
  its Cholesky factorization succeeds. Costs one d x d eigendecomposition
  (about 4x a Cholesky), so only the private path takes it.
  """
  values, vectors = jnp.linalg.eigh(gram)
  return (vectors * jnp.maximum(values, 0)) @ vectors.T


def private_segment_solve(stats: statistics.Statistics, reg: float) -> Solved:
  """`segment_solve` of noisy (private) statistics: the assembled gram is
  first projected onto the PSD cone (`project_psd`)."""
  return ridge_solve(project_psd(stats.full_gram()), stats.labels(), reg)


def dual_solve(
    rows: jax.Array, labels: jax.Array, reg: float, prior: jax.Array
) -> Solved:
  """eq. 13 in its dual (kernel) form, for a client with fewer rows than
  features:

    (X^T X + reg I)^-1 (X^T Y + reg P) = P + X^T (X X^T + reg I)^-1 (Y - X P)

  (push-through identity, (X^T X + reg I)^-1 X^T = X^T (X X^T + reg I)^-1).
  An n x n system instead of d x d: for n << d both the products (n^2 d
  instead of n d^2) and the factorization (n^3 instead of d^3) shrink.
  The kernel's trace is the gram's, so `ridge_solve` picks the same
  precision, and the Diagnostics' bound, statistics and factorization
  flags mean what they mean for the primal system; the residual is the
  kernel system's, the solution flag the returned P's.

  Args:
    rows: [n, d] design rows X with the bias column; zero rows (padding)
      drop out.
    labels: [n, k] Y (one-hot rows), zero where rows are.
    reg: eps (> 0).
    prior: [d, k] float64, P.

  Returns:
    [d, k] float64, and its Diagnostics.
  """
  kernel = (rows @ rows.T).astype(jnp.float64)
  wide = rows.astype(jnp.float64)
  residual = labels.astype(jnp.float64) - wide @ prior
  dual, diagnostics = ridge_solve(kernel, residual, reg)
  solution = prior + wide.T @ dual
  return Solved(
      solution,
      diagnostics._replace(nonfinite_solution=_nonfinite_in_float32(solution)),
  )


def _flag(condition: jax.Array) -> jax.Array:
  return condition.astype(jnp.float64)


def _nonfinite_in_float32(solution: jax.Array) -> jax.Array:
  # NaN compares false, so it is flagged too.
  return _flag(~(jnp.max(jnp.abs(solution)) <= _FLOAT32_MAX))


def _relative(residual: jax.Array, rhs: jax.Array) -> jax.Array:
  scale = jnp.linalg.norm(rhs)
  norm = jnp.linalg.norm(residual)
  return jnp.where(scale > 0, norm / jnp.where(scale > 0, scale, 1.0), norm)


def _solve(system, reg, prior):
  """ridge_solve of `system` (`_Dense` or `statistics.Statistics`: its
  lower_system, gram_times, trace and labels)."""

  def factored(factor):
    # jax's cholesky gives NaN where it fails; its diagonal shows it.
    return jnp.all(jnp.isfinite(jnp.diagonal(factor[0])))

  def residual_of(system, rhs, solution):
    # (G + reg I) x as G x + reg x: XLA's CPU dot is several times slower
    # on a fused G + reg I operand (measured 10.6 vs 4.3 ms per MNIST
    # system).
    return rhs - (system.gram_times(solution) + reg * solution)

  def right_side(system, prior):
    cross = system.labels()
    return cross if prior is None else cross + reg * prior

  def direct(system, prior):
    rhs = right_side(system, prior)
    factor = linalg.cho_factor(system.lower_system(reg, rhs.dtype), lower=True)
    solution = linalg.cho_solve(factor, rhs)
    residual = residual_of(system, rhs, solution)
    return solution, factored(factor), _relative(residual, rhs)

  def refined(system, prior):
    rhs = right_side(system, prior)
    factor = linalg.cho_factor(
        system.lower_system(reg, jnp.float32), lower=True
    )

    def correction(residual):
      return linalg.cho_solve(factor, residual.astype(jnp.float32)).astype(
          rhs.dtype
      )

    solution = correction(rhs)
    residual = None
    for _ in range(REFINEMENT_STEPS):
      residual = residual_of(system, rhs, solution)
      solution = solution + correction(residual)
    if residual is None:  # no refinement: the solution's own residual
      residual = residual_of(system, rhs, solution)
    return solution, factored(factor), _relative(residual, rhs)

  trace = system.trace()
  bound = (trace + reg) / reg  # >= kappa(system)
  # float32 holds G + reg I and its factor (|L_ij|^2 <= A_ii <= trace + reg)
  # only below its largest value: a reg of 1e37 has bound 1 and would
  # overflow there.
  mixed = (bound <= MIXED_PRECISION_BOUND) & (trace + reg < _FLOAT32_MAX)
  solution, ok, residual = jax.lax.cond(mixed, refined, direct, system, prior)
  return Solved(
      solution,
      Diagnostics(
          bound=jnp.asarray(bound, jnp.float64),
          residual=jnp.asarray(residual, jnp.float64),
          nonfinite_statistics=_flag(~jnp.isfinite(trace)),
          not_positive_definite=_flag(~ok),
          nonfinite_solution=_nonfinite_in_float32(solution),
      ),
  )


def listed(indices, limit: int = 10) -> str:
  """'3, 7, 9' (the first `limit` indices, then 'and n more')."""
  indices = np.asarray(indices)
  shown = ", ".join(str(int(i)) for i in indices[:limit])
  more = len(indices) - limit
  return shown + (f" and {more} more" if more > 0 else "")


def check(
    diagnostics: Diagnostics,
    *,
    where: str,
    reg: float,
    reg_name: str,
    names: Callable[[np.ndarray], str],
    explain: Callable[[np.ndarray], str] | None = None,
) -> dict:
  """Reads a round's Diagnostics on the host (module docstring).

  Args:
    diagnostics: Diagnostics [S] of the round's systems (zeros for the
      segments not solved), replicated.
    where: the round and layer, for the messages.
    reg: the round's gamma or eps.
    reg_name: "gamma" or "eps".
    names: segment indices [m] -> what they are ("group(s) 1, 4 (clients
      ...)", "client(s) 3").
    explain: None, or segment indices [m] -> more about them (e.g. their
      inputs' magnitudes), appended to an error.

  Returns:
    {"condition_bound": the largest bound, "residual": the largest
    relative residual}, over the round's systems.

  Raises:
    NumericalError: the first of: non-finite statistics; a bound beyond
      RESOLUTION_BOUND; a failed factorization; a solution not finite in
      float32. The message names the layer, the segments and the likely
      cause.

  Warns:
    ConditioningWarning: a bound beyond ACCURACY_BOUND.
  """
  values = Diagnostics(*(np.asarray(a, np.float64) for a in diagnostics))
  with np.errstate(invalid="ignore"):
    bounds = values.bound

    def fail(problem: str, cause: str, segments: np.ndarray):
      detail = f" {explain(segments)}" if explain is not None else ""
      raise NumericalError(
          f"{where}: {problem} for {names(segments)}. Likely cause: "
          f"{cause}.{detail}"
      )

    bad = np.flatnonzero(values.nonfinite_statistics > 0)
    if len(bad):
      spread = (
          " (a NaN or Inf can spread from one segment's sums to others "
          "combined with them at a device boundary, where sums are weighed "
          "by 0 or 1: not every one listed need be at fault)"
          if len(bad) > 1
          else ""
      )
      fail(
          f"the statistics (eq. 6's sums G, X^T Y) are not finite{spread}",
          "non-finite input values (NaN or Inf), or values so large that "
          "their products overflow (|x| beyond about 1.8e19 in float32 "
          "products, 1.3e154 in float64), or a previous layer's solution "
          "that blew the layer's inputs up",
          bad,
      )
    bad = np.flatnonzero(bounds > RESOLUTION_BOUND)
    if len(bad):
      traces = (bounds[bad] - 1) * reg
      fail(
          f"{reg_name} = {reg:g} is below float64's resolution of the "
          f"statistics: the condition bound (trace G + {reg_name}) / "
          f"{reg_name} is up to {bounds[bad].max():.3g} (trace G up to "
          f"{traces.max():.3g}), beyond 1 / u_64 = {RESOLUTION_BOUND:.3g}, "
          "so the solve would have no correct digit",
          f"huge input values (one sample of magnitude m adds m^2 to the "
          f"trace), or {reg_name} far too small for the data's scale",
          bad,
      )
    bad = np.flatnonzero(values.not_positive_definite > 0)
    if len(bad):
      fail(
          f"not positive definite: the Cholesky factorization of G + "
          f"{reg_name} I failed ({reg_name} = {reg:g})",
          f"{reg_name} is not positive, or too small for the data's scale "
          "(it is lost in the rounding of G)",
          bad,
      )
    bad = np.flatnonzero(values.nonfinite_solution > 0)
    if len(bad):
      fail(
          "the solution P (W = P Q_l) is not finite in float32",
          f"{reg_name} too small for the data's scale, or inputs so large "
          "that the weights overflow float32",
          bad,
      )
    worst = float(np.max(bounds, initial=0.0))
    if worst > ACCURACY_BOUND:
      warnings.warn(
          f"{where}: the condition bound (trace G + {reg_name}) / "
          f"{reg_name} of "
          f"{names(np.flatnonzero(bounds > ACCURACY_BOUND))} is up to "
          f"{worst:.3g}, beyond 1e-6 / u_64 = {ACCURACY_BOUND:.3g}: float64 "
          "no longer guarantees the solutions to 1e-6 (relative); "
          f"consider a larger {reg_name} or rescaled inputs",
          ConditioningWarning,
          stacklevel=2,
      )
  return {
      "condition_bound": worst,
      "residual": float(np.max(values.residual, initial=0.0)),
  }
