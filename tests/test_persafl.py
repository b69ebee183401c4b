"""PersA-FL: the event queue (order, staleness bound) and staleness 0 against
the synchronous algorithm."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afl import clock as clock_lib
import afl
from afl import models
from baselines import algorithms
from afl import lanes
from baselines import meta_fl
from baselines import persafl
from tests.test_baselines import tiny_federation


def random_delays(seed, num_clients=12, jobs=30):
  """Heterogeneous clients (1..4 cores) with log-normal noise, as the runs
  draw them from the clock."""
  profiles = clock_lib.draw_profiles(jax.random.key(seed), num_clients)
  calibration = clock_lib.HostCalibration((1, 4096), (1e9, 1e9), 1e-5, "test")
  ones = np.ones(num_clients, np.int64)
  work = clock_lib.ClientWork(
      40 * ones, 8 * ones, 1e5, 1e4, 4000 * ones, 4000 * ones
  )
  return persafl.delays(
      profiles,
      clock_lib.CostModel(calibration),
      work,
      0.5,
      np.random.default_rng(seed),
      jobs,
  )


def test_event_order_is_deterministic_for_a_seed():
  traces = [
      persafl.schedule_events(*random_delays(seed), 200, 2)
      for seed in (0, 0, 1)
  ]
  for field in traces[0]._fields:
    np.testing.assert_array_equal(
        getattr(traces[0], field), getattr(traces[1], field)
    )
  assert not np.array_equal(traces[0].client, traces[2].client)
  arrivals = traces[0].time_s[traces[0].arrival]
  assert np.all(np.diff(arrivals) >= 0)  # applied in arrival order


@pytest.mark.parametrize("max_staleness", [0, 1, 3])
def test_applied_updates_never_exceed_the_staleness_bound(max_staleness):
  num_clients = 12
  trace = persafl.schedule_events(*random_delays(3), 240, max_staleness)
  # Recomputed from the events alone: version = rounds every client has
  # completed; an update's copy is the client's last start.
  counts = np.zeros(num_clients, int)
  copy_version = {}
  staleness = []
  for arrival, client in zip(trace.arrival, trace.client):
    if arrival:
      staleness.append(counts.min() - copy_version.pop(client))
      counts[client] += 1
    else:
      assert client not in copy_version  # one computation at a time
      copy_version[client] = counts.min()
  assert len(staleness) == 240
  assert max(staleness) <= max_staleness
  np.testing.assert_array_equal(staleness, trace.staleness[trace.arrival])
  if max_staleness:  # stale updates are applied: the run is asynchronous
    assert max(staleness) >= 1
    assert counts.max() - counts.min() > 1
  else:  # lock step: every client's j-th update is in round j
    rounds = trace.counter[trace.arrival].reshape(20, num_clients)
    np.testing.assert_array_equal(
        rounds, np.repeat(np.arange(20)[:, None], 12, 1)
    )


def test_without_a_tight_bound_fast_clients_update_more_often():
  compute_s, down, up = random_delays(5)
  loose = persafl.schedule_events(compute_s, down, up, 240, 25)
  updates = np.bincount(loose.client[loose.arrival], minlength=12)
  speed = 1 / compute_s.mean(1)
  assert np.corrcoef(updates, speed)[0, 1] > 0.8
  assert (
      loose.idle_s.sum()
      < persafl.schedule_events(compute_s, down, up, 240, 0).idle_s.sum()
  )


@pytest.mark.parametrize("personalization", ["maml", "me"])
def test_staleness_zero_is_the_synchronous_algorithm(personalization):
  """tau = 0 replays to w_{k+1} = w_k + beta sum_i p_i delta_i(w_k), every
  client computing round k from w_k: Per-FedAvg with R local meta-steps
  (maml) or pFedMe with server step beta (me)."""
  x, y, indices = tiny_federation(num_clients=7, seed=2)
  model = models.get_model("lr", 3)
  params = models.init_params(model, jax.random.key(0), (6,))
  data = lanes.client_data(x, y, indices)
  sizes = np.asarray(data.size)
  weights = sizes / sizes.sum()
  if personalization == "maml":
    local = meta_fl.meta_local(model.apply, 0.2, 0.3, 1, exact=True)
    rows, beta = 8, 1.0
  else:
    local = algorithms.pfedme(model.apply, 0.05, 0.05, 15.0, 3, 0.7).local
    rows, beta = 4, 0.7
  updates = persafl.client_updates(local, data, rows, 3, num_lanes=2)
  key = jax.random.key(4)
  rounds = 4
  compute_s, down, up = random_delays(6, num_clients=7)
  trace = persafl.schedule_events(compute_s, down, up, rounds * 7, 0)
  personal_init = None
  if local.personal is not None:
    personal_init = jax.tree.map(
        lambda a: jnp.broadcast_to(a, (7,) + a.shape), params
    )
  start, advance = persafl.replayer(trace, updates, weights, beta, key, 7)
  state, reports = start(params, personal_init), []
  for _ in range(rounds):
    state, _ = advance(state)  # donates the tables: keep host copies
    reports.append(jax.tree.map(np.asarray, state._replace(copies=None)))
  assert trace.arrival[: state.event].sum() == trace.arrival.sum()

  w = params
  for k in range(rounds):
    copies = jax.tree.map(lambda a: jnp.broadcast_to(a, (7,) + a.shape), w)
    deltas, personal, _ = updates(
        copies, jnp.arange(7), jnp.full(7, k, jnp.int32), key
    )
    w = jax.tree.map(
        lambda a, d: a + beta * jnp.tensordot(weights, d, axes=1), w, deltas
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        reports[k].params,
        w,
    )
    if personal is not None:
      jax.tree.map(
          lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
          reports[k].personal,
          personal,
      )


def test_client_updates_match_the_local_training_step_by_step():
  """A vmapped group gives each client what its own R steps give."""
  x, y, indices = tiny_federation(num_clients=5, seed=3)
  model = models.get_model("lr", 3)
  params = models.init_params(model, jax.random.key(0), (6,))
  data = lanes.client_data(x, y, indices)
  local = algorithms.fedavg(model.apply, 0.1).local
  updates = persafl.client_updates(local, data, 4, 2, num_lanes=0)
  clients = jnp.array([1, 4, 2])
  copies = jax.tree.map(lambda a: jnp.stack([a, 2 * a, -a]), params)
  together, _, _ = updates(
      copies, clients, jnp.array([0, 3, 1]), jax.random.key(1)
  )
  for g, (c, j) in enumerate([(1, 0), (4, 3), (2, 1)]):
    alone, _, _ = updates(
        jax.tree.map(lambda a: a[g : g + 1], copies),
        jnp.array([c]),
        jnp.array([j]),
        jax.random.key(1),
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(
            a[g], b[0], rtol=1e-5, atol=1e-6
        ),
        together,
        alone,
    )


@pytest.mark.parametrize("personalization", ["maml", "me"])
def test_run_experiment_writes_results_against_simulated_time(
    tmp_path, personalization
):
  config = afl.get_config(
      algorithm="persafl",
      personalization=personalization,
      model="lr",
      num_clients=10,
      rounds=3,
      local_steps=4,
      max_staleness=1,
  )
  results = afl.train_and_evaluate(config, tmp_path, progress=False)
  on_disk = json.loads((tmp_path / "results.json").read_text())
  assert on_disk["personalization"] == personalization
  assert len(on_disk["accuracy_per_round"]) == 3
  times = on_disk["time_per_round_s"]
  assert all(b > a > 0 for a, b in zip(times, times[1:]))
  timing = on_disk["timing"]
  assert sum(timing["updates_per_client"]) == 30
  assert len(timing["staleness_histogram"]) <= 2  # bound 1
  assert timing["makespan_s"] == times[-1]
  assert results["accuracy"] > 0.3


def test_persafl_needs_fixed_local_steps():
  with pytest.raises(ValueError, match="local_steps"):
    afl.get_config(algorithm="persafl", local_steps=0, num_clients=10)
