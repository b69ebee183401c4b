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
exp(spread z), z ~ N(0, 1) drawn per client and computation from the seed;
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

Batches: a client's computation j draws a random permutation of its samples
(key: root, client, j) and cycles through it, batch k holding positions
k B .. (k + 1) B - 1 (modulo its size).
"""

import heapq
import json
import math
import time
from typing import Any, Callable, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from afl import clock as clock_lib
from afl import evaluation
from afl import experiment as afl_experiment
from afl import memory
from afl import models
from afl import timing
from baselines import algorithms
from baselines import experiment as baselines_experiment
from baselines import local as local_lib
from baselines import meta_fl

PERSONALIZATIONS = ("maml", "me")


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
    local: local_lib.LocalTraining,
    data: local_lib.ClientData,
    batch_size: int,
    local_steps: int,
    lanes: int = 0,
) -> Callable:
  """Jitted (copies [G, ...], clients [G], counters [G], root key) ->
  (delta [G, ...], personal [G, ...] or None, loss [G]): every client's R
  local steps from its copy, `lanes` clients at a time vmapped (0: all G;
  on a CPU a few lanes win, see `local.default_num_lanes`)."""
  width = max(1, int(np.max(np.asarray(data.size))))

  def one(copy, client, counter, root):
    key = jax.random.fold_in(jax.random.fold_in(root, client), counter)
    n = data.size[client]
    u = jax.random.uniform(jax.random.fold_in(key, 0), (width,))
    perm = jnp.argsort(jnp.where(jnp.arange(width) < n, u, 2.0))
    step_key = jax.random.fold_in(key, 1)

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
        batch_size=lanes or None,
    )

  return run


def build_local(config, apply_fn) -> tuple[local_lib.LocalTraining, int]:
  """The client's local training and the rows of its batches."""
  if config.personalization == "maml":
    local = meta_fl.meta_local(
        apply_fn,
        config.lr,
        config.personal_lr,
        nu=1,
        exact=config.meta_grad == "exact",
    )
    return local, 2 * config.batch_size
  moreau = algorithms.pfedme(
      apply_fn,
      config.lr,
      config.personal_lr,
      config.lam,
      config.inner_steps,
      config.pfedme_beta,
  )
  return moreau.local, config.batch_size


def _stack(trees):
  return jax.tree.map(lambda *a: jnp.stack(a), *trees)


@jax.jit
def _apply(params, deltas, index, scale):
  return jax.tree.map(lambda w, d: w + scale * d[index], params, deltas)


@jax.jit
def _set_row(table, rows, index, row):
  return jax.tree.map(lambda t, r: t.at[row].set(r[index]), table, rows)


class Replay(NamedTuple):
  """What `replay` reports at the end of every `every` applied updates."""

  params: Any  # the server model
  personal: Any  # [C, ...] latest personal models, or None
  loss: float  # mean local loss of the updates applied since the last report
  event: int  # index in the trace of the last applied update


def replay(
    trace: Trace,
    updates: Callable,
    params,
    weights: np.ndarray,
    beta: float,
    key: jax.Array,
    every: int,
    personal_init=None,
):
  """Trains along the trace; yields a `Replay` after every `every` applied
  updates (and after the last one).

  Args:
    trace: from `schedule_events`.
    updates: from `client_updates`.
    params: the initial server model.
    weights: [C] p_i.
    beta: the server step.
    key: root key of the clients' batches.
    every: updates between reports.
    personal_init: [C, ...] personal models before any update (None: the
      local training has none).
  """
  weights = np.asarray(weights, np.float64)
  copies, pending, results = {}, [], {}
  personal, losses, applied = personal_init, [], 0
  total = int(trace.arrival.sum())
  for index in range(len(trace.client)):
    i, j = int(trace.client[index]), int(trace.counter[index])
    if not trace.arrival[index]:
      copies[i] = params
      pending.append((i, j))
      continue
    if i not in results:
      size = 2 ** math.ceil(math.log2(len(pending)))
      padded = pending + [pending[0]] * (size - len(pending))
      clients = np.array([c for c, _ in padded], np.int32)
      deltas, rows, loss = updates(
          _stack([copies[c] for c in clients]),
          jnp.asarray(clients),
          jnp.asarray([k for _, k in padded], np.int32),
          key,
      )
      loss = np.asarray(loss)
      for position, (c, _) in enumerate(pending):
        results[c] = (deltas, rows, position, float(loss[position]))
      pending = []
    deltas, rows, position, loss = results.pop(i)
    params = _apply(params, deltas, position, jnp.float32(beta * weights[i]))
    if personal is not None:
      personal = _set_row(personal, rows, position, i)
    losses.append(loss)
    applied += 1
    if applied % every == 0 or applied == total:
      yield Replay(params, personal, float(np.mean(losses)), index)
      losses = []


def delays(
    profiles: clock_lib.DeviceProfiles,
    cost_model: clock_lib.CostModel,
    work: clock_lib.ClientWork,
    spread: float,
    seed: int,
    jobs: int,
):
  """(compute_s [C, jobs], download_s [C], upload_s [C]): the clock's
  seconds of each client's computation (`work`: R steps) times
  exp(spread z), z ~ N(0, 1) per client and computation; its transfers."""
  base = cost_model.computation_seconds(work, profiles.cores)
  noise = np.random.default_rng(seed).standard_normal((len(base), jobs))
  return (
      base[:, None] * np.exp(spread * noise),
      clock_lib.transfer_seconds(work.bytes_down, profiles),
      clock_lib.transfer_seconds(work.bytes_up, profiles),
  )


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`baselines.experiment.resolve` with the defaults of the synchronous
  counterpart (maml: meta_fedavg, me: pfedme)."""
  counterpart = config.copy_and_resolve_references()
  counterpart.algorithm = (
      "meta_fedavg"
      if config.get("personalization", "maml") == "maml"
      else "pfedme"
  )
  full = baselines_experiment.resolve(counterpart)
  full.algorithm = "persafl"
  return full


def run_experiment(
    config: ml_collections.ConfigDict, output_dir, split=None
) -> dict[str, Any]:
  """Trains and evaluates PersA-FL; writes output_dir/results.json.

  A "round" of the records is C applied updates (one per client on
  average); `time_s` is the simulated server time at its last update.
  """
  config = resolve(config)
  baselines_experiment.validate(config)
  if not config.local_steps:
    raise ValueError("persafl needs --local_steps > 0 (R steps per update)")
  start = time.perf_counter()
  output_dir, results_path = afl_experiment.prepare_output(config, output_dir)
  split, model, x, mesh, train_blocks, test_blocks, data = (
      baselines_experiment.prepare(config, split)
  )
  sizes = np.asarray(data.size)
  key = jax.random.key(config.seed)
  params = models.init_params(model, jax.random.fold_in(key, 0), x.shape[1:])
  local, batch_rows = build_local(config, model.apply)
  carry = jax.eval_shape(local.init, params, key)
  updates = client_updates(
      local,
      data,
      batch_rows,
      config.local_steps,
      config.num_lanes
      or local_lib.default_num_lanes(
          memory.tree_bytes(carry), config.num_clients
      ),
  )

  clock = afl_experiment.make_clock(config, sizes)  # profiles, cost model
  work = baselines_experiment.client_work(
      local,
      params,
      x.shape[1:],
      local_lib.make_schedule(sizes, batch_rows, config.local_steps),
      sizes,
      1,
  )
  compute_s, download_s, upload_s = delays(
      clock.profiles,
      clock.cost_model,
      work,
      config.delay_spread,
      config.seed,
      config.rounds + config.max_staleness + 2,
  )
  num_clients = config.num_clients
  trace = schedule_events(
      compute_s,
      download_s,
      upload_s,
      config.rounds * num_clients,
      config.max_staleness,
  )
  weights = sizes / max(sizes.sum(), 1)
  personal_init = None
  if config.personalization == "me":
    personal_init = jax.tree.map(
        lambda a: jnp.broadcast_to(a, (num_clients,) + a.shape), params
    )
  fine_tune = meta_fl.fine_tuner(
      model.apply, config.personal_lr, 1, config.batch_size, sizes, mesh
  )
  tune_key = jax.random.fold_in(key, 2**31 - 1)
  count_loss = baselines_experiment._loss_counter(  # pylint: disable=protected-access
      model.apply, mesh
  )
  client_model = np.arange(num_clients, dtype=np.int32)
  data_time = time.perf_counter() - start
  arrivals = np.flatnonzero(trace.arrival)
  logging.info(
      "persafl (%s, max staleness %d) on %s-%s: %d clients, %d updates over "
      "%.2fs simulated; staleness mean %.2f max %d (in updates: mean %.1f, "
      "max %d); data ready in %.2fs",
      config.personalization,
      config.max_staleness,
      config.dataset,
      config.model,
      num_clients,
      len(arrivals),
      trace.time_s[-1],
      trace.staleness[arrivals].mean(),
      trace.staleness[arrivals].max(),
      trace.update_staleness[arrivals].mean(),
      trace.update_staleness[arrivals].max(),
      data_time,
  )

  rounds, best = [], (-1.0, 0)
  train_time = eval_time = 0.0
  with timing.CompileClock() as compile_clock:
    round_start = time.perf_counter()
    compile_before = 0.0
    steps = replay(
        trace,
        updates,
        params,
        weights,
        config.pfedme_beta,
        jax.random.fold_in(key, 2),
        num_clients,
        personal_init,
    )
    for index, out in enumerate(steps, start=1):
      jax.block_until_ready(out.params)
      seconds = time.perf_counter() - round_start
      compile_s = compile_clock.seconds - compile_before
      done = arrivals[arrivals <= out.event]
      record = {
          "round": index,
          "time_s": float(trace.time_s[out.event]),
          "updates": int(len(done)),
          "local_loss": out.loss,
          "staleness_max": int(trace.staleness[done[-num_clients:]].max()),
          "seconds": seconds - compile_s,
          "compile_s": compile_s,
      }
      train_time += record["seconds"]
      diverged = not math.isfinite(out.loss)
      last = index == config.rounds or diverged
      if index % config.eval_every == 0 or last:
        eval_start = time.perf_counter()
        if out.personal is not None:
          tested = out.personal
        else:
          tested = fine_tune(
              out.params, data, jax.random.fold_in(tune_key, index)
          )
        accuracy = evaluation.evaluate(
            model.apply, tested, test_blocks, mesh, client_model
        )
        loss_sum, count = count_loss(
            tested, train_blocks, jnp.asarray(client_model)[train_blocks.client]
        )
        record.update(
            accuracy=accuracy.overall,
            train_loss=float(np.sum(loss_sum) / max(np.sum(count), 1)),
        )
        eval_time += time.perf_counter() - eval_start
        if accuracy.overall > best[0]:
          best = (accuracy.overall, index)
        logging.info(
            "round %d/%d (%d updates, simulated %.3fs): test accuracy %.4f, "
            "train loss %.4f, local loss %.4f, %.3fs",
            index,
            config.rounds,
            record["updates"],
            record["time_s"],
            accuracy.overall,
            record["train_loss"],
            out.loss,
            seconds,
        )
      rounds.append(record)
      if diverged:
        logging.warning("round %d: the local loss diverged; stopping", index)
        break
      round_start = time.perf_counter()
      compile_before = compile_clock.seconds
  compile_time = compile_clock.seconds

  afl_experiment.save_params(
      output_dir / "params.msgpack", tested, client_model
  )
  per_client = {
      "computation_s": trace.computation_s,
      "communication_s": trace.communication_s,
      "idle_s": trace.idle_s,
  }
  per_client["total_s"] = sum(per_client.values())
  results = {
      "algorithm": "persafl",
      "personalization": config.personalization,
      "max_staleness": config.max_staleness,
      **baselines_experiment.run_results(
          config,
          best,
          accuracy,
          rounds,
          sizes,
          mesh,
          dict(
              wall_time_s=train_time,
              compile_time_s=compile_time,
              data_time_s=data_time,
              eval_time_s=eval_time,
          ),
      ),
      "time_per_round_s": [r["time_s"] for r in rounds],
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
          "cores": clock.profiles.cores.tolist(),
          "bandwidth_bps": clock.profiles.bandwidth_bps.tolist(),
          "latency_s": clock.profiles.latency_s.tolist(),
          "calibration": clock.cost_model.calibration._asdict(),
      },
  }
  afl_experiment._write_atomically(  # pylint: disable=protected-access
      results_path, json.dumps(results, indent=2).encode("utf-8")
  )
  logging.info(
      "persafl (%s): best test accuracy %.4f (round %d), last %.4f; "
      "simulated %.2fs; training %.2fs + compile %.2fs; wrote %s",
      config.personalization,
      best[0],
      best[1],
      accuracy.overall,
      trace.time_s[-1],
      train_time,
      compile_time,
      results_path,
  )
  return results
