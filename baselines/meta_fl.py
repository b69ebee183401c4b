"""Generalized meta federated learning: FedAvg on the nu-step meta-objective
(DESIGN.md section 4; ../shared/papers/generalized-meta-fl.txt).

The agents minimize (1/n) sum_i f_i(phi_i^nu(w)) with

  phi^0 = w,   phi^{t+1} = phi^t - alpha grad f_i(phi^t; D_t),   t < nu,

the loss of the model each agent gets after nu fine-tuning steps of size
alpha (`personal_lr`). A client's local step on the meta-objective draws
nu + 1 independent batches D_0 .. D_nu of b samples (disjoint positions of
its shuffled samples: the driver hands it one batch of (nu + 1) b, split in
order), runs the nu inner steps on D_0 .. D_{nu-1} and takes
w <- w - beta grad_w f_i(phi^nu(w); D_nu) (beta: `lr`). The server averages
the client models weighted by their sample counts, as FedAvg.

* exact: JAX differentiates through the `lax.scan` of the inner steps, so
  the meta-gradient carries the Hessian-vector products
  prod_t (I - alpha H_i(phi^t)) applied to grad f_i(phi^nu).
* first_order: the inner gradients are constants (`stop_gradient`), so
  d phi^nu / dw = I and the meta-gradient is grad f_i(phi^nu) (FO-MAML).

Cost of a local step, in FedAvg steps (one gradient on b rows; measured by
`experiments.benchmark_meta`): first order nu + 1 gradients; exact nu + 1
gradients and nu Hessian-vector products, 3.13 / 5.25 / 11.63 x in FLOPs
for nu = 1 / 2 / 5 on MNIST-MLP. No formulation gets under (nu + 2) x for
nu >= 2: each product H v needs the first layer's tangent products
X_t v_W1 and X_t^T d(dY_1), 0.86 of a FedAvg step by themselves, so the
floor is 2.81 / 4.65 / 10.2 x (the benchmark's docstring has the argument
and the alternatives tried: forward-over-reverse with stored
linearizations, recomputation, `jax.checkpoint`).

nu = 1 with exact gradients is Per-FedAvg (Fallah et al., 2020) with its
three independent batches reduced to two: the Hessian-vector product is
taken on the inner batch D_0, as exact differentiation of the one-step
objective gives. nu = 0 is FedAvg (one batch of b, one SGD step).

Evaluation (`fine_tuner`): every client fine-tunes the server model with nu
steps of size alpha on batches of b of its training samples (the inner loop
of the meta-objective, run by the shared lane driver), then is tested.
"""

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from afl import evaluation
from afl import lanes
from baselines import algorithms
from baselines import catalog

META_GRADIENTS = catalog.META_GRADIENTS


def inner_steps(loss_fn, params, xs, ys, masks, alpha: float, exact: bool):
  """phi^nu: nu gradient steps of size alpha, one per batch.

  Args:
    loss_fn: (params, x [b, ...], y [b], mask [b]) -> scalar f_i.
    params: phi^0 = w.
    xs, ys, masks: [nu, b, ...], [nu, b], [nu, b] the inner batches.
    alpha: the inner step size.
    exact: False: the inner gradients are held constant (first order).
  """

  def one(phi, batch):
    g = jax.grad(loss_fn)(phi, *batch)
    if not exact:
      g = jax.lax.stop_gradient(g)
    return jax.tree.map(lambda p, d: p - alpha * d, phi, g), None

  phi, _ = jax.lax.scan(one, params, (xs, ys, masks), unroll=True)
  return phi


def meta_loss(loss_fn, params, xs, ys, masks, alpha: float, exact: bool):
  """f_i(phi^nu(w); D_nu): the loss on the last of nu + 1 batches [nu+1, b]
  after nu inner steps on the others."""
  phi = inner_steps(loss_fn, params, xs[:-1], ys[:-1], masks[:-1], alpha, exact)
  return loss_fn(phi, xs[-1], ys[-1], masks[-1])


def split_batch(x, y, mask, parts: int):
  """One batch of parts * b rows as `parts` consecutive batches of b (a
  batch of other sizes is first padded with masked rows: the driver always
  hands (nu + 1) b, the clock's FLOP fit other sizes)."""
  pad = -x.shape[0] % parts
  x, y = (jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) for a in (x, y))
  mask = jnp.pad(mask, (0, pad))  # pads with False
  return tuple(a.reshape((parts, -1) + a.shape[1:]) for a in (x, y, mask))


def meta_local(
    apply_fn, lr: float, alpha: float, nu: int, exact: bool
) -> lanes.LocalTraining:
  """A client's local SGD on the nu-step meta-objective (module docstring):
  every step takes one batch of (nu + 1) b rows."""
  loss_fn = functools.partial(evaluation.mean_cross_entropy, apply_fn)

  def init(params, key):
    del key
    return params

  def step(params, x, y, mask, key):
    del key
    xs, ys, masks = split_batch(x, y, mask, nu + 1)
    loss, grads = jax.value_and_grad(meta_loss, argnums=1)(
        loss_fn, params, xs, ys, masks, alpha, exact
    )
    return jax.tree.map(lambda p, g: p - lr * g, params, grads), loss

  return lanes.LocalTraining(init, step, upload=lambda params: params)


def meta_fedavg(
    apply_fn, lr: float, alpha: float, nu: int, meta_grad: str
) -> algorithms.Baseline:
  """FedAvg on the nu-step meta-objective; the server averages."""
  if nu < 0:
    raise ValueError(f"--nu must be >= 0, got {nu}")
  if meta_grad not in META_GRADIENTS:
    raise ValueError(
        f"--meta_grad={meta_grad!r} is not one of {META_GRADIENTS}"
    )
  return algorithms.Baseline(
      meta_local(apply_fn, lr, alpha, nu, meta_grad == "exact"),
      server=lambda params, mean: mean,
  )


def fine_tune_local(apply_fn, alpha: float) -> lanes.LocalTraining:
  """SGD of size alpha from the server model, the result as personal model."""

  def step(params, x, y, mask, key):
    del key
    loss, grads = jax.value_and_grad(evaluation.mean_cross_entropy, argnums=1)(
        apply_fn, params, x, y, mask
    )
    return jax.tree.map(lambda p, g: p - alpha * g, params, grads), loss

  identity = lambda params: params
  return lanes.LocalTraining(
      lambda params, key: params, step, upload=identity, personal=identity
  )


def fine_tuner(
    apply_fn,
    alpha: float,
    nu: int,
    batch_size: int,
    sizes: np.ndarray,
    mesh: jax.sharding.Mesh,
    num_lanes: int = 0,
) -> Callable:
  """(server model, ClientData, key) -> [C, ...] each client's model after nu
  fine-tuning steps of size alpha on batches of b of its training samples
  (the server model where nu = 0 or a client has no data)."""
  sizes = np.asarray(sizes)
  if nu == 0:
    return lambda params, data, key: jax.tree.map(
        lambda a: jnp.broadcast_to(a, (len(sizes),) + a.shape), params
    )
  schedule = lanes.make_schedule(
      sizes,
      batch_size,
      local_steps=nu,
      num_shards=mesh.size,
      num_lanes=num_lanes,
  )
  run = lanes.round_fn(fine_tune_local(apply_fn, alpha), schedule, sizes, mesh)
  return lambda params, data, key: run(params, data, key).personal
