"""Per-client test accuracy and the overall accuracy (section V-A), and the
training loss of the tested models.

Each client is tested with its own model (`param_index` picks it among the
stacked params: one global model for FedACnnL, one per group or client for
the personalized variants). The overall accuracy is the total number of
correct predictions over the total number of test samples of all clients.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from afl import federated


class Accuracy(NamedTuple):
  """Test results.

  Attributes:
    correct: [C] correct predictions per client.
    count: [C] test samples per client.
  """

  correct: np.ndarray
  count: np.ndarray

  @property
  def overall(self) -> float:
    return float(self.correct.sum() / max(self.count.sum(), 1))

  @property
  def per_client(self) -> np.ndarray:
    """[C] accuracy of each client (NaN for a client without test data)."""
    with np.errstate(invalid="ignore", divide="ignore"):
      return self.correct / self.count


def evaluate(
    apply_fn,
    params,
    data: federated.FederatedData,
    mesh: jax.sharding.Mesh,
    client_model: np.ndarray | None = None,
) -> Accuracy:
  """Tests every client on its test blocks.

  Args:
    apply_fn: (params, x [B, ...]) -> logits [B, num_classes].
    params: params stacked on a leading model axis.
    data: test blocks sharded over `mesh`.
    mesh: mesh with axis 'clients'.
    client_model: [C] index of each client's model in `params`; None: all
      clients use model 0.

  Returns:
    Accuracy with per-client counts.
  """
  if client_model is None:
    param_index = jnp.zeros_like(data.client)
  else:
    param_index = jnp.asarray(client_model, jnp.int32)[data.client]
  correct, count = _counter(apply_fn, mesh)(params, data, param_index)
  return Accuracy(
      np.asarray(correct).round().astype(np.int64),
      np.asarray(count).round().astype(np.int64),
  )


def mean_cross_entropy(apply_fn, params, x, y, mask) -> jax.Array:
  """Softmax cross-entropy averaged over the real (masked) samples."""
  losses = optax.softmax_cross_entropy_with_integer_labels(
      apply_fn(params, x), y
  )
  return jnp.sum(losses * mask) / jnp.maximum(mask.sum(), 1)


def mean_loss(
    apply_fn,
    params,
    data: federated.FederatedData,
    mesh: jax.sharding.Mesh,
    client_model: np.ndarray,
) -> float:
  """The cross-entropy of every client's model on its samples in `data`,
  averaged over all samples (the training loss of the tested models)."""
  param_index = jnp.asarray(client_model, jnp.int32)[data.client]
  loss_sum, count = _counter(apply_fn, mesh, "loss")(params, data, param_index)
  return float(np.sum(loss_sum) / max(np.sum(count), 1))


def _correct(apply_fn, params, x, y, mask):
  hits = (apply_fn(params, x).argmax(-1) == y) & mask
  return hits.sum(), mask.sum()


def _loss(apply_fn, params, x, y, mask):
  loss = mean_cross_entropy(apply_fn, params, x, y, mask)
  return loss * mask.sum(), mask.sum()


@functools.lru_cache(maxsize=64)
def _counter(apply_fn, mesh: jax.sharding.Mesh, what: str = "correct"):
  """(params, data, param_index) -> per-client sums of `what` ("correct":
  (correct, count), "loss": (loss sum, count)), jitted once per model, mesh
  and what."""
  block_fn = functools.partial(
      {"correct": _correct, "loss": _loss}[what], apply_fn
  )

  @jax.jit
  def count(params, data, param_index):
    return federated.segment_sum(
        block_fn, params, data, param_index, data.client, data.num_clients, mesh
    )

  return count
