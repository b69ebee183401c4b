"""FedAvg, FedZO, BAFFLE, pFedMe and pFedZO as per-client local training plus
a server update (DESIGN.md section 4).

Each builder returns a `Baseline`: the client's `local.LocalTraining` and the
server's update of its model from the clients' weighted mean upload. The
gradient of a local step is pluggable (`first_order` or `zeroth_order`), so
FedAvg / FedZO and pFedMe / pFedZO are one function each.

* FedAvg (McMahan et al., 2017): local SGD from the server model, the server
  takes the sample-weighted mean of the client models.
* FedZO (Fang et al., 2022): the same with the sphere estimate
  (`zeroth_order.sphere_gradient`) in place of the gradient.
* BAFFLE (Feng et al., 2023), its FedSGD form: each client evaluates K
  Gaussian perturbations of the server model on all its samples (the sums
  of loss differences accumulate batch by batch) and uploads the
  Stein's-identity estimate; the server steps w <- w - lr mean(g_i).
* pFedMe (T. Dinh et al., 2020): per local step on a batch, K steps on the
  personalized model of the Moreau-envelope problem
  theta <- theta - personal_lr (grad f_i(theta) + lam (theta - w_i)), then
  w_i <- w_i - lr lam (w_i - theta); the server mixes
  w <- (1 - beta) w + beta mean(w_i). Each client is tested with its theta
  (the paper's personalized model) or, with tested="local", with its w_i:
  what the authors' code (CharlieDinh/pFedMe) tests, because its
  `persionalized_model_bar` aliases the model's parameters, which hold w_i
  when the test runs.
* pFedZO: pFedMe with the sphere estimate of grad f_i(theta).
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from baselines import local as local_lib
from baselines import zeroth_order

Params = Any
# pFedMe / pFedZO: which model of the carry (theta, w_i) a client is tested
# with.
MOREAU_TESTED = ("theta", "local")
# (loss_fn: params -> scalar, params, key) -> (loss, gradient estimate)
Gradient = Callable[[Callable, Params, jax.Array], tuple[jax.Array, Params]]


class Baseline(NamedTuple):
  """A baseline algorithm.

  Attributes:
    local: what a client computes in a round.
    server: (server model, mean upload) -> next server model.
  """

  local: local_lib.LocalTraining
  server: Callable[[Params, Any], Params]


def mean_cross_entropy(apply_fn, params, x, y, mask) -> jax.Array:
  """Softmax cross-entropy averaged over the real (masked) samples."""
  losses = optax.softmax_cross_entropy_with_integer_labels(
      apply_fn(params, x), y
  )
  return jnp.sum(losses * mask) / jnp.maximum(mask.sum(), 1)


def first_order() -> Gradient:
  """Back-propagation (the key is unused)."""
  return lambda loss_fn, params, key: jax.value_and_grad(loss_fn)(params)


def zeroth_order_sphere(mu: float, num_directions: int) -> Gradient:
  """FedZO's estimate with b2 = num_directions directions, smoothing mu."""

  def gradient(loss_fn, params, key):
    return zeroth_order.sphere_gradient(
        loss_fn, params, key, mu, num_directions
    )

  return gradient


def _tree_axpy(a, x, y):
  return jax.tree.map(lambda u, v: a * u + v, x, y)


def local_sgd(
    apply_fn, gradient: Gradient, optimizer: optax.GradientTransformation
) -> Baseline:
  """FedAvg (first_order) and FedZO (zeroth_order_sphere)."""

  def init(params, key):
    del key
    return params, optimizer.init(params)

  def step(carry, x, y, mask, key):
    params, state = carry
    loss, grads = gradient(
        lambda p: mean_cross_entropy(apply_fn, p, x, y, mask), params, key
    )
    updates, state = optimizer.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), loss

  return Baseline(
      local_lib.LocalTraining(init, step, upload=lambda carry: carry[0]),
      server=lambda params, mean: mean,
  )


def fedavg(apply_fn, lr: float) -> Baseline:
  return local_sgd(apply_fn, first_order(), optax.sgd(lr))


def fedzo(apply_fn, lr: float, mu: float, num_directions: int) -> Baseline:
  return local_sgd(
      apply_fn, zeroth_order_sphere(mu, num_directions), optax.sgd(lr)
  )


def baffle(
    apply_fn,
    lr: float,
    sigma: float,
    num_perturbations: int,
    central: bool,
) -> Baseline:
  """BAFFLE: the carry holds the fixed server model, the client's key and the
  running sums of the K loss differences over its samples."""

  def perturbations(params, key):
    flat, _ = ravel_pytree(params)
    return zeroth_order.gaussian_perturbations(
        key, num_perturbations, flat.size, sigma
    )

  def init(params, key):
    zero = jnp.zeros((), jnp.float32)
    return params, key, jnp.zeros(num_perturbations, jnp.float32), zero

  def step(carry, x, y, mask, key):
    del key  # the client's K perturbations are the same for all its batches
    params, client_key, differences, count = carry

    def loss_sum(p):
      return mean_cross_entropy(apply_fn, p, x, y, mask) * mask.sum()

    differences += zeroth_order.gaussian_differences(
        loss_sum, params, perturbations(params, client_key), central
    )
    n = mask.sum()
    loss = loss_sum(params) / jnp.maximum(n, 1)
    return (params, client_key, differences, count + n), loss

  def upload(carry):
    params, client_key, differences, count = carry
    return zeroth_order.stein_gradient(
        differences / jnp.maximum(count, 1),
        perturbations(params, client_key),
        sigma,
        central,
        params,
    )

  return Baseline(
      local_lib.LocalTraining(init, step, upload),
      server=lambda params, mean: _tree_axpy(-lr, mean, params),
  )


def moreau(
    apply_fn,
    gradient: Gradient,
    lr: float,
    personal_lr: float,
    lam: float,
    inner_steps: int,
    beta: float,
    tested: str = "theta",
) -> Baseline:
  """pFedMe (first_order) and pFedZO (zeroth_order_sphere).

  The carry is (theta, w): the personalized model and the local model, both
  the server model at the client's first step. `tested`: "theta" or "local"
  (w_i), the client model that is tested (module docstring).
  """
  if tested not in MOREAU_TESTED:
    raise ValueError(f"tested={tested!r} is not one of {MOREAU_TESTED}")

  def init(params, key):
    del key
    return params, params

  def step(carry, x, y, mask, key):
    theta, w = carry

    def inner(theta, index):
      loss, grads = gradient(
          lambda p: mean_cross_entropy(apply_fn, p, x, y, mask),
          theta,
          jax.random.fold_in(key, index),
      )
      theta = jax.tree.map(
          lambda t, g, v: t - personal_lr * (g + lam * (t - v)), theta, grads, w
      )
      return theta, loss

    theta, losses = jax.lax.scan(inner, theta, jnp.arange(inner_steps))
    w = jax.tree.map(lambda v, t: v - lr * lam * (v - t), w, theta)
    return (theta, w), losses[-1]

  return Baseline(
      local_lib.LocalTraining(
          init,
          step,
          upload=lambda carry: carry[1],
          personal=lambda carry: carry[MOREAU_TESTED.index(tested)],
      ),
      server=lambda params, mean: jax.tree.map(
          lambda v, m: (1 - beta) * v + beta * m, params, mean
      ),
  )


def pfedme(
    apply_fn, lr, personal_lr, lam, inner_steps, beta, tested="theta"
) -> Baseline:
  return moreau(
      apply_fn, first_order(), lr, personal_lr, lam, inner_steps, beta, tested
  )


def pfedzo(
    apply_fn,
    lr,
    personal_lr,
    lam,
    inner_steps,
    beta,
    mu,
    num_directions,
    tested="theta",
) -> Baseline:
  return moreau(
      apply_fn,
      zeroth_order_sphere(mu, num_directions),
      lr,
      personal_lr,
      lam,
      inner_steps,
      beta,
      tested,
  )
