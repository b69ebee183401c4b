"""Local training written once, mapped over the clients of a round in lanes.

With `afl.federated`'s segment sums over client blocks (the analytic
statistics, evaluation), this is the client mapping layer: what a client
computes is a pure function, how the clients are mapped onto the devices is
here.

What a client computes is a `LocalTraining`: pure functions that start it from
the server's model, take one local step on a batch, and say what it uploads.
How clients are mapped is `round_fn`: the round's (client, batch) steps are
packed into a `Schedule` of L lanes x S steps; the lane axis is sharded over
the 'clients' device mesh (`shard_map`), each device scans over the steps
with its lanes vmapped inside. A lane runs its clients one after the other:
at a client's first step its carry is reset to `init(server model)`, at its
last step the client's weighted upload is added to the device's sum and its
personal model written to a per-client table (carry switching), so uneven
clients share a lane with almost no padding and a round compiles once. The
switching is a while loop over the lanes that switch at that step, so the
(many) steps where no lane switches touch no model besides the step's own
work, and a client's upload and personal model are computed once.
`loop_round` is the sequential per-client loop over the same jitted step:
the reference the lanes are tested against, and the benchmark's baseline.

Every client takes either a fixed number of local steps (pFedMe's R steps of
batch b, FedZO's H steps; a client with fewer samples than that cycles
through them) or E local epochs of ceil(n_i / b) steps, the last batch of an
epoch partly masked (FedAvg, BAFFLE). Padding every client to the largest
would cost C x max_i n_i steps, far more than a per-client loop under
Dirichlet 0.1 (sizes 10 .. 3,000); instead whole clients are packed into
the lanes, longest first, each into the least loaded lane, which leaves
almost no lane idle. How many lanes pays depends on the device: on a CPU a
lane's model is streamed through memory at every step, so a few lanes per
device win; on an accelerator, one lane per client.

Batches: every round each client draws a random permutation of its samples
(one root key, `fold_in` per round; all clients' permutations from one sort),
its batch k holds positions k b .. (k + 1) b - 1 of it (modulo its size when
cycling).
"""

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from afl import distributed
from afl import federated
from afl import memory
from afl import rng

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
  """The clients' training samples, contiguous per client.

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


def client_data(
    x: np.ndarray,
    y: np.ndarray,
    indices,
    mesh: jax.sharding.Mesh | None = None,
) -> ClientData:
  """Sorts the samples of `indices` (one array per client) by client; on
  the default device, or whole on every device of `mesh` (which may span
  processes)."""
  sizes = np.array([len(i) for i in indices], np.int32)
  order = np.concatenate([np.asarray(i, np.int64) for i in indices])
  offset = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
  data = ClientData(
      x[order].astype(np.float32), y[order].astype(np.int32), offset, sizes
  )
  if mesh is None:
    return jax.tree.map(jnp.asarray, data)
  return distributed.replicate(data, mesh)


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
  """

  client: np.ndarray
  step: np.ndarray
  valid: np.ndarray
  first: np.ndarray
  last: np.ndarray
  steps: np.ndarray
  batch_size: int
  cycle: bool

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


# On a CPU the lanes of a device together keep about this many bytes of
# client state and step temporaries: every step streams each lane's model
# (and, for the zeroth-order steps, its b2 x d or K x d perturbations)
# through memory, so beyond the cache many lanes are memory-bound
# (MNIST-MLP, 436 KB a model: 2-4 lanes per device beat 8 and 100;
# `experiments.benchmark_baselines --lanes`), while small models (LR) gain
# from many lanes, which cut the number of scan steps and their fixed cost.
CPU_LANE_BYTES = 2**21


def default_num_lanes(
    lane_bytes: int, num_clients: int, num_shards: int = 1
) -> int:
  """Lanes for a lane that keeps `lane_bytes` (`step_bytes`): one per client
  on accelerators; on CPU as many per device as fit CPU_LANE_BYTES (>= 2)."""
  if jax.default_backend() != "cpu":
    return num_clients
  per_device = max(2, CPU_LANE_BYTES // max(lane_bytes, 1))
  return min(num_clients, per_device * num_shards)


def step_bytes(
    local: LocalTraining, params, feature_shape: tuple[int, ...], rows: int
) -> int:
  """Bytes a lane keeps at a step: its carry and the temporaries of the
  jitted step on a batch of `rows` (XLA's memory analysis; FedZO's b2 x d
  directions are 27 MB on MNIST-MLP against a 0.4 MB carry)."""
  key = jax.random.key(0)
  carry = jax.eval_shape(local.init, params, key)
  compiled = (
      jax.jit(local.step)
      .lower(
          carry,
          jax.ShapeDtypeStruct((rows,) + tuple(feature_shape), jnp.float32),
          jax.ShapeDtypeStruct((rows,), jnp.int32),
          jax.ShapeDtypeStruct((rows,), jnp.bool_),
          key,
      )
      .compile()
  )
  return (
      memory.tree_bytes(carry) + compiled.memory_analysis().temp_size_in_bytes
  )


def make_schedule(
    sizes: np.ndarray,
    batch_size: int,
    local_steps: int = 0,
    local_epochs: int = 1,
    num_shards: int = 1,
    num_lanes: int = 0,
) -> Schedule:
  """Packs the round's client steps into lanes (see the module docstring).

  Args:
    sizes: [C] training samples per client.
    batch_size: b.
    local_steps: > 0: every client with data takes this many steps (cycling
      through its samples); 0: `local_epochs` epochs each.
    local_epochs: E, when local_steps is 0.
    num_shards: devices; the number of lanes is a multiple of it.
    num_lanes: lanes (rounded up to a multiple of num_shards); 0: one per
      client.

  Returns:
    The schedule.
  """
  sizes = np.asarray(sizes, np.int64)
  if batch_size < 1 or local_steps < 0 or local_epochs < 1 or num_lanes < 0:
    raise ValueError(
        f"batch_size ({batch_size}) and local_epochs ({local_epochs}) must be"
        f" positive, local_steps ({local_steps}) and num_lanes ({num_lanes})"
        " >= 0"
    )
  if local_steps:
    steps = np.where(sizes > 0, local_steps, 0)
  else:
    steps = local_epochs * -(-sizes // batch_size)
  num_lanes = num_lanes or len(sizes)
  lanes = _pack(steps, math.ceil(num_lanes / num_shards) * num_shards)
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
  )


def _keys(round_key: jax.Array):
  """(permutation key root, client key root) of a round."""
  return rng.stream(round_key, "permutation"), rng.stream(round_key, "clients")


def permutations(key: jax.Array, size: jax.Array, total: int) -> jax.Array:
  """[N] int32: within each client's rows (contiguous, `client_data`), a
  random permutation of them; one sort of the N samples by (client, u)."""
  client = jnp.repeat(
      jnp.arange(size.shape[0]), size, total_repeat_length=total
  )
  u = jax.random.uniform(key, (total,))
  rows = jnp.arange(total, dtype=jnp.int32)
  return jax.lax.sort((client, u, rows), num_keys=2)[2]


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
  rows = perm[data.offset[client] + position % jnp.maximum(n, 1)]
  return data.x[rows], data.y[rows], mask


def _lanes_where(condition, new, old):
  """Per lane (condition [L]), `new` where True, else `old` (leaves [L, ...])."""
  return jax.tree.map(
      lambda a, b: jnp.where(
          condition.reshape(condition.shape + (1,) * (a.ndim - 1)), a, b
      ),
      new,
      old,
  )


def _for_each_lane(condition, update, state):
  """update(lane, state) for each lane where condition [L]: a while loop,
  so at the (most) steps where no lane needs it, nothing touches the
  lanes' models."""

  def body(args):
    pending, state = args
    lane = jnp.argmax(pending)
    return pending.at[lane].set(False), update(lane, state)

  return jax.lax.while_loop(lambda a: a[0].any(), body, (condition, state))[1]


class RoundOutput(NamedTuple):
  """What a round of local training gives the server.

  Attributes:
    upload: the clients' uploads averaged with the weights.
    personal: [C, ...] each client's `local.personal` model after its last
      step (the server model for a client without data), or None.
    loss: the mean local training loss over all real samples of all steps.
  """

  upload: Any
  personal: Any
  loss: jax.Array


def pad_schedule(schedule: Schedule) -> Schedule:
  """`schedule` with its length rounded up to one of 8 sizes per octave
  (padding steps, at most 1/8 more): a round of a changing set of clients
  (`afl.participation`) compiles once per size, not once per length."""
  length = schedule.length
  quantum = 2 ** max(0, length.bit_length() - 4)
  padded = -(-length // quantum) * quantum
  if padded == length:
    return schedule
  extra = ((0, 0), (0, padded - length))
  return schedule._replace(
      **{
          name: np.pad(getattr(schedule, name), extra)
          for name in ("client", "step", "valid", "first", "last")
      }
  )


def _scan_lanes(schedule: Schedule) -> tuple[np.ndarray, ...]:
  """The schedule's lane arrays with the steps on the scan axis: [S, L]."""
  return tuple(
      np.ascontiguousarray(a.T)
      for a in (
          schedule.client,
          schedule.step,
          schedule.valid,
          schedule.first,
          schedule.last,
      )
  )


def round_fn(
    local: LocalTraining,
    schedule: Schedule,
    weights: np.ndarray,
    mesh: jax.sharding.Mesh,
):
  """The round: (server model, data, round key) -> RoundOutput, jitted.

  Each device scans over the steps; a scan step takes one local step on
  every lane (`vmap`: each matmul of the step becomes one batched matmul
  over the lanes). The per-client bookkeeping touches a lane's model only
  when that lane switches clients (`_for_each_lane`), never at every step:
  at a client's first step its carry is set to `init`, at its last its
  weighted upload is added to the device's sum and its personal model
  written to a per-client table; padding steps (only at a lane's end) keep
  the carry.

  A round of some of the clients (`afl.participation`) passes its own
  schedule (of the clients that train: `make_schedule` of their sizes, the
  others' set to 0, with the same number of lanes), the upload weights
  (0 for a client whose upload does not arrive) and the personal models
  the clients that do not train keep.

  Args:
    local: what a client computes.
    schedule: from `make_schedule`, with a multiple of mesh.size lanes: the
      round of every client.
    weights: [C] weight of each client's upload (e.g. its sample count).
    mesh: mesh with axis 'clients'.

  Returns:
    run(params, data, round_key, schedule=None, weights=None, previous=None)
    -> RoundOutput; the upload is the weighted mean over the clients that
    trained (zeros if their weights sum to 0), previous: [C, ...] personal
    models of the clients that do not train (None: the server model's).
  """
  if schedule.num_lanes % mesh.size:
    raise ValueError(
        f"{schedule.num_lanes} lanes do not split over {mesh.size} devices"
    )
  num_clients = len(schedule.steps)
  batch = jax.vmap(client_batch, in_axes=(None, None, 0, 0, None, None))

  def device_lanes(params, data, perm, client_root, weights, *lanes):
    def key_of(c):
      return jax.random.fold_in(client_root, c)

    def body(state, inputs):
      carries, total, table, loss_sum, count = state
      c, k, v, f, l = inputs

      def start(lane, carries):
        fresh = local.init(params, key_of(c[lane]))
        return jax.tree.map(lambda a, u: a.at[lane].set(u), carries, fresh)

      def finish(lane, sums):
        total, table = sums
        carry = jax.tree.map(lambda a: a[lane], carries)
        total = jax.tree.map(
            lambda t, u: t + weights[c[lane]] * u,
            total,
            local.upload(carry),
        )
        if table is not None:
          table = jax.tree.map(
              lambda t, m: t.at[c[lane]].set(m), table, local.personal(carry)
          )
        return total, table

      carries = _for_each_lane(f & v, start, carries)
      x, y, mask = batch(data, perm, c, k, schedule.batch_size, schedule.cycle)
      mask = mask & v[:, None]
      keys = jax.vmap(lambda c, k: jax.random.fold_in(key_of(c), k))(c, k)
      new, losses = jax.vmap(local.step)(carries, x, y, mask, keys)
      carries = jax.lax.cond(
          v.all(), lambda: new, lambda: _lanes_where(v, new, carries)
      )
      total, table = _for_each_lane(l & v, finish, (total, table))
      counts = mask.sum(1)
      state = (
          carries,
          total,
          table,
          loss_sum + (losses * counts).sum(),
          count + counts.sum(),
      )
      return state, None

    carries = jax.vmap(local.init, in_axes=(None, 0))(
        params, jax.vmap(key_of)(lanes[0][0])
    )
    one = local.init(params, key_of(0))
    total = jax.tree.map(jnp.zeros_like, local.upload(one))
    table = None
    if local.personal is not None:
      table = jax.tree.map(
          lambda a: jnp.zeros((num_clients,) + a.shape, a.dtype),
          local.personal(one),
      )
    zero = jnp.zeros((), jnp.float32)
    state, _ = jax.lax.scan(body, (carries, total, table, zero, zero), lanes)
    _, total, table, loss_sum, count = state
    # The devices' float32 sums are added in device order (gathered, then
    # summed), not by the all-reduce, whose order differs between one
    # process and several: the zeroth-order estimates amplify a last-bit
    # difference of the model by 1 / mu. Each client's row of the table is
    # written by one device only, so its psum is exact.
    total, loss_sum = jax.tree.map(
        lambda a: jax.lax.all_gather(a, federated.CLIENTS).sum(0),
        (total, loss_sum),
    )
    table, count = jax.lax.psum((table, count), federated.CLIENTS)
    return total, table, loss_sum / jnp.maximum(count, 1)

  lane_spec = PartitionSpec(None, federated.CLIENTS)
  mapped = jax.shard_map(
      device_lanes,
      mesh=mesh,
      in_specs=(PartitionSpec(),) * 5 + (lane_spec,) * 5,
      out_specs=(PartitionSpec(),) * 3,
      check_vma=False,
  )

  @jax.jit
  def run_lanes(
      params, data, round_key, lanes, weights, trained, total_weight, previous
  ):
    perm_root, client_root = _keys(round_key)
    perm = permutations(perm_root, data.size, data.x.shape[0])
    total, table, loss = mapped(
        params, data, perm, client_root, weights, *lanes
    )
    upload = jax.tree.map(lambda t: t / total_weight, total)
    models = None
    if local.personal is not None:  # the others keep theirs (or the server's)
      if previous is None:
        previous = local.personal(local.init(params, client_root))
        previous = jax.tree.map(
            lambda g: jnp.broadcast_to(g, (num_clients,) + g.shape), previous
        )
      models = jax.tree.map(
          lambda t, g: jnp.where(
              trained.reshape((-1,) + (1,) * (g.ndim - 1)), t, g
          ),
          table,
          previous,
      )
    return RoundOutput(upload, models, loss)

  def arguments(round_schedule: Schedule, round_weights: np.ndarray):
    # Host arrays placed on the mesh (which may span processes).
    trained = round_schedule.steps > 0
    round_weights = np.asarray(round_weights, np.float64)
    total_weight = round_weights[trained].sum() or 1.0
    return distributed.replicate(
        (
            _scan_lanes(round_schedule),
            round_weights.astype(np.float32),
            trained,
            np.float32(total_weight),
        ),
        mesh,
    )

  everyone = arguments(schedule, weights)

  def run(
      params,
      data: ClientData,
      round_key,
      schedule=None,
      weights=None,
      previous=None,
  ) -> RoundOutput:
    placed = everyone if schedule is None else arguments(schedule, weights)
    return run_lanes(params, data, round_key, *placed, previous)

  return run


def loop_round(
    local: LocalTraining,
    schedule: Schedule,
    weights: np.ndarray,
):
  """The same round as `round_fn`, one client after the other, one jitted
  step call per local step (how most simulators run clients). Each call
  takes the client's batch from the device data and adds its loss to the
  running sums on the device, so a step costs one dispatch.

  Returns:
    run(params, data, round_key, schedule=None, weights=None, previous=None)
    -> RoundOutput, as `round_fn`'s.
  """

  @jax.jit
  def step(carry, sums, data, perm, c, k, key):
    x, y, mask = client_batch(
        data, perm, c, k, schedule.batch_size, schedule.cycle
    )
    new, loss = local.step(carry, x, y, mask, jax.random.fold_in(key, k))
    n = mask.sum()
    return new, (sums[0] + loss * n, sums[1] + n)

  init = jax.jit(local.init)
  upload = jax.jit(local.upload)
  perms = jax.jit(permutations, static_argnums=2)
  everyone = (schedule, weights)

  def run(
      params,
      data: ClientData,
      round_key,
      schedule=None,
      weights=None,
      previous=None,
  ) -> RoundOutput:
    schedule, weights = everyone if schedule is None else (schedule, weights)
    weights = np.asarray(weights, np.float64)
    total_weight = float(weights[schedule.steps > 0].sum()) or 1.0
    perm_root, client_root = _keys(round_key)
    perm = perms(perm_root, data.size, data.x.shape[0])
    total, personal = None, []
    sums = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
    for c in range(data.num_clients):
      key = jax.random.fold_in(client_root, c)
      carry = init(params, key)
      for k in range(schedule.steps[c]):
        carry, sums = step(carry, sums, data, perm, c, k, key)
      if local.personal is not None:
        kept = schedule.steps[c] or previous is None
        personal.append(
            local.personal(carry)
            if kept
            else jax.tree.map(lambda a: a[c], previous)
        )
      if schedule.steps[c]:
        sent = jax.tree.map(lambda u: weights[c] * u, upload(carry))
        total = sent if total is None else jax.tree.map(jnp.add, total, sent)
    upload_mean = jax.tree.map(lambda t: t / total_weight, total)
    if personal:
      personal = jax.tree.map(lambda *a: jnp.stack(a), *personal)
    loss = sums[0] / jnp.maximum(sums[1], 1)
    return RoundOutput(upload_mean, personal or None, loss)

  return run
