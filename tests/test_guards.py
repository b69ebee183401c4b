"""Numeric guards: bad inputs are rejected at load or by the solves' own
checks (afl.solve), never turned into NaN or garbage weights, and every
analytic round reports its conditioning."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afl import analytic
from afl import data as data_lib
from afl import fedacnnl
from afl import federated
from afl import models
from afl import solve

BAD = 3  # the client whose data is spoiled (a 10-sample client: dual form)
SIZES = (150, 200, 120, 10, 180, 90, 12, 130, 100, 8)


@pytest.fixture(scope="module")
def synthetic():
  """1,000 synthetic samples over 10 clients of uneven sizes (some small
  enough for the dual form of eq. 13)."""
  x, y, _ = data_lib.synthetic(0.5, 0.5, num_clients=6, seed=2)
  x, y = x[: sum(SIZES)].astype(np.float32), y[: sum(SIZES)]
  clients = np.split(np.arange(sum(SIZES)), np.cumsum(SIZES)[:-1])
  return x, y, clients


@functools.lru_cache
def algorithm_for(statistics_dtype, gamma=100.0):
  return fedacnnl.fedacnnl(
      models.logistic_regression(10),
      num_classes=10,
      input_shape=(60,),
      mesh=federated.client_mesh(),
      gamma=gamma,
      statistics_dtype=statistics_dtype,
  )


def blocks(x, y, clients, order=None):
  mesh = federated.client_mesh()
  return federated.shard(
      federated.federate(x, y, clients, 16, num_shards=mesh.size, order=order),
      mesh,
  )


def spoiled(x, clients, value, client=BAD):
  """x with one feature of one sample of `client` set to `value` (a whole
  sample scaled by `value` for a finite value)."""
  x = x.copy()
  sample = clients[client][1]
  if np.isfinite(value):
    x[sample] *= value
  else:
    x[sample, 7] = value
  return x


# Non-finite data are rejected at load.


def client_split(x, y, clients):
  train, test = data_lib.split_train_test(clients, 0.25, seed=0)
  return data_lib.ClientSplit(x, y, train, test, 10, "synthetic")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_features_are_rejected_naming_client_and_sample(
    synthetic, value
):
  x, y, clients = synthetic
  split = client_split(x.copy(), y, clients)
  data_lib.check_finite(split)  # clean: passes
  sample = split.test_indices[BAD][0]
  split.x[sample, 7] = value
  with pytest.raises(data_lib.DataError) as error:
    data_lib.check_finite(split)
  assert (
      f"non-finite features in 1 sample(s) of 1 client(s): client {BAD} "
      f"(test sample {sample}: {np.float32(value)})" in str(error.value)
  )


def test_only_the_clients_samples_are_checked(synthetic):
  x, y, clients = synthetic
  x = np.concatenate([x, np.full((1, 60), np.nan, np.float32)])
  data_lib.check_finite(client_split(x, np.append(y, 0), clients))


def test_prepare_checks_its_split(monkeypatch):
  generator = data_lib.synthetic

  def with_a_nan(*args, **kwargs):
    x, y, clients = generator(*args, **kwargs)
    x = x.copy()
    x[clients[2][0], 0] = np.nan
    return x, y, clients

  monkeypatch.setattr("afl.data.pipeline.synthetic_lib.synthetic", with_a_nan)
  with pytest.raises(data_lib.DataError, match=r"client 2 \((train|test) "):
    data_lib.prepare("synthetic", num_clients=5)


# Bad values on FederatedData directly are caught by the solves' guards.


@pytest.mark.parametrize(
    "value, dtype, problem",
    [
        (np.nan, "float32", "are not finite"),
        (np.inf, "float64", "are not finite"),
        # One sample of magnitude 1e20: x^2 = 1e40 overflows float32
        # products, and in float64 swamps the other samples.
        (1e20, "float32", "are not finite"),
        (1e20, "float64", "below float64's resolution"),
    ],
)
def test_bad_values_fail_the_server_solve_naming_layer_and_client(
    synthetic, value, dtype, problem
):
  x, y, clients = synthetic
  data = blocks(spoiled(x, clients, value), y, clients)
  with pytest.raises(solve.NumericalError) as error:
    analytic.train(algorithm_for(dtype), data, jax.random.key(0))
  message = str(error.value)
  assert message.startswith("round 1 (federated, layer_0, eq. 5): ")
  assert problem in message
  assert "for the global model (all clients)" in message
  # The inputs' report puts the spoiled client first.
  assert f"the most suspicious first): client {BAD}: " in message


def test_bad_values_fail_the_group_solve_naming_the_group(synthetic):
  x, y, clients = synthetic
  groups = np.arange(len(clients)) % 2
  data = blocks(
      spoiled(x, clients, 1e20), y, clients, np.argsort(groups, kind="stable")
  )
  with pytest.raises(solve.NumericalError) as error:
    analytic.train(algorithm_for("float64"), data, jax.random.key(0), groups)
  assert str(error.value).startswith("round 1 (federated, layer_0, eq. 11): ")
  assert "for group(s) 1 (clients 1, 3, 5, 7, 9)" in str(error.value)


@pytest.mark.parametrize("client", [BAD, 4])  # dual form, d x d solve
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_huge_sample_fails_its_clients_personalization(
    synthetic, client, dtype
):
  """With gamma far above the spoiled sample's scale the server's solve
  passes; eq. 13 with eps = 2500 then fails for that client alone.
  (float32 products: a sample of 1e18, whose x^2 = 1e36 still fits.)"""
  x, y, clients = synthetic
  groups = np.zeros(len(clients), np.int32)
  scale, gamma = (1e20, 1e45) if dtype == "float64" else (1e18, 1e37)
  data = blocks(spoiled(x, clients, scale, client), y, clients)
  algorithm = algorithm_for(dtype)._replace(gamma=gamma)
  taken = federated.segment_apply(
      lambda p, x, y, m, s, a: m.sum(),
      algorithm.init(jax.random.key(0)),
      data,
      jnp.zeros_like(data.client),
      data.client,
      len(clients),
      federated.client_mesh(),
      1,
  )[0]
  assert bool(taken[client] > 0) == (client == BAD)  # which form it took
  with pytest.raises(solve.NumericalError) as error:
    analytic.train(
        algorithm, data, jax.random.key(0), groups, personalized=True
    )
  message = str(error.value)
  assert message.startswith("round 2 (personalization, layer_0, eq. 13): ")
  assert f"eps = 2500 is below float64's resolution" in message
  assert f"for client(s) {client}. " in message


# A failed Cholesky factorization is reported, never NaN weights.


@pytest.mark.parametrize(
    "gram, reg",
    [
        (np.diag([4.0, 0.0, 1.0]), -2.0),  # bound < 300: float32, refined
        (np.diag([1e6, -1.0, 1.0]), 1e-3),  # bound 1e9: float64
    ],
)
def test_a_failed_factorization_is_detected(gram, reg):
  solved = jax.jit(solve.ridge_solve, static_argnums=2)(
      jnp.asarray(gram), jnp.ones((3, 2)), reg
  )
  assert np.isnan(solved.solution).all()  # what jax gives
  assert float(solved.diagnostics.not_positive_definite) == 1.0
  with pytest.raises(solve.NumericalError, match="not positive definite"):
    solve.check(
        jax.tree.map(lambda a: a[None], solved.diagnostics),
        where="here",
        reg=reg,
        reg_name="gamma",
        names=lambda segments: f"system(s) {solve.listed(segments)}",
    )


def test_a_failed_factorization_fails_the_round(synthetic):
  x, y, clients = synthetic
  algorithm = algorithm_for("float64")._replace(gamma=-1e12)  # forced
  with pytest.raises(solve.NumericalError) as error:
    analytic.train(algorithm, blocks(x, y, clients), jax.random.key(0))
  assert "not positive definite: the Cholesky factorization of G + gamma I" in (
      str(error.value)
  )
  assert "round 1 (federated, layer_0, eq. 5)" in str(error.value)


# The conditioning diagnostic of every round.


def test_every_round_reports_its_condition_bound_and_residual(synthetic):
  x, y, clients = synthetic
  groups = np.arange(len(clients)) % 2
  order = np.argsort(groups, kind="stable")
  result = analytic.train(
      algorithm_for("float64"),
      blocks(x, y, clients, order),
      jax.random.key(0),
      groups,
      personalized=True,
  )
  rows = [np.c_[x[c], np.ones(len(c))] for c in clients]
  traces = np.array([np.sum(r**2) for r in rows])
  group_traces = np.bincount(groups, traces)
  federated_round, personalization_round = result.rounds
  np.testing.assert_allclose(
      federated_round["condition_bound"],
      (group_traces.max() + 100.0) / 100.0,
      rtol=1e-9,
  )
  np.testing.assert_allclose(
      personalization_round["condition_bound"],
      (traces.max() + 2500.0) / 2500.0,
      rtol=1e-9,
  )
  # The clients' systems (bounds up to 7) and one group's take float32
  # refined once, which reports the float32 solution's residual (it bounds
  # the refined one's); the other group's (388) float64.
  for record in result.rounds:
    assert 0 < record["residual"] < 1e-5


def test_an_ill_conditioned_solve_has_a_larger_bound_and_warns(synthetic):
  x, y, clients = synthetic
  data = blocks(x, y, clients)
  algorithm = algorithm_for("float64")
  with warnings.catch_warnings():
    warnings.simplefilter("error", solve.ConditioningWarning)
    well = analytic.train(algorithm, data, jax.random.key(0)).rounds[0]
  with pytest.warns(solve.ConditioningWarning, match="beyond 1e-6 / u_64"):
    ill = analytic.train(
        algorithm._replace(gamma=1e-7), data, jax.random.key(0)
    ).rounds[0]
  trace = (well["condition_bound"] - 1) * 100.0
  np.testing.assert_allclose(
      ill["condition_bound"], (trace + 1e-7) / 1e-7, rtol=1e-9
  )
  assert ill["condition_bound"] > 1e8 * well["condition_bound"]
  assert ill["residual"] < 1e-6  # backward stable all the same


def test_the_diagnostics_of_each_precision():
  rng = np.random.default_rng(0)
  rows = rng.standard_normal((50, 20))
  gram, cross = rows.T @ rows, rng.standard_normal((20, 3))
  for reg, most in ((np.trace(gram), 1e-5), (np.trace(gram) / 1e4, 1e-13)):
    # refined (the float32 solution's residual), float64 (the solution's)
    solved = solve.ridge_solve(jnp.asarray(gram), jnp.asarray(cross), reg)
    d = solved.diagnostics
    np.testing.assert_allclose(d.bound, (np.trace(gram) + reg) / reg)
    residual = np.linalg.norm(
        (gram + reg * np.eye(20)) @ solved.solution - cross
    ) / np.linalg.norm(cross)
    assert residual <= float(d.residual) * (1 + 1e-6) + 1e-15
    assert float(d.residual) < most
    assert d.nonfinite_statistics == d.not_positive_definite == 0
    assert d.nonfinite_solution == 0
