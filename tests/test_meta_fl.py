"""Generalized meta-FL: the meta-gradient, its first-order variant, nu = 0."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import afl
from afl import evaluation
from afl import federated
from afl import models
from baselines import algorithms
from afl import lanes
from baselines import meta_fl
from tests.test_baselines import tiny_federation


def batches(nu, b=5, dim=6, classes=3, seed=0):
  rng = np.random.default_rng(seed)
  xs = rng.normal(size=(nu + 1, b, dim))
  ys = rng.integers(0, classes, (nu + 1, b)).astype(np.int32)
  return xs, ys, np.ones((nu + 1, b), bool)


@pytest.mark.parametrize("nu", [1, 3])
def test_exact_meta_gradient_matches_finite_differences(nu):
  """Central differences of f(phi^nu(w)) in float64 along random directions
  equal the directional derivative of the exact meta-gradient, and the
  first-order one (which drops the Hessian terms) does not."""
  model = models.get_model("mlp", 3)
  loss_fn = functools.partial(
      evaluation.mean_cross_entropy,
      lambda p, x: jnp.tanh(model.apply(p, x)),  # smooth
  )
  with jax.enable_x64(True):
    params = jax.tree.map(
        lambda a: a.astype(jnp.float64),
        models.init_params(model, jax.random.key(0), (6,)),
    )
    flat, unravel = ravel_pytree(params)
    xs, ys, masks = batches(nu)

    def objective(vector, exact=True):
      return meta_fl.meta_loss(
          loss_fn, unravel(vector), xs, ys, masks, 0.5, exact
      )

    exact = jax.grad(objective)(flat)
    first = jax.grad(functools.partial(objective, exact=False))(flat)
    rng = np.random.default_rng(1)
    for _ in range(3):
      d = rng.normal(size=flat.shape)
      d /= np.linalg.norm(d)
      eps = 1e-5
      numeric = (objective(flat + eps * d) - objective(flat - eps * d)) / (
          2 * eps
      )
      np.testing.assert_allclose(exact @ d, numeric, rtol=1e-6, atol=1e-9)
    assert np.linalg.norm(exact - first) > 1e-3 * np.linalg.norm(exact)


def test_first_order_equals_exact_for_a_linear_loss():
  """With f linear in the parameters the Hessian is zero, so dropping the
  second-order terms changes nothing."""
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=6)), "b": jnp.asarray(0.3)}

  def linear(p, x, y, mask):
    return jnp.sum(mask * (x @ p["w"] + p["b"] * y)) / mask.sum()

  for nu in (1, 2, 5):
    xs, ys, masks = batches(nu)
    grads = [
        jax.grad(meta_fl.meta_loss, argnums=1)(
            linear, params, xs, ys, masks, 0.3, exact
        )
        for exact in (True, False)
    ]
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        *grads,
    )
    # ... and the inner steps did move the parameters.
    phi = meta_fl.inner_steps(
        linear, params, xs[:-1], ys[:-1], masks[:-1], 0.3, True
    )
    assert not np.allclose(phi["w"], params["w"])


@pytest.mark.parametrize("local_steps", [0, 3])
def test_nu_zero_is_fedavg(local_steps):
  x, y, indices = tiny_federation(num_clients=7)
  model = models.get_model("mlp", 3)
  params = models.init_params(model, jax.random.key(1), (6,))
  data = lanes.client_data(x, y, indices)
  sizes = np.asarray(data.size)
  mesh = federated.client_mesh(jax.devices()[:2])
  schedule = lanes.make_schedule(
      sizes, 4, local_steps, num_shards=2, num_lanes=2
  )
  models_after = []
  for baseline in (
      algorithms.fedavg(model.apply, 0.1),
      meta_fl.meta_fedavg(model.apply, 0.1, 0.7, 0, "exact"),
  ):
    round_fn = lanes.round_fn(baseline.local, schedule, sizes, mesh)
    p = params
    for index in range(3):
      p = baseline.server(p, round_fn(p, data, jax.random.key(index)).upload)
    models_after.append(p)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
      *models_after,
  )


def test_fine_tuner_takes_nu_sgd_steps_per_client():
  x, y, indices = tiny_federation(num_clients=5)
  model = models.get_model("lr", 3)
  params = models.init_params(model, jax.random.key(0), (6,))
  data = lanes.client_data(x, y, indices)
  sizes = np.asarray(data.size)
  mesh = federated.client_mesh(jax.devices()[:1])
  tuned = meta_fl.fine_tuner(model.apply, 0.5, 2, 4, sizes, mesh)(
      params, data, jax.random.key(0)
  )
  untuned = meta_fl.fine_tuner(model.apply, 0.5, 0, 4, sizes, mesh)(
      params, data, jax.random.key(0)
  )
  for c, size in enumerate(sizes):
    moved = np.abs(
        tuned["params"]["layer_0"]["kernel"][c]
        - params["params"]["layer_0"]["kernel"]
    ).max()
    assert (moved > 1e-4) == (size > 0), (c, moved)
    np.testing.assert_array_equal(
        untuned["params"]["layer_0"]["kernel"][c],
        params["params"]["layer_0"]["kernel"],
    )


@pytest.mark.parametrize("nu, meta_grad", [(1, "exact"), (2, "first_order")])
def test_meta_fedavg_learns_a_tiny_federation(nu, meta_grad):
  x, y, indices = tiny_federation(num_clients=7, seed=1)
  model = models.get_model("lr", 3)
  params = models.init_params(model, jax.random.key(0), (6,))
  data = lanes.client_data(x, y, indices)
  sizes = np.asarray(data.size)
  mesh = federated.client_mesh(jax.devices()[:1])
  baseline = meta_fl.meta_fedavg(model.apply, 0.1, 0.1, nu, meta_grad)
  schedule = lanes.make_schedule(sizes, 4 * (nu + 1), 3, num_lanes=2)
  round_fn = lanes.round_fn(baseline.local, schedule, sizes, mesh)
  tune = meta_fl.fine_tuner(model.apply, 0.1, nu, 4, sizes, mesh, 2)

  def accuracy(params):
    tuned = tune(params, data, jax.random.key(9))
    hits = [
        model.apply(jax.tree.map(lambda a: a[c], tuned), x[i]).argmax(-1)
        == y[i]
        for c, i in enumerate(indices)
        if len(i)
    ]
    return float(np.concatenate(hits).mean())

  before = accuracy(params)
  for index in range(5):
    params = baseline.server(
        params, round_fn(params, data, jax.random.key(index)).upload
    )
  after = accuracy(params)
  assert after > max(0.9, before + 0.15), (before, after)


def test_meta_fedavg_writes_results(tmp_path):
  config = afl.get_config(
      algorithm="meta_fedavg",
      model="lr",
      num_clients=10,
      rounds=3,
      nu=2,
      meta_grad="first_order",
      local_steps=5,
  )
  results = afl.train_and_evaluate(config, tmp_path, progress=False)
  on_disk = json.loads((tmp_path / "results.json").read_text())
  assert on_disk["algorithm"] == "meta_fedavg"
  assert on_disk["config"]["meta_fedavg"]["nu"] == 2
  assert len(on_disk["accuracy_per_round"]) == 3
  assert len(on_disk["train_loss_per_round"]) == 3
  assert results["accuracy"] > 0.3


def test_bad_meta_settings_are_rejected():
  with pytest.raises(ValueError, match="nu"):
    meta_fl.meta_fedavg(lambda p, x: x, 0.1, 0.1, -1, "exact")
  with pytest.raises(ValueError, match="meta_grad"):
    meta_fl.meta_fedavg(lambda p, x: x, 0.1, 0.1, 1, "second")
