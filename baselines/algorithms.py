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
* BAFFLE (Feng et al., 2023), with epoch-level communication as the
  authors' `--fedopt FedAvg`: local steps as FedAvg's, each with the
  Stein's-identity estimate of K Gaussian perturbations
  (`zeroth_order.gaussian_gradient`) and the authors' optimizer (the
  estimate clipped to max |g| <= 0.3, Adam with betas (0.9, 0.99), weight
  decay 5e-4); the server averages the client models. (The FedSGD form, one
  server step per round from the clients' estimates over all their samples,
  takes 20 steps in the paper's 20 rounds: even the exact gradient at lr 0.05
  reaches 45% on MNIST-MLP that way.) Deviations from the authors' code
  (FengHZ/BAFFLE), for cost or for the shared set-up: batch 200 instead of
  32 (a step's cost is drawing its K x d normals, about the same at either
  batch, so an epoch at 32 costs about 5x more; `baselines.iterative`),
  the pFedACnnL paper's models instead of their Hardswish LeNet,
  sample-weighted averaging (theirs: equal clients), Adam's moments
  restarted every round (theirs persist per client) and no EMA of the
  tested model.
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
* DP-FedAvg (McMahan et al., 2018): FedAvg whose clients upload the server
  model plus their update clipped to norm <= C (`clipped_updates`); the
  equal-weight mean and its Gaussian noise are `baselines.iterative`'s
  (`afl.privacy`).
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from afl import evaluation
from afl import lanes
from afl import privacy
from baselines import catalog
from baselines import zeroth_order

Params = Any
MOREAU_TESTED = catalog.MOREAU_TESTED
# (loss_fn: params -> scalar, params, key) -> (loss, gradient estimate)
Gradient = Callable[[Callable, Params, jax.Array], tuple[jax.Array, Params]]


class Baseline(NamedTuple):
  """A baseline algorithm.

  Attributes:
    local: what a client computes in a round.
    server: (server model, mean upload) -> next server model.
  """

  local: lanes.LocalTraining
  server: Callable[[Params, Any], Params]


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


def local_sgd(
    apply_fn, gradient: Gradient, optimizer: optax.GradientTransformation
) -> Baseline:
  """FedAvg (first_order), FedZO (zeroth_order_sphere) and BAFFLE
  (zeroth_order_gaussian)."""

  def init(params, key):
    del key
    return params, optimizer.init(params)

  def step(carry, x, y, mask, key):
    params, state = carry
    loss, grads = gradient(
        lambda p: evaluation.mean_cross_entropy(apply_fn, p, x, y, mask),
        params,
        key,
    )
    updates, state = optimizer.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), loss

  return Baseline(
      lanes.LocalTraining(init, step, upload=lambda carry: carry[0]),
      server=lambda params, mean: mean,
  )


def clipped_updates(baseline: Baseline, clip: float) -> Baseline:
  """`baseline` whose client uploads the server model plus its update
  (upload - server model) scaled down to global L2 norm <= clip; the carry
  keeps the server model it started from."""
  local = baseline.local

  def init(params, key):
    return local.init(params, key), params

  def step(carry, x, y, mask, key):
    inner, start = carry
    inner, loss = local.step(inner, x, y, mask, key)
    return (inner, start), loss

  def upload(carry):
    inner, start = carry
    update = jax.tree.map(jnp.subtract, local.upload(inner), start)
    return jax.tree.map(jnp.add, start, privacy.clip_tree(update, clip))

  return baseline._replace(local=lanes.LocalTraining(init, step, upload))


def fedavg(apply_fn, lr: float) -> Baseline:
  return local_sgd(apply_fn, first_order(), optax.sgd(lr))


def fedzo(apply_fn, lr: float, mu: float, num_directions: int) -> Baseline:
  return local_sgd(
      apply_fn, zeroth_order_sphere(mu, num_directions), optax.sgd(lr)
  )


def zeroth_order_gaussian(
    sigma: float, num_perturbations: int, central: bool
) -> Gradient:
  """BAFFLE's Stein's-identity estimate with K = num_perturbations."""

  def gradient(loss_fn, params, key):
    return zeroth_order.gaussian_gradient(
        loss_fn, params, key, sigma, num_perturbations, central
    )

  return gradient


def clip_max_abs(bound: float) -> optax.GradientTransformation:
  """Scales the whole update down to max |u| <= bound: PyTorch's
  clip_grad_norm_(max_norm=bound, norm_type=inf), eps 1e-6 as there."""

  def clip(updates, params):
    del params
    flat, _ = ravel_pytree(updates)
    scale = jnp.minimum(1.0, bound / (jnp.max(jnp.abs(flat)) + 1e-6))
    return jax.tree.map(lambda u: scale * u, updates)

  return optax.stateless(clip)


def baffle_optimizer(lr: float) -> optax.GradientTransformation:
  """BAFFLE's optimizer (FengHZ/BAFFLE, main.py and model/stein_identity.py):
  the estimate clipped to max |g| <= 0.3, then torch.optim.Adam with betas
  (0.9, 0.99) and weight decay 5e-4 (L2 added to the gradient)."""
  return optax.chain(
      clip_max_abs(0.3),
      optax.add_decayed_weights(5e-4),
      optax.scale_by_adam(b1=0.9, b2=0.99),
      optax.scale(-lr),
  )


def baffle(
    apply_fn,
    lr: float,
    sigma: float,
    num_perturbations: int,
    central: bool,
) -> Baseline:
  """BAFFLE with epoch-level communication (the authors' `--fedopt FedAvg`):
  every local step estimates the gradient of its batch from K fresh
  Gaussian perturbations and takes a `baffle_optimizer` step; the server
  averages the client models."""
  return local_sgd(
      apply_fn,
      zeroth_order_gaussian(sigma, num_perturbations, central),
      baffle_optimizer(lr),
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
          lambda p: evaluation.mean_cross_entropy(apply_fn, p, x, y, mask),
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
      lanes.LocalTraining(
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
