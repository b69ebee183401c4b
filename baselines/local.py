"""Local training written once, mapped over the clients of a round in lanes.

What a client computes is a `LocalTraining`: pure functions that start it from
the server's model, take one local step on a batch, and say what it uploads.
How clients are mapped is `round_fn`: the round's (client, batch) steps are
laid out in a `Schedule` of L lanes x S steps; the lane axis is sharded over
the 'clients' device mesh (`shard_map`), each device vmaps its lanes and scans
over the steps. A lane runs its clients one after the other: at a client's
first step its carry is reset to `init(server model)`, and at its last step
the client's weighted upload is added to the lane's sum (carry switching), so
uneven clients share a lane with almost no padding and one round compiles
once. `loop_round` is the sequential per-client loop over the same jitted
step: the reference the lanes are tested against, and the benchmark's
baseline.

Two schedules:
* a fixed number of local steps per client (pFedMe's R steps of batch b,
  FedZO's H steps): equal work, one client per lane, so the lanes' final
  carries are the clients' (personalized) states; a client with fewer
  samples than a batch cycles through them.
* local epochs (FedAvg, BAFFLE): client i takes E ceil(n_i / b) steps, its
  last batch of an epoch partly masked. Padding every client to the largest
  would cost C x max_i n_i, far more than a per-client loop under Dirichlet
  0.1 (sizes 10 .. 3,000); instead whole clients are packed into lanes
  (longest first, each into the least loaded lane), with the number of lanes
  chosen to keep S close to the largest client's steps.

Batches: every round each client draws a random permutation of its samples
(one root key; `fold_in` per round, client and step), batch k of epoch e
holds positions k b .. (k + 1) b - 1 of it.
"""

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from afl import federated

Params = Any
Carry = Any


class LocalTraining(NamedTuple):
  """What one client computes in a round.

  Attributes:
    init: (server model, client key) -> carry, the client's state at its
      first local step.
    step: (carry, x [b, ...], y [b], mask [b], key) -> (carry, loss), one
      local step on a batch (mask: which rows are real samples).
    upload: carry -> pytree the client sends to the server.
    personal: carry -> the client's own model to test, or None for
      algorithms that test the server model.
  """

  init: Callable[[Params, jax.Array], Carry]
  step: Callable[..., tuple[Carry, jax.Array]]
  upload: Callable[[Carry], Any]
  personal: Callable[[Carry], Params] | None = None


class ClientData(NamedTuple):
  """The clients' training samples, contiguous per client (device arrays).

  Attributes:
    x: [N, ...] float32 samples sorted by client.
    y: [N] int32 labels.
    offset: [C] int32 index in x of each client's first sample.
    size: [C] int32 samples per client.
  """

  x: jax.Array
  y: jax.Array
  offset: jax.Array
  size: jax.Array

  @property
  def num_clients(self) -> int:
    return self.size.shape[0]


def client_data(x: np.ndarray, y: np.ndarray, indices) -> ClientData:
  """Sorts the samples of `indices` (one array per client) by client."""
  sizes = np.array([len(i) for i in indices], np.int32)
  order = np.concatenate([np.asarray(i, np.int64) for i in indices])
  offset = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
  return ClientData(
      jnp.asarray(x[order], jnp.float32),
      jnp.asarray(y[order], jnp.int32),
      jnp.asarray(offset),
      jnp.asarray(sizes),
  )


class Schedule(NamedTuple):
  """Which client step every lane takes at every scan step (host numpy).

  Attributes:
    client: [L, S] int32 client of the step.
    step: [L, S] int32 index of the step in that client's local training.
    valid: [L, S] bool, False for padding after a lane's last client.
    first: [L, S] bool, the client's first step (reset the carry).
    last: [L, S] bool, the client's last step (add its upload).
    steps: [C] local steps of each client.
    batch_size: b.
    cycle: True: fixed steps, a client cycles through its samples; False:
      epochs, positions past a client's samples are masked.
    one_client_per_lane: lane l holds client l (fixed-steps schedules).
    max_size: the largest client's samples (width of the permutations).
  """

  client: np.ndarray
  step: np.ndarray
  valid: np.ndarray
  first: np.ndarray
  last: np.ndarray
  steps: np.ndarray
  batch_size: int
  cycle: bool
  one_client_per_lane: bool
  max_size: int

  @property
  def num_lanes(self) -> int:
    return self.client.shape[0]

  @property
  def length(self) -> int:
    return self.client.shape[1]


def _pack(steps: np.ndarray, num_lanes: int) -> list[list[int]]:
  """Longest clients first, each into the least loaded lane."""
  lanes, loads = [[] for _ in range(num_lanes)], np.zeros(num_lanes, np.int64)
  for client in np.argsort(-steps, kind="stable"):
    if steps[client]:
      lane = int(np.argmin(loads))
      lanes[lane].append(int(client))
      loads[lane] += steps[client]
  return lanes


def make_schedule(
    sizes: np.ndarray,
    batch_size: int,
    local_steps: int = 0,
    local_epochs: int = 1,
    num_shards: int = 1,
    num_lanes: int = 0,
    lane_overhead: float = 8.0,
) -> Schedule:
  """Lays the round's client steps out in lanes (see the module docstring).

  Args:
    sizes: [C] training samples per client.
    batch_size: b.
    local_steps: > 0: every client with data takes this many steps, one
      client per lane; 0: `local_epochs` epochs each, packed.
    local_epochs: E, when local_steps is 0.
    num_shards: devices; the number of lanes is a multiple of it.
    num_lanes: packed lanes; 0 picks the L that minimizes S (L + overhead).
    lane_overhead: the fixed cost of a scan step in lane-steps (packing).

  Returns:
    The schedule.
  """
  sizes = np.asarray(sizes, np.int64)
  if batch_size < 1 or local_steps < 0 or local_epochs < 1:
    raise ValueError(
        f"batch_size ({batch_size}) and local_epochs ({local_epochs}) must be"
        f" positive and local_steps ({local_steps}) >= 0"
    )
  num_clients = len(sizes)
  has_data = sizes > 0
  if local_steps:
    steps = np.where(has_data, local_steps, 0)
    lanes = [[c] if has_data[c] else [] for c in range(num_clients)]
    lanes += [[]] * (-num_clients % num_shards)
  else:
    steps = local_epochs * -(-sizes // batch_size)
    if num_lanes:
      count = math.ceil(num_lanes / num_shards) * num_shards
    else:
      least = max(1, math.ceil(steps.sum() / max(steps.max(), 1)))
      candidates = range(
          math.ceil(least / num_shards) * num_shards,
          max(num_clients, num_shards) + 1,
          num_shards,
      )

      def cost(count):
        length = max(
            sum(steps[c] for c in lane) for lane in _pack(steps, count)
        )
        return length * (count + lane_overhead)

      count = min(candidates, key=cost, default=num_shards)
    lanes = _pack(steps, count)
  length = max(1, max(sum(steps[c] for c in lane) for lane in lanes))
  shape = (len(lanes), length)
  client, step = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
  valid, first, last = (np.zeros(shape, bool) for _ in range(3))
  for row, lane in enumerate(lanes):
    position = 0
    for c in lane:
      span = slice(position, position + steps[c])
      client[row, span] = c
      step[row, span] = np.arange(steps[c])
      valid[row, span] = True
      first[row, position] = True
      last[row, position + steps[c] - 1] = True
      position += steps[c]
  return Schedule(
      client,
      step,
      valid,
      first,
      last,
      steps.astype(np.int64),
      batch_size,
      cycle=bool(local_steps),
      one_client_per_lane=bool(local_steps),
      max_size=max(1, int(sizes.max())),
  )


def _keys(round_key: jax.Array):
  """(permutation key root, client key root) of a round."""
  return jax.random.fold_in(round_key, 0), jax.random.fold_in(round_key, 1)


def permutations(key: jax.Array, size: jax.Array, width: int) -> jax.Array:
  """[C, width] int32: row c starts with a random permutation of 0..size[c]-1."""

  def one(client, n):
    u = jax.random.uniform(jax.random.fold_in(key, client), (width,))
    return jnp.argsort(jnp.where(jnp.arange(width) < n, u, 2.0))

  return jax.vmap(one)(jnp.arange(size.shape[0]), size).astype(jnp.int32)


def client_batch(
    data: ClientData,
    perm: jax.Array,
    client: jax.Array,
    step: jax.Array,
    batch_size: int,
    cycle: bool,
):
  """Batch `step` of `client`: (x [b, ...], y [b], mask [b])."""
  n = data.size[client]
  position = step * batch_size + jnp.arange(batch_size)
  mask = jnp.broadcast_to(n > 0, position.shape) if cycle else position < n
  rows = data.offset[client] + perm[client, position % jnp.maximum(n, 1)]
  return data.x[rows], data.y[rows], mask


def _where(condition, new, old):
  return jax.tree.map(lambda a, b: jnp.where(condition, a, b), new, old)


class RoundOutput(NamedTuple):
  """What a round of local training gives the server.

  Attributes:
    upload: the clients' uploads averaged with the weights.
    carries: [L, ...] the lanes' final carries (lane l = client l for
      fixed-steps schedules; padding lanes past C hold junk).
    loss: the mean local training loss over all real samples of all steps.
  """

  upload: Any
  carries: Any
  loss: jax.Array


def round_fn(
    local: LocalTraining,
    schedule: Schedule,
    weights: np.ndarray,
    mesh: jax.sharding.Mesh,
):
  """The round: jitted (server model, data, round key) -> RoundOutput.

  Args:
    local: what a client computes.
    schedule: from `make_schedule`, with a multiple of mesh.size lanes.
    weights: [C] weight of each client's upload (e.g. its sample count).
    mesh: mesh with axis 'clients'.
  """
  if schedule.num_lanes % mesh.size:
    raise ValueError(
        f"{schedule.num_lanes} lanes do not split over {mesh.size} devices"
    )
  weights = np.asarray(weights, np.float64)
  total_weight = float(weights[schedule.steps > 0].sum()) or 1.0
  lanes = tuple(
      jnp.asarray(a)
      for a in (
          schedule.client,
          schedule.step,
          schedule.valid,
          schedule.first,
          schedule.last,
      )
  )
  weights = jnp.asarray(weights, jnp.float32)

  def device_lanes(params, data, perm, client_root, *lanes):
    def lane(client, step, valid, first, last):
      def key_of(c):
        return jax.random.fold_in(client_root, c)

      carry = local.init(params, key_of(client[0]))
      total = jax.tree.map(jnp.zeros_like, local.upload(carry))

      def body(state, inputs):
        carry, total, loss_sum, count = state
        c, k, v, f, l = inputs
        key = key_of(c)
        carry = _where(f, local.init(params, key), carry)
        x, y, mask = client_batch(
            data, perm, c, k, schedule.batch_size, schedule.cycle
        )
        mask = mask & v
        new, loss = local.step(carry, x, y, mask, jax.random.fold_in(key, k))
        carry = _where(v, new, carry)
        scale = jnp.where(l & v, weights[c], 0.0)
        total = jax.tree.map(
            lambda t, u: t + scale * u, total, local.upload(carry)
        )
        n = mask.sum()
        return (carry, total, loss_sum + loss * n, count + n), None

      zero = jnp.zeros((), jnp.float32)
      state, _ = jax.lax.scan(
          body, (carry, total, zero, zero), (client, step, valid, first, last)
      )
      return state

    carries, totals, loss_sums, counts = jax.vmap(lane)(*lanes)
    totals, loss_sum, count = jax.lax.psum(
        (
            jax.tree.map(lambda t: t.sum(0), totals),
            loss_sums.sum(),
            counts.sum(),
        ),
        federated.CLIENTS,
    )
    return carries, totals, loss_sum / jnp.maximum(count, 1)

  lane_spec = PartitionSpec(federated.CLIENTS)
  mapped = jax.shard_map(
      device_lanes,
      mesh=mesh,
      in_specs=(PartitionSpec(),) * 4 + (lane_spec,) * 5,
      out_specs=(lane_spec, PartitionSpec(), PartitionSpec()),
      check_vma=False,
  )

  @jax.jit
  def run(params, data: ClientData, round_key: jax.Array) -> RoundOutput:
    perm_root, client_root = _keys(round_key)
    perm = permutations(perm_root, data.size, schedule.max_size)
    carries, totals, loss = mapped(params, data, perm, client_root, *lanes)
    upload = jax.tree.map(lambda t: t / total_weight, totals)
    return RoundOutput(upload, carries, loss)

  return run


def loop_round(
    local: LocalTraining,
    schedule: Schedule,
    weights: np.ndarray,
):
  """The same round as `round_fn`, one client after the other, one jitted
  step call per local step (how most simulators run clients).

  Returns:
    (server model, data, round key) -> RoundOutput with `carries` stacked
    over the clients that trained (C of them for fixed-steps schedules).
  """
  weights = np.asarray(weights, np.float64)
  total_weight = float(weights[schedule.steps > 0].sum()) or 1.0

  @jax.jit
  def step(carry, data, perm, c, k, key):
    x, y, mask = client_batch(
        data, perm, c, k, schedule.batch_size, schedule.cycle
    )
    new, loss = local.step(carry, x, y, mask, jax.random.fold_in(key, k))
    return new, loss * mask.sum(), mask.sum()

  init = jax.jit(local.init)
  upload = jax.jit(local.upload)
  perms = jax.jit(permutations, static_argnums=2)

  def run(params, data: ClientData, round_key: jax.Array) -> RoundOutput:
    perm_root, client_root = _keys(round_key)
    perm = perms(perm_root, data.size, schedule.max_size)
    total, carries, loss_sum, count = None, [], 0.0, 0.0
    for c in range(data.num_clients):
      if not schedule.steps[c]:
        continue
      key = jax.random.fold_in(client_root, c)
      carry = init(params, key)
      for k in range(schedule.steps[c]):
        carry, loss, n = step(carry, data, perm, c, k, key)
        loss_sum, count = loss_sum + loss, count + n
      sent = jax.tree.map(lambda u: weights[c] * u, upload(carry))
      total = sent if total is None else jax.tree.map(jnp.add, total, sent)
      carries.append(carry)
    upload_mean = jax.tree.map(lambda t: t / total_weight, total)
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *carries)
    return RoundOutput(upload_mean, stacked, loss_sum / max(count, 1))

  return run
