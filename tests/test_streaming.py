"""Streamed statistics: a few clients at a time equals all at once.

Per-client d x d statistics are never held for all clients: group sums fold
every block as it is produced, and personalization takes the clients in
passes that fit a byte budget. Both must give what materialized per-client
statistics give.
"""

import jax
import numpy as np
import pytest

from afl import data as data_lib
from afl import fedacnnl
from afl import federated
from afl import memory
from afl import models
from afl import pfedacnnl
from afl import statistics
from tests import reference
from tests.test_fedacnnl import small_convnet


@pytest.fixture(scope="module")
def cifar(data_dir):
  """240 real CIFAR-10 images over 8 clients in 3 groups, on 8 devices."""
  ds = data_lib.load_cifar10(data_dir)
  x = data_lib.preprocess("cifar10", ds.x_train[:240])
  y = ds.y_train[:240]
  clients = data_lib.dirichlet_partition(y, 8, 0.5, seed=0, min_size=5)
  groups = np.array([0, 1, 2, 0, 1, 2, 0, 1], np.int32)
  mesh = federated.client_mesh()
  model = small_convnet()
  algorithm = fedacnnl.fedacnnl(
      model,
      num_classes=10,
      input_shape=x.shape[1:],
      mesh=mesh,
      statistics_dtype="float64",
  )
  data = federated.distribute(
      x, y, clients, mesh, 8, order=np.argsort(groups, kind="stable")
  )
  return model, algorithm, data, groups


def test_group_sums_equal_summed_per_client_statistics(cifar):
  model, algorithm, data, groups = cifar
  params = algorithm.init(jax.random.key(0), 1)
  zeros = np.zeros(data.num_blocks, np.int32)
  block_group = groups[np.asarray(data.client)]
  streamed = algorithm.client_statistics(0, params, data, zeros, block_group, 3)
  per_client = algorithm.client_statistics(
      0, params, data, zeros, data.client, data.num_clients
  )
  for got, each in zip(streamed, per_client):
    want = np.stack([np.asarray(each)[groups == k].sum(0) for k in range(3)])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-9)
  assert isinstance(streamed, statistics.Statistics)


def test_personalization_in_passes_equals_all_clients_at_once(cifar):
  model, algorithm, data, groups = cifar
  key = jax.random.key(0)
  at_once = pfedacnnl.train(algorithm, data, key, groups)
  # A budget below one client's d x d: one client per pass at every layer.
  one_by_one = pfedacnnl.train(
      algorithm, data, key, groups, memory_budget_bytes=1
  )
  passes = [
      (r["clients_per_pass"], s["clients_per_pass"])
      for r, s in zip(at_once.rounds, one_by_one.rounds)
      if r["stage"] == "personalization"
  ]
  assert passes == [(8, 1)] * 3
  for i in range(data.num_clients):
    for got, want in zip(
        reference.solved_weights(model, one_by_one.params, i),
        reference.solved_weights(model, at_once.params, i),
    ):
      assert reference.relative_error(got, want) <= 1e-10


def test_memory_model_grows_with_groups_and_width_not_clients():
  def expected(width=1.0, clients=100, groups=10, budget=2**30):
    return memory.estimate(
        models.dcnn(10, width),
        (32, 32, 3),
        num_blocks=256,
        block_size=8,
        num_devices=1,
        num_groups=groups,
        num_clients=clients,
        personalization_budget=budget,
    )

  full = expected()
  assert full.widest == 3 * 3 * 2048 + 1
  # 2 K + 3 = 23 float64 d x d at the widest layer: about 58 GB.
  assert (
      23 * full.widest**2 * 8
      <= full.statistics
      <= 1.1 * 23 * (full.widest**2 * 8)
  )
  assert expected(clients=10_000).statistics == full.statistics
  assert expected(groups=1).statistics < full.statistics / 4
  assert expected(width=0.0625).widest == 3 * 3 * 128 + 1
