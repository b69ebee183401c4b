"""The ridge solves of eq. 5 / 13: precision and the label-space form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afl import solve
from afl import statistics


def _system(n, d, k, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, d))
  return x.T @ x, rng.standard_normal((d, k)), rng.standard_normal((d, k))


@pytest.mark.parametrize("bound", [1.5, 250.0, 1e9])
def test_ridge_solve_is_accurate_far_below_float32_rounding(bound):
  gram, cross, prior = _system(50, 80, 10)  # rank 50 < 80: singular gram
  reg = np.trace(gram) / (bound - 1)  # (trace + reg) / reg = bound
  mixed = bound <= solve.MIXED_PRECISION_BOUND
  want = np.linalg.solve(gram + reg * np.eye(80), cross + reg * prior)
  got = solve.ridge_solve(
      jnp.asarray(gram), jnp.asarray(cross), reg, prior
  ).solution
  assert got.dtype == jnp.float64
  error = np.linalg.norm(got - want) / np.linalg.norm(want)
  assert error < (1e-9 if mixed else 1e-7)
  if mixed and bound > 100:
    # The refinement is what makes it so: a float32 solve alone is ~1e-7 off.
    alone = np.linalg.solve(
        (gram + reg * np.eye(80)).astype(np.float32),
        (cross + reg * prior).astype(np.float32),
    )
    alone_error = np.linalg.norm(alone - want) / np.linalg.norm(want)
    assert error < 1e-2 * alone_error


def test_label_space_solution_times_the_encoding_is_eq_13():
  gram, labels, prior_labels = _system(200, 60, 10, seed=1)
  encoding = np.random.default_rng(2).standard_normal((10, 32))
  eps = 2500.0
  got = solve.ridge_solve(jnp.asarray(gram), labels, eps, prior_labels).solution
  # eq. 13 with H = X^T Y Q and the meta-model M = P Q.
  want = np.linalg.solve(
      gram + eps * np.eye(60),
      labels @ encoding + eps * prior_labels @ encoding,
  )
  np.testing.assert_allclose(np.asarray(got) @ encoding, want, rtol=1e-10)


def test_mixed_precision_runs_inside_jit_and_map():
  gram, cross, prior = _system(40, 30, 5)
  grams = jnp.stack([jnp.asarray(gram), jnp.asarray(gram) * 1e6])
  got = jax.jit(
      lambda g: jax.lax.map(
          lambda a: solve.ridge_solve(a, cross, 1e3, prior).solution, g
      )
  )(grams)
  for a, out in zip(np.asarray(grams), np.asarray(got)):
    want = np.linalg.solve(a + 1e3 * np.eye(30), cross + 1e3 * prior)
    assert np.linalg.norm(out - want) / np.linalg.norm(want) < 1e-10


def test_dual_form_equals_eq_13_and_ignores_zero_rows():
  """P + X^T (X X^T + eps I)^-1 (Y - X P) is eq. 13's solution; padding
  rows (zero in X and Y) change nothing."""
  rng = np.random.default_rng(3)
  rows = rng.standard_normal((30, 100))
  labels = np.eye(10)[rng.integers(0, 10, 30)]
  prior = rng.standard_normal((100, 10))
  eps = 25.0
  want = np.linalg.solve(
      rows.T @ rows + eps * np.eye(100), rows.T @ labels + eps * prior
  )
  padded = np.zeros((48, 100))
  padded[5:35] = rows
  padded_labels = np.zeros((48, 10))
  padded_labels[5:35] = labels
  for x, y in ((rows, labels), (padded, padded_labels)):
    got = solve.dual_solve(jnp.asarray(x), jnp.asarray(y), eps, prior).solution
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("tiled", [False, True])
def test_statistics_are_solved_like_their_assembled_gram(tiled):
  """segment_solve assembles G and X^T Y from the segment's sums, in both
  precisions; from the tiles of the gram's lower block triangle (what the
  pass forms, `statistics.gram_tiles`; 263 columns: uneven tiles) it
  gives the same without putting the gram together."""
  rng = np.random.default_rng(4)
  width = 263 if tiled else 40
  rows = rng.standard_normal((300, width))
  labels = rng.integers(0, 10, 300)
  onehot = np.eye(10)[labels]
  square = rows.T @ rows
  tiles = statistics.gram_tiles(jnp.asarray(rows))
  assert len(tiles) == statistics.GRAM_TILES
  np.testing.assert_allclose(statistics.assemble_gram(tiles), square, atol=1e-9)
  stats = statistics.Statistics(
      tiles if tiled else jnp.asarray(square),
      jnp.asarray(rows.T @ onehot),
      jnp.asarray(onehot.sum(0)),
  )
  prior = rng.standard_normal((width + 1, 10))
  gram = np.block(
      [  # with the bias row and column
          [square, rows.sum(0)[:, None]],
          [rows.sum(0)[None], np.full((1, 1), 300.0)],
      ]
  )

  @jax.jit  # one compile for all (each op alone would compile on its own)
  def derived(stats, prior):
    solutions = [
        solve.segment_solve(stats, reg, prior).solution for reg in regs
    ]
    return (
        stats.full_gram(),
        stats.trace(),
        stats.gram_times(prior),
        stats.lower_system(3.0, jnp.float64),
        solutions,
    )

  regs = (2500.0, 1.0)  # float32 refined, float64 direct
  full, trace, times, lower, solutions = derived(stats, prior)
  np.testing.assert_allclose(full, gram, atol=1e-9)
  np.testing.assert_allclose(trace, np.trace(gram), 1e-12)
  np.testing.assert_allclose(times, gram @ prior, atol=1e-9)
  np.testing.assert_allclose(
      np.tril(np.asarray(lower)),
      np.tril(gram + 3.0 * np.eye(width + 1)),
      atol=1e-9,
  )
  cross = np.concatenate([rows.T @ onehot, onehot.sum(0)[None]])
  for reg, got in zip(regs, solutions):
    want = np.linalg.solve(gram + reg * np.eye(width + 1), cross + reg * prior)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
