"""PersA-FL: personalized federated learning with an asynchronous server
(DESIGN.md section 4; ../shared/papers/persa-fl.txt).

A client computes its update on the copy of the server model it last
received; the server applies each update the moment it arrives,

  w <- w + beta p_i delta_i,   delta_i = w_i - w_copy,   p_i = n_i / N,

(the paper's w <- w - beta g_i with g_i = -p_i delta_i: with one local step
of size eta the update is the gradient times eta; weighting by the sample
share makes a synchronous round FedAvg's weighted mean), then sends the
client the current model for its next computation. A client's computation
is R = `local_steps` local steps from its copy, of one of two
personalizations:

* maml: local SGD (step `lr`) on the one-step MAML objective
  f_i(w - alpha grad f_i(w)), exact meta-gradient (`baselines.meta_fl` with
  nu = 1, independent batches for the inner and the outer gradient; alpha:
  `personal_lr`). Tested like Per-FedAvg: every client fine-tunes the
  current server model with one step of size alpha, then is tested.
* me (Moreau envelope): pFedMe's local solver (`algorithms.moreau`): per
  local step, K = `inner_steps` steps on theta_i ~ argmin f_i(theta) +
  lam/2 ||theta - w_i||^2 (personal_lr), then w_i <- w_i - lr lam (w_i -
  theta_i). Tested like pFedMe: every client with its latest theta_i (the
  one its last applied update computed).

Staleness and the bounded-staleness rule. The server version is the number
of rounds every client has completed: V = min_i c_i, c_i the updates client
i has had applied. A copy has the version of the server when it was sent;
an update's staleness is V at its application minus its copy's version. A
client that has just had its c-th update applied starts its next
computation only from a copy of version >= c - tau (tau = `max_staleness`):
if the server is not there yet, the client waits (idle) for the slowest
clients and downloads the model the moment V reaches c - tau; its update
then always counts, with staleness <= tau (when it is applied V <= c, the
client's own count). Waiting instead of discarding stale work keeps slow
clients in the federation and wastes no computation; with tau = 0 every
client waits for all others after each update, so all clients compute on
the same model and the server applies them one by one: exactly the
synchronous algorithm, w <- w + beta sum_i p_i delta_i(w), i.e. pFedMe with
server step beta (me) and Per-FedAvg with R local meta-steps (maml, beta =
1: meta_fedavg with nu = 1). Also recorded, for comparison with the
paper's tau_t: the staleness in applied updates (updates applied between
the copy and the update).

Delays come from the shared clock (`afl.clock`): a computation of client i
takes the cost model's seconds for its R steps on its cores
(`CostModel.computation_seconds`), times a log-normal factor
exp(spread z), z ~ N(0, 1) drawn per client and computation from the
root key's stream "delays";
transfers take latency + 8 bytes / bandwidth of a model each way. The event
order (`schedule_events`) depends only on these delays, never on the
models, so it is simulated first, deterministically (ties: lower client
first), and training replays it. Clients whose computations are under way
at the same time are computed together: a start only records the client's
copy; at the first arrival whose update is not computed yet, all started,
uncomputed computations run in one call (a `lax.map` over them that vmaps
`lanes` clients at a time, sized as the lane driver sizes its lanes; padded
to a power of two, so a run compiles about log2 C shapes), and their
updates are applied one by one in arrival order.

As an `afl.algorithm.Algorithm` (`build`, registered as "persafl"), a round
is C applied updates of the replay (`replayer`); between rounds the state
(`ReplayState`) holds the server model, every client's copy and its
computed but not yet applied update as [C, ...] tables, and where the trace
stands, so the replay is a sequence of pure steps like any other
algorithm's rounds. The simulated time is the trace's own (asynchronous)
clock, reported as results.json's `timing`.

Batches: a client's computation j draws a random permutation of its samples
(key: root, client, j) and cycles through it, batch k holding positions
k B .. (k + 1) B - 1 (modulo its size).
"""

import functools
import heapq
import math
from typing import Any, Callable, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from afl import algorithm as algorithm_lib
from afl import clock as clock_lib
from afl import lanes
from afl import memory
from afl import models
from afl import rng
from baselines import algorithms
from baselines import catalog
from baselines import iterative
from baselines import meta_fl

PERSONALIZATIONS = catalog.PERSONALIZATIONS


class Trace(NamedTuple):
  """The asynchronous run's events in the order the server sees them.

  Attributes:
    arrival: [E] bool: an update arrives and is applied (else: the server
      sends the client its copy and the client starts computing).
    time_s: [E] server-clock time of the event.
    client: [E] the client.
    counter: [E] the client's computation j (0, 1, ...).
    version: [E] the server version V at the event (the copy's version for
      a start).
    staleness: [E] for arrivals, V minus the copy's version (else 0).
    update_staleness: [E] for arrivals, updates applied since the copy.
    computation_s, communication_s, idle_s: [C] each client's totals over
      its applied updates (idle: waiting for the staleness bound).
  """

  arrival: np.ndarray
  time_s: np.ndarray
  client: np.ndarray
  counter: np.ndarray
  version: np.ndarray
  staleness: np.ndarray
  update_staleness: np.ndarray
  computation_s: np.ndarray
  communication_s: np.ndarray
  idle_s: np.ndarray


def schedule_events(
    compute_s: np.ndarray,
    download_s: np.ndarray,
    upload_s: np.ndarray,
    num_updates: int,
    max_staleness: int,
) -> Trace:
  """Simulates the server's event queue (module docstring).

  Args:
    compute_s: [C, J] seconds of computation j of each client (J must exceed
      the computations any client can start: rounds + max_staleness + 1).
    download_s, upload_s: [C] transfer seconds of a model.
    num_updates: stop after this many applied updates.
    max_staleness: tau >= 0.

  Returns:
    The trace, ending with the num_updates-th arrival.
  """
  if max_staleness < 0 or num_updates < 1:
    raise ValueError(
        f"max_staleness ({max_staleness}) must be >= 0 and num_updates "
        f"({num_updates}) >= 1"
    )
  num_clients = len(download_s)
  counts = np.zeros(num_clients, np.int64)
  copy_version = np.zeros(num_clients, np.int64)
  copy_applied = np.zeros(num_clients, np.int64)
  totals = np.zeros((3, num_clients))  # computation, communication, idle
  waiting_since = {}
  events, heap = [], []
  applied = version = 0

  def start(i, t):
    j = counts[i]
    if j >= compute_s.shape[1]:
      raise ValueError(f"compute_s has no computation {j} of client {i}")
    copy_version[i], copy_applied[i] = version, applied
    events.append((False, t, i, j, version, 0, 0))
    finish = t + download_s[i] + compute_s[i, j] + upload_s[i]
    heapq.heappush(heap, (finish, i))

  for i in range(num_clients):
    start(i, 0.0)
  while applied < num_updates:
    t, i = heapq.heappop(heap)
    j = counts[i]
    events.append(
        (
            True,
            t,
            i,
            j,
            version,
            version - copy_version[i],
            applied - copy_applied[i],
        )
    )
    totals[0, i] += compute_s[i, j]
    totals[1, i] += download_s[i] + upload_s[i]
    applied += 1
    counts[i] += 1
    version = int(counts.min())
    waiting_since[i] = t
    for k in sorted(waiting_since):
      if version >= counts[k] - max_staleness:
        totals[2, k] += t - waiting_since.pop(k)
        start(k, t)
  columns = list(zip(*events))
  return Trace(
      np.array(columns[0], bool),
      np.array(columns[1], np.float64),
      *(np.array(c, np.int64) for c in columns[2:]),
      *totals,
  )


def client_updates(
    local: lanes.LocalTraining,
    data: lanes.ClientData,
    batch_size: int,
    local_steps: int,
    num_lanes: int = 0,
) -> Callable:
  """Jitted (copies [G, ...], clients [G], counters [G], root key) ->
  (delta [G, ...], personal [G, ...] or None, loss [G]): every client's R
  local steps from its copy, `num_lanes` clients at a time vmapped (0: all G;
  on a CPU a few lanes win, see `local.default_num_lanes`)."""
  width = max(1, int(np.max(np.asarray(data.size))))

  def one(copy, client, counter, root):
    key = jax.random.fold_in(jax.random.fold_in(root, client), counter)
    n = data.size[client]
    u = jax.random.uniform(rng.stream(key, "permutation"), (width,))
    perm = jnp.argsort(jnp.where(jnp.arange(width) < n, u, 2.0))
    step_key = rng.stream(key, "steps")

    def step(carry, k):
      position = (k * batch_size + jnp.arange(batch_size)) % jnp.maximum(n, 1)
      rows = data.offset[client] + perm[position]
      mask = jnp.broadcast_to(n > 0, position.shape)
      return local.step(
          carry,
          data.x[rows],
          data.y[rows],
          mask,
          jax.random.fold_in(step_key, k),
      )

    carry, losses = jax.lax.scan(
        step, local.init(copy, step_key), jnp.arange(local_steps)
    )
    delta = jax.tree.map(jnp.subtract, local.upload(carry), copy)
    personal = None if local.personal is None else local.personal(carry)
    return delta, personal, losses.mean()

  @jax.jit
  def run(copies, clients, counters, root):
    return jax.lax.map(
        lambda args: one(*args, root),
        (copies, clients, counters),
        batch_size=num_lanes or None,
    )

  return run


def build_local(hparams, apply_fn) -> tuple[lanes.LocalTraining, int]:
  """The client's local training and the rows of its batches."""
  if hparams.personalization == "maml":
    local = meta_fl.meta_local(
        apply_fn,
        hparams.lr,
        hparams.personal_lr,
        nu=1,
        exact=hparams.meta_grad == "exact",
    )
    return local, 2 * hparams.batch_size
  moreau = algorithms.pfedme(
      apply_fn,
      hparams.lr,
      hparams.personal_lr,
      hparams.lam,
      hparams.inner_steps,
      hparams.pfedme_beta,
  )
  return moreau.local, hparams.batch_size


@jax.jit
def _apply(params, deltas, client, scale):
  return jax.tree.map(lambda w, d: w + scale * d[client], params, deltas)


@functools.partial(jax.jit, donate_argnums=0)
def _put(table, value, client):
  """table[client] = value (a copy sent to the client)."""
  return jax.tree.map(lambda t, v: t.at[client].set(v), table, value)


@functools.partial(jax.jit, donate_argnums=0)
def _scatter(table, rows, clients):
  """table[clients[g]] = rows[g] for every g (a group's results)."""
  return jax.tree.map(lambda t, r: t.at[clients].set(r), table, rows)


@functools.partial(jax.jit, donate_argnums=0)
def _copy_row(table, source, client):
  return jax.tree.map(lambda t, s: t.at[client].set(s[client]), table, source)


class ReplayState(NamedTuple):
  """The asynchronous server between reports.

  Attributes:
    params: the server model.
    personal: [C, ...] latest personal models, or None.
    copies: [C, ...] the model each client last received.
    deltas: [C, ...] computed updates not yet applied.
    rows: [C, ...] their personal models, or None.
    started: [C] event index of each client's computation under way that
      is not computed yet (-1: none), host int.
    counter: [C] index j of each client's latest computation, host int.
    computed: [C] its update is in `deltas`, host bool.
    losses: [C] its mean local loss, host float.
    event: the next event of the trace.
  """

  params: Any
  personal: Any
  copies: Any
  deltas: Any
  rows: Any
  started: np.ndarray
  counter: np.ndarray
  computed: np.ndarray
  losses: np.ndarray
  event: int


class Replay(NamedTuple):
  """What a report of `replayer` says."""

  loss: float  # mean local loss of the updates applied since the last report
  event: int  # index in the trace of the last applied update


def replayer(
    trace: Trace,
    updates: Callable,
    weights: np.ndarray,
    beta: float,
    key: jax.Array,
    every: int,
):
  """Training along the trace as pure steps over a `ReplayState`.

  Args:
    trace: from `schedule_events`.
    updates: from `client_updates`.
    weights: [C] p_i.
    beta: the server step.
    key: root key of the clients' batches.
    every: applied updates between reports.

  Returns:
    (start, advance): start(params, personal_init) -> the state before any
    event (personal_init: [C, ...] personal models before any update, or
    None); advance(state) -> (state, Replay) after the next `every`
    applied updates (or the trace's last). advance donates the [C, ...]
    tables of the state it is given (a copy per event would move C models):
    keep host copies of what an earlier state is needed for.
  """
  weights = np.asarray(weights, np.float64)
  num_clients = len(weights)
  total = int(trace.arrival.sum())

  def start(params, personal_init):
    table = jax.tree.map(
        lambda a: jnp.zeros((num_clients,) + a.shape, a.dtype), params
    )
    return ReplayState(
        params,
        personal_init,
        table,
        jax.tree.map(jnp.copy, table),
        None if personal_init is None else jax.tree.map(jnp.copy, table),
        np.full(num_clients, -1, np.int64),
        np.zeros(num_clients, np.int64),
        np.zeros(num_clients, bool),
        np.zeros(num_clients),
        0,
    )

  def compute(state: ReplayState) -> ReplayState:
    """Every started, uncomputed computation in one call (padded to
    a power of two, so a run compiles a few shapes)."""
    waiting = np.flatnonzero(state.started >= 0)
    waiting = waiting[np.argsort(state.started[waiting], kind="stable")]
    size = 2 ** math.ceil(math.log2(len(waiting)))
    clients = np.concatenate(
        [waiting, np.repeat(waiting[:1], size - len(waiting))]
    )
    deltas, rows, loss = updates(
        jax.tree.map(lambda t: t[clients], state.copies),
        jnp.asarray(clients, jnp.int32),
        jnp.asarray(state.counter[clients], jnp.int32),
        key,
    )
    real = jnp.asarray(waiting, jnp.int32)
    keep = lambda tree: jax.tree.map(lambda a: a[: len(waiting)], tree)
    losses, computed = state.losses.copy(), state.computed.copy()
    losses[waiting] = np.asarray(loss)[: len(waiting)]
    computed[waiting] = True
    started = state.started.copy()
    started[waiting] = -1
    return state._replace(
        deltas=_scatter(state.deltas, keep(deltas), real),
        rows=None if rows is None else _scatter(state.rows, keep(rows), real),
        started=started,
        computed=computed,
        losses=losses,
    )

  def advance(state: ReplayState) -> tuple[ReplayState, Replay]:
    losses, index = [], state.event
    applied = int(trace.arrival[: state.event].sum())
    while True:
      i, j = int(trace.client[index]), int(trace.counter[index])
      if not trace.arrival[index]:
        started, counter = state.started.copy(), state.counter.copy()
        started[i], counter[i] = index, j
        state = state._replace(
            copies=_put(state.copies, state.params, i),
            started=started,
            counter=counter,
        )
        index += 1
        continue
      if not state.computed[i]:
        state = compute(state)
      computed = state.computed.copy()
      computed[i] = False
      state = state._replace(
          params=_apply(
              state.params, state.deltas, i, jnp.float32(beta * weights[i])
          ),
          personal=None
          if state.personal is None
          else _copy_row(state.personal, state.rows, i),
          computed=computed,
      )
      losses.append(float(state.losses[i]))
      applied += 1
      index += 1
      if applied % every == 0 or applied == total:
        return state._replace(event=index), Replay(
            float(np.mean(losses)), index - 1
        )

  return start, advance


def delays(
    profiles: clock_lib.DeviceProfiles,
    cost_model: clock_lib.CostModel,
    work: clock_lib.ClientWork,
    spread: float,
    generator: np.random.Generator,
    jobs: int,
):
  """(compute_s [C, jobs], download_s [C], upload_s [C]): the clock's
  seconds of each client's computation (`work`: R steps) times
  exp(spread z), z ~ N(0, 1) per client and computation from `generator`;
  its transfers."""
  base = cost_model.computation_seconds(work, profiles.cores)
  noise = generator.standard_normal((len(base), jobs))
  return (
      base[:, None] * np.exp(spread * noise),
      clock_lib.transfer_seconds(work.bytes_down, profiles),
      clock_lib.transfer_seconds(work.bytes_up, profiles),
  )


def build(hparams, fed: algorithm_lib.Federation) -> algorithm_lib.Algorithm:
  """PersA-FL over the federation: a "round" is C applied updates (one per
  client on average); its record's `time_s` is the simulated server time of
  its last update."""
  model, mesh, sizes = fed.model, fed.mesh, fed.client_sizes
  num_clients = fed.num_clients
  shapes = jax.eval_shape(
      lambda: models.init_params(model, jax.random.key(0), fed.input_shape)
  )
  local, batch_rows = build_local(hparams, model.apply)
  carry = jax.eval_shape(local.init, shapes, jax.random.key(0))
  data = lanes.client_data(
      fed.inputs, fed.split.y, fed.split.train_indices, mesh
  )
  updates = client_updates(
      local,
      data,
      batch_rows,
      hparams.local_steps,
      hparams.num_lanes
      or lanes.default_num_lanes(memory.tree_bytes(carry), num_clients),
  )
  work = iterative.client_work(
      local,
      shapes,
      fed.input_shape,
      lanes.make_schedule(sizes, batch_rows, hparams.local_steps),
      sizes,
      1,
  )
  compute_s, download_s, upload_s = delays(
      fed.profiles,
      fed.cost_model,
      work,
      hparams.delay_spread,
      rng.numpy_rng(fed.key, "delays"),
      hparams.rounds + hparams.max_staleness + 2,
  )
  trace = schedule_events(
      compute_s,
      download_s,
      upload_s,
      hparams.rounds * num_clients,
      hparams.max_staleness,
  )
  arrivals = np.flatnonzero(trace.arrival)
  start, advance = replayer(
      trace,
      updates,
      sizes / max(sizes.sum(), 1),
      hparams.pfedme_beta,
      rng.stream(fed.key, "batches"),
      num_clients,
  )
  fine_tune = meta_fl.fine_tuner(
      model.apply, hparams.personal_lr, 1, hparams.batch_size, sizes, mesh
  )
  everyone = np.arange(num_clients)
  logging.info(
      "persafl (%s, max staleness %d): %d updates over %.2fs simulated; "
      "staleness mean %.2f max %d (in updates: mean %.1f, max %d)",
      hparams.personalization,
      hparams.max_staleness,
      len(arrivals),
      trace.time_s[-1],
      trace.staleness[arrivals].mean(),
      trace.staleness[arrivals].max(),
      trace.update_staleness[arrivals].mean(),
      trace.update_staleness[arrivals].max(),
  )

  def init(key):
    params = fed.replicated(
        models.init_params(model, key, fed.input_shape, init=hparams.init)
    )
    personal = None
    if hparams.personalization == "me":
      personal = jax.tree.map(
          lambda a: jnp.broadcast_to(a, (num_clients,) + a.shape), params
      )
    return start(params, personal)

  def round_(state: ReplayState, index: int, key, who=None):
    # The batches' keys depend on the client and computation; who is None
    # (the runtime refuses participation settings without a synchronous
    # clock).
    del index, key, who
    state, report = advance(state)
    done = arrivals[arrivals <= report.event]
    return state, {
        "time_s": float(trace.time_s[report.event]),
        "updates": int(len(done)),
        "local_loss": report.loss,
        "staleness_max": int(trace.staleness[done[-num_clients:]].max()),
    }

  def tested(state: ReplayState, key):
    if state.personal is not None:
      return algorithm_lib.Tested(state.personal, everyone)
    return algorithm_lib.Tested(fine_tune(state.params, data, key), everyone)

  def summary(state: ReplayState) -> dict:
    done = arrivals[arrivals < state.event]
    per_client = {
        "computation_s": trace.computation_s,
        "communication_s": trace.communication_s,
        "idle_s": trace.idle_s,
    }
    per_client["total_s"] = sum(per_client.values())
    reports = done[num_clients - 1 :: num_clients]
    return {
        "personalization": hparams.personalization,
        "max_staleness": hparams.max_staleness,
        "time_per_round_s": trace.time_s[reports].tolist(),
        "timing": {
            "asynchronous": True,
            "makespan_s": float(trace.time_s[-1]),
            "mean_per_client": {
                k: float(v.mean()) for k, v in per_client.items()
            },
            "sum_over_clients": {
                k: float(v.sum()) for k, v in per_client.items()
            },
            "per_client": {k: v.tolist() for k, v in per_client.items()},
            "updates_per_client": np.bincount(
                trace.client[arrivals], minlength=num_clients
            ).tolist(),
            "staleness_histogram": np.bincount(
                trace.staleness[arrivals]
            ).tolist(),
            "update_staleness_mean": float(
                trace.update_staleness[arrivals].mean()
            ),
            "update_staleness_max": int(trace.update_staleness[arrivals].max()),
            "flops_fixed": float(work.flops_fixed),
            "flops_per_sample": float(work.flops_per_sample),
            "batch_rows": batch_rows,
            "model_bytes": int(work.bytes_up[0]),
            "cores": fed.profiles.cores.tolist(),
            "bandwidth_bps": fed.profiles.bandwidth_bps.tolist(),
            "latency_s": fed.profiles.latency_s.tolist(),
            "calibration": fed.cost_model.calibration._asdict(),
        },
    }

  return algorithm_lib.Algorithm(
      init=init,
      round=round_,
      num_rounds=hparams.rounds,
      models=tested,
      work=None,
      summary=summary,
  )


# The builder (`afl.registry`, declared in `baselines.catalog`).
BUILDERS = {"persafl": build}
