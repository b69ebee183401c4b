"""FedACnnL: federated == centralized float64 ACnnL, and its invariances."""

import functools
import time

import jax
import numpy as np
import pytest

from afl import analytic
from afl import data as data_lib
from afl import fedacnnl
from afl import federated
from afl import models
from afl import statistics
from afl import timing
from tests import reference

GAMMA = 100.0


@pytest.fixture(scope="module")
def mnist(data_dir):
  """6,000 real MNIST samples, flattened, over 30 Dirichlet(0.1) clients."""
  ds = data_lib.load_mnist(data_dir)
  x = data_lib.preprocess("mnist", ds.x_train[:6000]).reshape(6000, -1)
  y = ds.y_train[:6000]
  clients = data_lib.dirichlet_partition(y, 30, 0.1, seed=0)
  return x, y, clients


@pytest.fixture(scope="module")
def cifar(data_dir):
  """600 real CIFAR-10 images over 12 Dirichlet(0.5) clients."""
  ds = data_lib.load_cifar10(data_dir)
  x = data_lib.preprocess("cifar10", ds.x_train[:600])
  y = ds.y_train[:600]
  clients = data_lib.dirichlet_partition(y, 12, 0.5, seed=0, min_size=5)
  return x, y, clients


def small_convnet(num_classes=10):
  """Conv-LeakyReLU-AvgPool2 - Conv-LeakyReLU-GlobalPool - Dense, like the DCNN."""
  return models.LayerwiseNet(
      (
          models.Stage(models.Conv(6, 5), "leaky_relu", pool=2),
          models.Stage(
              models.Conv(8, 3), "leaky_relu", pool=models.GLOBAL_POOL
          ),
          models.Stage(models.Dense(num_classes)),
      )
  )


@functools.lru_cache
def build(model, input_shape, devices, encoding_seed, statistics_dtype):
  """One algorithm per configuration: its compiled rounds serve every test
  whose data has the same shapes (compiling is most of these tests' time)."""
  return fedacnnl.fedacnnl(
      model,
      num_classes=10,
      input_shape=input_shape,
      mesh=federated.client_mesh(devices),
      gamma=GAMMA,
      encoding_seed=encoding_seed,
      statistics_dtype=statistics_dtype,
  )


def train(
    model,
    x,
    y,
    clients,
    devices=None,
    block_size=None,
    seed=0,
    encoding_seed=0,
    statistics_dtype=jax.numpy.float32,
):
  algorithm = build(
      model,
      x.shape[1:],
      tuple(jax.devices() if devices is None else devices),
      encoding_seed,
      statistics_dtype,
  )
  mesh = federated.client_mesh(devices)
  blocks = federated.shard(
      federated.federate(x, y, clients, block_size, num_shards=mesh.size), mesh
  )
  result = analytic.train(algorithm, blocks, jax.random.key(seed))
  return algorithm, result


def assert_same_weights(model, params_a, params_b, rtol):
  for a, b in zip(
      reference.solved_weights(model, params_a),
      reference.solved_weights(model, params_b),
  ):
    assert reference.relative_error(a, b) <= rtol


@pytest.mark.parametrize("model_name", ["lr", "mlp"])
def test_federated_equals_centralized_float64(mnist, model_name):
  x, y, clients = mnist
  model = models.get_model(model_name, 10)
  algorithm, result = train(model, x, y, clients)
  pooled = np.concatenate(clients)
  expected = reference.centralized_acnnl(
      model, x[pooled], y[pooled], algorithm.encodings, GAMMA
  )
  for got, want in zip(
      reference.solved_weights(model, result.params), expected
  ):
    assert reference.relative_error(got, want) < 1e-5


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-6), ("float32", 1e-3)])
def test_conv_net_federated_equals_centralized_float64(cifar, dtype, rtol):
  """Image patches are ill-conditioned: float32 products cost 1e-4 there."""
  x, y, clients = cifar
  model = small_convnet()
  algorithm, result = train(
      model, x, y, clients, block_size=16, statistics_dtype=dtype
  )
  pooled = np.concatenate(clients)
  expected = reference.centralized_acnnl(
      model, x[pooled], y[pooled], algorithm.encodings, GAMMA
  )
  for got, want in zip(
      reference.solved_weights(model, result.params), expected
  ):
    assert reference.relative_error(got, want) < rtol


def test_invariant_to_partition_order_block_size_and_init(mnist):
  x, y, clients = mnist
  model = models.mlp(10)
  _, base = train(model, x, y, clients)
  pooled = np.concatenate(clients)
  iid = data_lib.iid_partition(len(pooled), 7, seed=3)
  variants = [
      [pooled[c] for c in iid],  # another partition of the same samples
      clients[::-1],  # client order
  ]
  for split in variants:
    _, other = train(model, x, y, split)
    assert_same_weights(model, other.params, base.params, 1e-5)
  _, other = train(model, x, y, clients, block_size=8)
  assert_same_weights(model, other.params, base.params, 1e-5)
  _, other = train(model, x, y, clients, seed=123)  # initialization
  assert_same_weights(model, other.params, base.params, 0)


def test_label_encoding_seed_matters(mnist):
  """The invariances above are not vacuous: a new encoding seed moves W."""
  x, y, clients = mnist
  model = models.mlp(10)
  _, a = train(model, x, y, clients)
  _, b = train(model, x, y, clients, encoding_seed=1)
  first_a, first_b = (
      reference.solved_weights(model, a.params)[0],
      reference.solved_weights(model, b.params)[0],
  )
  assert reference.relative_error(first_a, first_b) > 0.1


def test_one_device_equals_eight(mnist):
  x, y, clients = mnist
  assert jax.device_count() == 8, "conftest sets 8 CPU devices"
  model = models.mlp(10)
  for dtype, rtol in (("float64", 1e-9), ("float32", 1e-5)):
    # float32 products group rows differently per device count; float64
    # products leave only the order of float64 additions.
    _, one = train(
        model, x, y, clients, devices=jax.devices()[:1], statistics_dtype=dtype
    )
    _, eight = train(
        model, x, y, clients, devices=jax.devices(), statistics_dtype=dtype
    )
    assert_same_weights(model, eight.params, one.params, rtol)


def test_block_statistics_match_numpy_per_client(mnist):
  """Per-client G_i, H_i (eq. 6) from the sharded map == numpy == the loop."""
  x, y, clients = mnist
  model = models.mlp(10)
  algorithm, result = train(model, x, y, clients)
  mesh = federated.client_mesh()
  blocks = federated.shard(
      federated.federate(x, y, clients, 32, num_shards=mesh.size), mesh
  )
  layer = 1  # statistics of a hidden layer, through the solved layer 0
  mapped = algorithm.client_statistics(  # through the factored layer 0
      layer,
      algorithm.factored(result.solutions),
      blocks,
      jax.numpy.zeros_like(blocks.client),
      blocks.client,
      len(clients),
  )
  params = jax.tree.map(lambda a: a[0], result.params)
  loop = statistics.client_statistics_loop(
      model, layer, params, [x[c] for c in clients], [y[c] for c in clients], 10
  )
  w0 = reference.solved_weights(model, result.params)[0]
  for i, c in enumerate(clients):
    hidden = np.maximum(np.c_[x[c], np.ones(len(c))].astype(np.float64) @ w0, 0)
    rows = np.c_[hidden, np.ones(len(c))]
    gram = rows.T @ rows
    cross = rows.T @ (np.eye(10)[y[c]] @ np.asarray(algorithm.encodings[1]))
    for stats in (mapped, loop):
      full = np.asarray(stats.full_gram()[i])
      assert reference.relative_error(full, gram) < 1e-5
      got = np.asarray(stats.cross(algorithm.encodings[1])[i])
      assert reference.relative_error(got, cross) < 1e-5


def test_a_second_split_reuses_the_compiled_rounds(mnist):
  """One compiled shape for any split of the same N samples over C clients."""
  x, y, clients = mnist
  model = models.mlp(10)
  mesh = federated.client_mesh()
  algorithm = fedacnnl.fedacnnl(
      model, num_classes=10, input_shape=(784,), mesh=mesh, gamma=GAMMA
  )
  pooled = np.concatenate(clients)
  other = [pooled[c] for c in data_lib.iid_partition(len(pooled), 30, 1)]
  results = []
  for split in (clients, other):
    blocks = federated.shard(
        federated.federate(x, y, split, 64, num_shards=mesh.size), mesh
    )
    results.append(analytic.train(algorithm, blocks, jax.random.key(0)))
  assert results[0].compile_time_s > 0
  assert results[1].compile_time_s < 0.05 * results[0].compile_time_s


def test_compile_clock_counts_compilation_only():
  with timing.CompileClock() as clock:
    jax.jit(lambda v: v * 3 + 1)(np.arange(7.0)).block_until_ready()
  assert clock.seconds > 0
  with timing.CompileClock() as idle:
    np.arange(3).sum()
  assert idle.seconds == 0


def test_compile_clock_counts_overlapping_events_once():
  """A trace that holds an inner one, or compiles on two threads, report
  overlapping durations: their common time counts once."""
  event = "/jax/core/compile/backend_compile_duration"
  with timing.CompileClock() as clock:
    timing._on_event(event, 0.2)  # pylint: disable=protected-access
    timing._on_event(event, 0.3)  # ended now too: overlaps the first
  assert clock.seconds == pytest.approx(0.3, abs=1e-3)  # not 0.5
  with timing.CompileClock() as apart:
    timing._on_event(event, 0.0)
    time.sleep(0.02)
    timing._on_event(event, 0.01)  # began after the first ended
  assert apart.seconds == pytest.approx(0.01, abs=1e-6)


def test_bad_gamma_is_rejected():
  with pytest.raises(ValueError, match="gamma"):
    fedacnnl.fedacnnl(
        models.mlp(10),
        num_classes=10,
        input_shape=(4,),
        mesh=federated.client_mesh(),
        gamma=0.0,
    )
