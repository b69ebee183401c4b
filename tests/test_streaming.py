"""Streamed statistics equal materialized ones.

Per-client d x d statistics are never held for all clients: group sums fold
every block as it is produced, and personalization solves each client's
statistics as soon as they are complete, also when a client's blocks lie on
two devices. Both must give what materialized per-client statistics give.
"""

import jax
import numpy as np
import pytest

from afl import analytic
from afl import data as data_lib
from afl import fedacnnl
from afl import federated
from afl import memory
from afl import models
from afl import statistics
from tests import reference
from tests.test_fedacnnl import small_convnet


@pytest.fixture(scope="module")
def cifar(data_dir):
  """240 real CIFAR-10 images over 20 clients in 3 groups, on 8 devices:
  more clients than the devices' 16 edges, so personalization solves them
  as they complete (`federated.segment_sum`), gathering the edges."""
  ds = data_lib.load_cifar10(data_dir)
  x = data_lib.preprocess("cifar10", ds.x_train[:240])
  y = ds.y_train[:240]
  clients = data_lib.dirichlet_partition(y, 20, 0.5, seed=0, min_size=5)
  groups = np.arange(20, dtype=np.int32) % 3
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


def test_personalization_on_8_devices_equals_1_device(cifar):
  """Clients whose blocks straddle two devices are solved from both parts."""
  model, algorithm, data, groups = cifar
  client = np.asarray(data.client)
  per_device = client.reshape(8, -1)
  real = np.asarray(data.mask).any(1).reshape(8, -1)
  edges = [set(c[r][[0, -1]]) for c, r in zip(per_device, real) if r.any()]
  assert any(a & b for a, b in zip(edges, edges[1:])), "no client straddles"
  one = federated.client_mesh(jax.devices()[:1])
  single = fedacnnl.fedacnnl(
      model,
      num_classes=10,
      input_shape=data.x.shape[2:],
      mesh=one,
      statistics_dtype="float64",
  )
  key = jax.random.key(0)
  eight = analytic.train(algorithm, data, key, groups, personalized=True)
  gathered = jax.device_get(data)
  alone = analytic.train(
      single,
      federated.shard(gathered, one),
      key,
      groups,
      personalized=True,
  )
  for i in range(data.num_clients):
    for got, want in zip(
        reference.solved_weights(model, eight.params, i),
        reference.solved_weights(model, alone.params, i),
    ):
      assert reference.relative_error(got, want) <= 1e-10


def test_memory_model_grows_with_groups_and_width_not_clients():
  def expected(width=1.0, blocks=256, groups=10, personalized=True, mesh=1):
    return memory.estimate(
        models.dcnn(10, width),
        (32, 32, 3),
        num_blocks=blocks,
        block_size=8,
        num_devices=1,
        num_groups=groups,
        personalized=personalized,
        mesh_size=mesh,
    )

  full = expected()
  assert full.widest == 3 * 3 * 2048 + 1
  # 2 K + 3 = 23 float64 d x d at the widest layer: about 58 GB.
  assert full.copies == 23
  assert (
      23 * full.widest**2 * 8
      <= full.statistics
      <= 1.1 * 23 * (full.widest**2 * 8)
  )
  # Personalization: 7 + 4 D copies, whatever the number of clients.
  assert expected(groups=1).copies == 11
  assert expected(groups=1, mesh=8).copies == 39
  assert expected(groups=1, personalized=False).copies == 5
  # Group sums: 2 K + 3, or the edges (7 + 4 D) once K > 2 D.
  assert expected(groups=3, personalized=False).copies == 11
  assert expected(groups=3, personalized=False, mesh=2).copies == 9
  assert expected(blocks=10_000).statistics == full.statistics
  assert expected(width=0.0625).widest == 3 * 3 * 128 + 1
