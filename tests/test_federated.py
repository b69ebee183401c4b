"""Blocked client layout, the sharded segment sum and evaluation.

afl.federated and afl.evaluation against numpy loops over clients. Features
are small integers, so float32 sums inside a block are exact and the mapped
results can be compared with numpy to the last bit, whatever the blocking,
merging, vmapping or number of devices.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afl import evaluation
from afl import federated

SIZES = (0, 8, 3, 37, 16, 1, 20, 64, 9)  # an empty client, exact multiples
BLOCK = 8


def partition(sizes, seed=0):
  """A random partition of range(sum(sizes)) into clients of these sizes."""
  order = np.random.default_rng(seed).permutation(sum(sizes))
  return np.split(order, np.cumsum(sizes)[:-1])


def integer_samples(num_samples, num_features=3, seed=0):
  """x: [N, F] float32 small integers (exact float32 sums); y: [N] in 0..4."""
  rng = np.random.default_rng(seed)
  x = rng.integers(-8, 9, (num_samples, num_features)).astype(np.float32)
  return x, rng.integers(0, 5, num_samples)


def labelled_samples(num_samples):
  """x[:, 0] = index + 1 names each sample's source row; y = index % 7."""
  x = np.random.default_rng(1).standard_normal((num_samples, 2, 3))
  x[:, 0, 0] = np.arange(num_samples) + 1
  return x.astype(np.float32), np.arange(num_samples) % 7


def sharded(x, y, clients, mesh, block_size=BLOCK):
  return federated.shard(
      federated.federate(x, y, clients, block_size, num_shards=mesh.size), mesh
  )


def non_empty_per_shard(data, num_shards):
  return np.asarray(data.mask).any(1).reshape(num_shards, -1).sum(1)


@pytest.mark.parametrize("num_shards", [1, 3, 8])
def test_federate_places_every_sample_once_in_its_clients_block(num_shards):
  x, y = labelled_samples(sum(SIZES))
  clients = partition(SIZES)
  data = federated.federate(x, y, clients, BLOCK, num_shards)
  owner = np.empty(sum(SIZES), np.int64)
  for i, c in enumerate(clients):
    owner[c] = i
  mask = np.asarray(data.mask)
  block_of_row = np.broadcast_to(
      np.arange(data.num_blocks)[:, None], mask.shape
  )[mask]
  source = data.x[mask][:, 0, 0].astype(np.int64) - 1
  np.testing.assert_array_equal(np.sort(source), np.arange(sum(SIZES)))
  np.testing.assert_array_equal(data.x[mask], x[source])
  np.testing.assert_array_equal(data.y[mask], y[source])
  np.testing.assert_array_equal(data.client[block_of_row], owner[source])
  assert not data.x[~mask].any() and not data.y[~mask].any()
  assert not data.client[~mask.any(1)].any()  # all-padding blocks: client 0
  np.testing.assert_array_equal(data.client_sizes(), SIZES)
  assert data.x.dtype == np.float32 and data.y.dtype == np.int32
  assert data.num_clients == len(SIZES) and data.block_size == BLOCK
  # Each client fills ceil(n_i / B) blocks, all full but its last.
  for i, n in enumerate(SIZES):
    rows = mask[data.client == i].sum(1)
    rows = rows[rows > 0]
    assert len(rows) == math.ceil(n / BLOCK)
    assert (rows == BLOCK).sum() == n // BLOCK


@pytest.mark.parametrize("num_shards", [1, 2, 8])
def test_block_count_is_split_independent_and_real_blocks_are_dealt_evenly(
    num_shards,
):
  num_samples, num_clients = sum(SIZES), len(SIZES)
  x, y = integer_samples(num_samples)
  # The worst split for padding: all clients but one hold a single sample.
  splits = [
      partition(SIZES),
      partition(SIZES[::-1], seed=1),
      partition(
          (1,) * (num_clients - 1) + (num_samples - num_clients + 1,), seed=2
      ),
      partition((num_samples,) + (0,) * (num_clients - 1), seed=3),
  ]
  align = num_shards * federated.BLOCK_ALIGNMENT
  bound = math.ceil(num_samples / BLOCK) + num_clients
  for clients in splits:
    data = federated.federate(x, y, clients, BLOCK, num_shards)
    assert data.x.shape == (math.ceil(bound / align) * align, BLOCK, 3)
    assert data.y.shape == data.mask.shape == data.x.shape[:2]
    assert data.client.shape == data.x.shape[:1]
    assert data.num_blocks % align == 0
    counts = non_empty_per_shard(data, num_shards)
    assert counts.max() - counts.min() <= 1
    assert counts.sum() == sum(math.ceil(len(c) / BLOCK) for c in clients)


def test_order_lays_clients_out_contiguously_under_their_own_ids():
  sizes = (9, 0, 30, 4, 17, 8)
  x, y = integer_samples(sum(sizes))
  clients = partition(sizes)
  order = [4, 1, 0, 5, 2, 3]
  data = federated.federate(x, y, clients, BLOCK, order=order)
  owners = np.asarray(data.client)[np.asarray(data.mask).any(1)]
  runs = [int(c) for k, c in enumerate(owners) if k == 0 or owners[k - 1] != c]
  assert runs == [c for c in order if sizes[c]]
  np.testing.assert_array_equal(data.client_sizes(), sizes)
  with pytest.raises(ValueError, match="permutation"):
    federated.federate(x, y, clients, BLOCK, order=[0, 1, 2, 3, 4, 4])


def test_default_block_size():
  """A power of two in [8, 512] near an eighth of the mean client size."""
  cases = {
      (60000, 100): 64,
      (50000, 10): 512,
      (10**7, 1): 512,
      (100, 10): 8,
      (0, 3): 8,
      (4096, 8): 64,
      (4095, 8): 32,
  }
  for (num_samples, num_clients), expected in cases.items():
    assert federated.default_block_size(num_samples, num_clients) == expected
  for num_samples in (1, 37, 999, 5000, 123456):
    for num_clients in (1, 7, 100):
      size = federated.default_block_size(num_samples, num_clients)
      assert 8 <= size <= 512 and size & (size - 1) == 0
  # federate uses it; it depends on (N, C), not on the split.
  x, y = integer_samples(6000)
  for sizes in ((3000, 2000, 1000), (1, 1, 5998)):
    data = federated.federate(x, y, partition(sizes), num_shards=2)
    assert data.block_size == federated.default_block_size(6000, 3) == 128


def test_bad_inputs_are_rejected():
  x, y = integer_samples(10)
  with pytest.raises(ValueError, match="client"):
    federated.federate(x, y, [])
  with pytest.raises(ValueError, match="block_size"):
    federated.federate(x, y, [np.arange(10)], block_size=0)
  with pytest.raises(ValueError, match="num_shards"):
    federated.federate(x, y, [np.arange(10)], block_size=4, num_shards=0)
  data = federated.federate(x, y, [np.arange(10)], block_size=4, num_shards=1)
  with pytest.raises(ValueError, match="num_shards=3"):
    federated.shard(data, federated.client_mesh(jax.devices()[:3]))


def scaled_sums(params, x, y, mask):
  """A client's work: scale * sum of its rows, its row count, its labels."""
  weights = mask.astype(x.dtype)
  return {
      "sum": params["scale"] * (x * weights[:, None]).sum(0),
      "count": mask.sum(),
      "label_sum": (y * mask).sum(),
  }


segment_sum = jax.jit(federated.segment_sum, static_argnums=(0, 5, 6, 7, 8))


def stacked_scales(*scales):
  return {"scale": jnp.asarray(scales, jnp.float32)}


def numpy_sums(x, y, clients, scale_of_client, segment_of_client, num_segments):
  """scaled_sums per segment by a numpy loop over clients (float64)."""
  total = {
      "sum": np.zeros((num_segments, x.shape[1])),
      "count": np.zeros(num_segments),
      "label_sum": np.zeros(num_segments),
  }
  for i, c in enumerate(clients):
    s = segment_of_client[i]
    total["sum"][s] += scale_of_client[i] * x[c].astype(np.float64).sum(0)
    total["count"][s] += len(c)
    total["label_sum"][s] += y[c].sum()
  return total


def assert_equal_results(got, expected):
  assert got.keys() == expected.keys()
  for key, value in got.items():
    assert value.dtype == np.float64, key
    np.testing.assert_array_equal(np.asarray(value), expected[key], key)


@pytest.fixture(scope="module")
def samples():
  """Integer samples of SIZES clients, laid out for 8 devices and for 1."""
  x, y = integer_samples(sum(SIZES))
  clients = partition(SIZES)
  eight = federated.client_mesh()
  one = federated.client_mesh(jax.devices()[:1])
  assert eight.size == 8, "conftest sets 8 CPU devices"
  return (
      x,
      y,
      clients,
      {
          8: (sharded(x, y, clients, eight), eight),
          1: (sharded(x, y, clients, one), one),
      },
  )


@pytest.mark.parametrize("devices", [8, 1])
@pytest.mark.parametrize("blocks_per_step", [1, 2, 16])
def test_per_client_segments_equal_a_numpy_loop(
    samples, devices, blocks_per_step
):
  x, y, clients, layouts = samples
  data, mesh = layouts[devices]
  num_clients = len(clients)
  got = segment_sum(
      scaled_sums,
      stacked_scales(0.5),
      data,
      jnp.zeros_like(data.client),
      data.client,
      num_clients,
      mesh,
      blocks_per_step * BLOCK,
  )
  assert_equal_results(
      got,
      numpy_sums(
          x, y, clients, [0.5] * num_clients, range(num_clients), num_clients
      ),
  )


@pytest.mark.parametrize("devices", [8, 1])
@pytest.mark.parametrize(
    "samples_per_step", [BLOCK, 2 * BLOCK, 16 * BLOCK, 1024, 1]
)
def test_one_segment_one_model_merges_blocks(
    samples, devices, samples_per_step
):
  """The merged-steps path: 1, 2 or 16 blocks per block_fn call."""
  x, y, clients, layouts = samples
  data, mesh = layouts[devices]
  got = segment_sum(
      scaled_sums,
      stacked_scales(-2.0),
      data,
      jnp.zeros_like(data.client),
      jnp.zeros_like(data.client),
      1,
      mesh,
      samples_per_step,
  )
  assert_equal_results(
      got,
      numpy_sums(x, y, clients, [-2.0] * len(clients), [0] * len(clients), 1),
  )


@pytest.mark.parametrize("devices", [8, 1])
@pytest.mark.parametrize("blocks_per_step", [1, 2, 16])
@pytest.mark.parametrize("per_client_segments", [False, True])
def test_group_models_with_group_or_client_segments(
    samples, devices, blocks_per_step, per_client_segments
):
  """param_index picks each block's stacked model: that of its client's group."""
  x, y, clients, layouts = samples
  data, mesh = layouts[devices]
  num_clients = len(clients)
  group = np.arange(num_clients) % 3
  scales = (1.0, 4.0, -0.25)
  if per_client_segments:
    segment_of_client, num_segments = np.arange(num_clients), num_clients
  else:
    segment_of_client, num_segments = group, 3
  client = np.asarray(data.client)
  got = segment_sum(
      scaled_sums,
      stacked_scales(*scales),
      data,
      group[client],
      segment_of_client[client],
      num_segments,
      mesh,
      blocks_per_step * BLOCK,
  )
  assert_equal_results(
      got,
      numpy_sums(
          x,
          y,
          clients,
          [scales[g] for g in group],
          segment_of_client,
          num_segments,
      ),
  )


def test_one_device_equals_eight_on_the_same_layout(samples):
  """The 8-shard layout summed on 1 device: same sums, another order."""
  _, _, clients, layouts = samples
  data, mesh = layouts[8]
  one = federated.client_mesh(jax.devices()[:1])
  on_one = federated.shard(jax.device_get(data), one)
  client = np.asarray(data.client)  # numpy: usable on either mesh
  args = (stacked_scales(0.5), np.zeros_like(client), client, len(clients))
  assert_equal_results(
      segment_sum(
          scaled_sums,
          args[0],
          on_one,
          args[1],
          args[2],
          args[3],
          one,
          2 * BLOCK,
      ),
      jax.device_get(
          segment_sum(
              scaled_sums,
              args[0],
              data,
              args[1],
              args[2],
              args[3],
              mesh,
              2 * BLOCK,
          )
      ),
  )


@pytest.mark.parametrize("blocks_per_step", [1, 16])
def test_negative_segments_are_left_out(samples, blocks_per_step):
  """Segment -1 drops a block: here every client outside [2, 6)."""
  x, y, clients, layouts = samples
  data, mesh = layouts[8]
  client = np.asarray(data.client)
  segment = np.where((client >= 2) & (client < 6), client - 2, -1)
  got = segment_sum(
      scaled_sums,
      stacked_scales(1.0),
      data,
      np.zeros_like(client),
      segment,
      4,
      mesh,
      blocks_per_step * BLOCK,
  )
  assert_equal_results(
      got, numpy_sums(x, y, clients[2:6], [1.0] * 4, range(4), 4)
  )


def linear_apply(params, x):
  return x @ params["w"]


def test_evaluate_counts_correct_predictions_per_client():
  """Model 0 predicts argmax x, model 1 argmin x; each client uses its own."""
  sizes = (5, 0, 12, 7, 30, 1)
  rng = np.random.default_rng(7)
  x = rng.standard_normal((sum(sizes), 2)).astype(np.float32)
  y = rng.integers(0, 2, sum(sizes))
  clients = partition(sizes)
  mesh = federated.client_mesh()
  data = sharded(x, y, clients, mesh, block_size=4)
  params = {"w": jnp.stack([jnp.eye(2), -jnp.eye(2)]).astype(jnp.float32)}
  count = np.array(sizes)
  argmax_hits = np.array([(x[c].argmax(1) == y[c]).sum() for c in clients])

  everyone_model_0 = evaluation.evaluate(linear_apply, params, data, mesh)
  np.testing.assert_array_equal(everyone_model_0.correct, argmax_hits)
  np.testing.assert_array_equal(everyone_model_0.count, count)

  client_model = np.array([0, 1, 1, 0, 1, 1])
  own = evaluation.evaluate(linear_apply, params, data, mesh, client_model)
  # With two classes and no ties, argmin is right exactly where argmax is not.
  expected = np.where(client_model == 1, count - argmax_hits, argmax_hits)
  np.testing.assert_array_equal(own.correct, expected)
  np.testing.assert_array_equal(own.count, count)
  assert (own.correct != everyone_model_0.correct).any()

  for accuracy, hits in ((everyone_model_0, argmax_hits), (own, expected)):
    assert accuracy.overall == pytest.approx(
        hits.sum() / count.sum(), rel=1e-15
    )
    per_client = accuracy.per_client
    assert np.isnan(per_client[1])  # the client without test data
    np.testing.assert_allclose(
        np.delete(per_client, 1), np.delete(hits / np.maximum(count, 1), 1)
    )


def test_accuracy_without_test_data_is_zero_overall():
  accuracy = evaluation.Accuracy(np.zeros(2, np.int64), np.zeros(2, np.int64))
  assert accuracy.overall == 0.0
  assert np.isnan(accuracy.per_client).all()


@pytest.mark.parametrize("devices", [8, 1])
@pytest.mark.parametrize("blocks_per_step", [1, 16])
@pytest.mark.parametrize("empty_segments", [0, 11])
def test_finalize_sees_each_segments_complete_sum(
    samples, devices, blocks_per_step, empty_segments
):
  """A nonlinear finalize of per-client sums, clients straddling devices.

  Both ways of finalizing: 9 clients on 8 devices (at most 2 segments per
  device) add up the [S, ...] sums; 9 + 11 segments on 8 devices and 9 or 20
  on 1 device finalize as they go, gathering the devices' edges. The last
  client's blocks are left out (segment -1): its segment gives zeros."""
  x, y, clients, layouts = samples
  data, mesh = layouts[devices]
  num_clients = len(clients) - 1  # those counted
  num_segments = len(clients) + empty_segments  # segments past C are empty
  offsets = jnp.arange(num_segments, dtype=jnp.float64) * 10

  def finalize(sums, segment, offsets):
    return {
        "squares": sums["sum"] ** 2 + offsets[segment],
        "ratio": sums["label_sum"] / sums["count"],
    }

  got = segment_sum(
      scaled_sums,
      stacked_scales(0.5),
      data,
      jnp.zeros_like(data.client),
      jnp.where(data.client == num_clients, -1, data.client),
      num_segments,
      mesh,
      blocks_per_step * BLOCK,
      finalize,
      offsets,
  )
  sums = numpy_sums(
      x,
      y,
      clients[:num_clients],
      [0.5] * num_clients,
      range(num_clients),
      num_segments,
  )
  present = sums["count"] > 0  # a client without samples gives zeros
  assert not present.all()
  np.testing.assert_allclose(
      got["squares"],
      np.where(
          present[:, None],
          sums["sum"] ** 2 + np.asarray(offsets)[:, None],
          0.0,
      ),
      rtol=1e-12,
  )
  np.testing.assert_allclose(
      got["ratio"],
      np.divide(
          sums["label_sum"],
          sums["count"],
          out=np.zeros(num_segments),
          where=present,
      ),
      rtol=1e-12,
  )


@pytest.mark.parametrize("devices", [8, 1])
@pytest.mark.parametrize("max_blocks", [1, 3])
def test_segment_apply_sees_each_small_interior_segment_whole(
    samples, devices, max_blocks
):
  """fn gets all of a client's rows at once; only small clients that lie
  inside one device (not its first or last) are taken, and marked."""
  x, y, clients, layouts = samples
  data, mesh = layouts[devices]
  num_clients = len(clients)
  offsets = jnp.arange(num_clients, dtype=jnp.float64) * 10

  def whole(params, x, y, mask, segment, offsets):
    rows = (x * mask[:, None]).astype(jnp.float64)
    return {
        "squares": (params["scale"] * rows.sum(0)) ** 2 + offsets[segment],
        "count": mask.sum().astype(jnp.float64),
        "label_sum": (y * mask).sum().astype(jnp.float64),
    }

  got, taken = jax.jit(federated.segment_apply, static_argnums=(0, 5, 6, 7))(
      whole,
      stacked_scales(0.5),
      data,
      jnp.zeros_like(data.client),
      data.client,
      num_clients,
      mesh,
      max_blocks,
      offsets,
  )
  # Which clients are taken, from the layout: whole on one device, not its
  # first or last client, at most max_blocks blocks.
  owner = np.asarray(data.client)
  real = np.asarray(data.mask).any(1)
  device = np.arange(data.num_blocks) // (data.num_blocks // mesh.size)
  expected = np.zeros(num_clients, bool)
  for i in range(num_clients):
    where = np.flatnonzero(real & (owner == i))
    if not len(where) or len(where) > max_blocks:
      continue
    on = device[where]
    mine = np.flatnonzero(real & (device == on[0]))
    ends = {owner[mine[0]], owner[mine[-1]]}
    expected[i] = (on == on[0]).all() and i not in ends
  assert expected.any() and not expected.all()
  np.testing.assert_array_equal(np.asarray(taken), real & expected[owner])
  sums = numpy_sums(
      x, y, clients, [0.5] * num_clients, range(num_clients), num_clients
  )
  np.testing.assert_array_equal(
      got["squares"],
      np.where(
          expected[:, None],
          sums["sum"] ** 2 + np.asarray(offsets)[:, None],
          0.0,
      ),
  )
  np.testing.assert_array_equal(
      got["count"], np.where(expected, sums["count"], 0)
  )
  np.testing.assert_array_equal(
      got["label_sum"], np.where(expected, sums["label_sum"], 0)
  )


# segment_sum's ways, each called on its own: group models (param_index),
# per-client segments, clients straddling devices, empty segments (client 0
# has no samples, client 8 is left out, segments past C have no clients) and
# a block left out (-1) inside client 7's run.
SCALES = (1.0, 4.0, -0.25)  # the models of the clients' groups, i % 3
NUM_SEGMENTS = len(SIZES) + 11


def models_and_segments(data):
  """[num_blocks] int32 model and segment of every block."""
  client = np.asarray(data.client)
  model = (client % len(SCALES)).astype(np.int32)
  segment = np.where(client == len(SIZES) - 1, -1, client).astype(np.int32)
  real = np.asarray(data.mask).any(1)
  segment[np.flatnonzero(real & (client == 7))[2]] = -1
  return model, segment


def numpy_block_sums(data, model, segment, blocks=None):
  """scaled_sums per segment by a numpy loop over `blocks` (default all)."""
  x, y, mask = (np.asarray(a) for a in (data.x, data.y, data.mask))
  total = {
      "sum": np.zeros((NUM_SEGMENTS, x.shape[-1])),
      "count": np.zeros(NUM_SEGMENTS),
      "label_sum": np.zeros(NUM_SEGMENTS),
  }
  blocks = range(data.num_blocks) if blocks is None else blocks
  for b in blocks:
    s = segment[b]
    if s < 0:
      continue
    rows = mask[b]
    total["sum"][s] += SCALES[model[b]] * x[b][rows].astype(np.float64).sum(0)
    total["count"][s] += rows.sum()
    total["label_sum"][s] += y[b][rows].sum()
  return total


def squares_and_ratio(sums, segment, offsets):
  """A nonlinear finalize: nothing but the complete sum gives its result."""
  return {
      "squares": sums["sum"] ** 2 + offsets[segment],
      "ratio": sums["label_sum"] / sums["count"],
  }


def assert_layout_has_every_case(data, segment, mesh):
  """Straddling segments on several devices, empty ones, a left-out block."""
  real = np.asarray(data.mask).any(1)
  counted = real & (segment >= 0)
  device = np.arange(data.num_blocks) // (data.num_blocks // mesh.size)
  devices_of = [
      set(device[counted & (segment == s)]) for s in range(NUM_SEGMENTS)
  ]
  if mesh.size > 1:
    assert max(map(len, devices_of)) > 2  # one on 3 or more devices
  assert not all(devices_of) and (real & (segment < 0)).sum() > 1


segment_ways = {
    name: jax.jit(getattr(federated, name), static_argnums=static)
    for name, static in (
        ("_plain_sums", (0, 5, 6, 7)),
        ("_few_segments", (0, 5, 6, 7, 8)),
        ("_edge_gather", (0, 5, 6, 7, 8)),
    )
}


@pytest.mark.parametrize("devices", [8, 1])
@pytest.mark.parametrize("blocks_per_step", [1, 16])
def test_plain_sums_equal_a_numpy_loop_over_blocks(
    samples, devices, blocks_per_step
):
  data, mesh = samples[3][devices]
  model, segment = models_and_segments(data)
  assert_layout_has_every_case(data, segment, mesh)
  got = segment_ways["_plain_sums"](
      scaled_sums,
      stacked_scales(*SCALES),
      data,
      model,
      segment,
      NUM_SEGMENTS,
      mesh,
      blocks_per_step * BLOCK,
  )
  assert_equal_results(got, numpy_block_sums(data, model, segment))


@pytest.mark.parametrize("devices", [8, 1])
@pytest.mark.parametrize("way", ["_few_segments", "_edge_gather"])
def test_finalizing_ways_finalize_each_complete_segment_once(
    samples, devices, way
):
  """Either way is right for any number of segments (segment_sum picks the
  faster); a segment without counted blocks gives zeros."""
  data, mesh = samples[3][devices]
  model, segment = models_and_segments(data)
  offsets = jnp.arange(NUM_SEGMENTS, dtype=jnp.float64) * 10
  got = segment_ways[way](
      scaled_sums,
      stacked_scales(*SCALES),
      data,
      model,
      segment,
      NUM_SEGMENTS,
      mesh,
      2 * BLOCK,
      squares_and_ratio,
      offsets,
  )
  sums = numpy_block_sums(data, model, segment)
  present = sums["count"] > 0
  np.testing.assert_allclose(
      got["squares"],
      np.where(
          present[:, None], sums["sum"] ** 2 + np.asarray(offsets)[:, None], 0
      ),
      rtol=1e-12,
  )
  np.testing.assert_allclose(
      got["ratio"],
      np.where(present, sums["label_sum"] / np.maximum(sums["count"], 1), 0),
      rtol=1e-12,
  )


@pytest.mark.parametrize("devices", [8, 1])
def test_walk_keeps_interior_segments_and_hands_back_the_edges(
    samples, devices
):
  """Per device: its first and last segments (-1 for none; the last only if
  it is another one) with its part of their sums, and the interior
  segments' complete sums in [S, ...]."""
  data, mesh = samples[3][devices]
  model, segment = models_and_segments(data)
  params = stacked_scales(*SCALES)
  steps = federated._steps(scaled_sums, params, data, mesh, 2 * BLOCK)

  def local(params, x, y, mask, param_index, segment_index, args):
    del args
    blocks = federated._blocks(params, x, y, mask, param_index, segment_index)
    edges, acc = federated._walk(steps, blocks, NUM_SEGMENTS, steps.sum_shapes)
    ids = jnp.stack([edge_id for edge_id, _ in edges])
    sums = jax.tree.map(lambda *e: jnp.stack(e), *(e for _, e in edges))
    return jax.tree.map(lambda a: a[None], (ids, sums, acc))

  ids, edge_sums, acc = jax.jit(
      lambda *args: federated._map_blocks(
          local, mesh, *args, (), jax.sharding.PartitionSpec(federated.CLIENTS)
      )
  )(params, data, model, segment)

  per_device = data.num_blocks // mesh.size
  counted = np.asarray(data.mask).any(1) & (segment >= 0)
  for d in range(mesh.size):
    blocks = range(d * per_device, (d + 1) * per_device)
    seen = list(dict.fromkeys(segment[b] for b in blocks if counted[b]))
    first = seen[0] if seen else -1
    last = seen[-1] if len(seen) > 1 else -1
    np.testing.assert_array_equal(ids[d], [first, last])
    mine = numpy_block_sums(data, model, segment, blocks)
    interior = np.isin(np.arange(NUM_SEGMENTS), seen[1:-1])
    for key, value in mine.items():
      inside = interior.reshape((-1,) + (1,) * (value.ndim - 1))
      for e, s in enumerate((first, last)):
        expected = value[s] if s >= 0 else np.zeros_like(value[0])
        np.testing.assert_array_equal(edge_sums[key][d, e], expected, key)
      np.testing.assert_array_equal(
          acc[key][d],
          np.where(inside, value, 0),
          key,
      )
  if mesh.size > 1:  # devices with and without a last edge
    assert (ids[:, 1] == -1).any() and (ids[:, 1] >= 0).any()


@pytest.mark.parametrize("devices", [8, 1])
def test_segment_sum_picks_its_way(monkeypatch, devices):
  """Plain sums without finalize; with it, finalizing the [S, ...] sums up to
  two segments per device, gathering the edges for more."""
  calls = []
  for name in ("_plain_sums", "_few_segments", "_edge_gather"):
    monkeypatch.setattr(
        federated, name, lambda *args, name=name: calls.append((name, args))
    )
  mesh = federated.client_mesh(jax.devices()[:devices])
  x, y = integer_samples(sum(SIZES))
  data = federated.federate(x, y, partition(SIZES), BLOCK, devices)
  cases = (
      (None, 1, "_plain_sums"),
      (None, 100, "_plain_sums"),
      (squares_and_ratio, 2 * devices, "_few_segments"),
      (squares_and_ratio, 2 * devices + 1, "_edge_gather"),
  )
  for finalize, num_segments, _ in cases:
    federated.segment_sum(
        scaled_sums,
        stacked_scales(1.0),
        data,
        np.zeros(data.num_blocks, np.int64),
        data.client,
        num_segments,
        mesh,
        3 * BLOCK,
        finalize,
        "args",
    )
  assert [name for name, _ in calls] == [way for *_, way in cases]
  for (name, args), (finalize, num_segments, _) in zip(calls, cases):
    assert args[5:8] == (num_segments, mesh, 3 * BLOCK)
    assert args[3].dtype == args[4].dtype == jnp.int32
    assert args[8:] == (() if finalize is None else (finalize, "args"))
