"""The simulated clock: eq. 7, idle times, cost model, bytes, profiles."""

import json

import jax
import numpy as np
import pytest

import afl
from afl import clock
from afl import runtime
from afl import models
from afl import statistics

# A made-up host: throughput doubling from batch 1 to 64, 5 us per batch.
HOST = clock.HostCalibration((1, 8, 64), (1e9, 1.5e9, 2e9), 5e-6, "test host")
COST = clock.CostModel(HOST)


def profiles(cores, bandwidth_bps=1e9, latency_s=1e-3):
  cores = np.asarray(cores)
  return clock.DeviceProfiles(
      cores,
      np.full(cores.shape, bandwidth_bps, float),
      np.full(cores.shape, latency_s, float),
  )


def test_eq7_on_hand_made_arrival_times():
  # Round 1 (T_0 = 0): intervals 2, 4, 7; the fastest keeps its batch.
  assert clock.adaptive_batch_size(
      [2.0, 4.0, 7.0], [0.0, 0.0, 0.0], [10, 10, 10], [100, 15, 100]
  ).tolist() == [10, 15, 35]
  # Round 2: intervals 3, 1.5, 1 -> ceil(3 * 7) = 21, ceil(1.5 * 5) = 8.
  assert clock.adaptive_batch_size(
      [5.0, 5.5, 8.0], [2.0, 4.0, 7.0], [7, 5, 9], [100, 100, 4]
  ).tolist() == [21, 8, 4]
  with pytest.raises(ValueError, match="increase"):
    clock.adaptive_batch_size([1.0, 2.0], [1.0, 0.0], [1, 1], [5, 5])


def test_round_timeline_and_idle_definitions():
  # Client 0: 1 core; client 1: 4 cores; same work, 1000 bytes each way.
  work = clock.ClientWork(
      np.array([64, 64]), np.array([8, 8]), 0.0, 1e6, [1000, 1000], [500, 0]
  )
  state, r = clock.simulate_round(
      clock.initial_state(2), profiles([1, 4]), COST, work
  )
  batch = 5e-6 + 8e6 / 1.5e9
  np.testing.assert_allclose(
      r.computation_s, [8 * batch, 8 * (5e-6 + 8e6 / 6e9)]
  )
  np.testing.assert_allclose(r.upload_s, 1e-3 + 8000 / 1e9)
  np.testing.assert_allclose(r.download_s, [1e-3 + 4000 / 1e9, 0.0])
  np.testing.assert_allclose(r.arrival_s, r.computation_s + r.upload_s)
  np.testing.assert_allclose(r.idle_s, [0.0, np.ptp(r.arrival_s)])
  assert r.server_idle_s == pytest.approx(np.ptp(r.arrival_s))
  np.testing.assert_allclose(state.start_s, r.arrival_s.max() + r.download_s)
  # eq. 7's T excludes waiting: the busy clock.
  np.testing.assert_allclose(state.arrival_busy_s, r.arrival_s)
  np.testing.assert_allclose(state.busy_s, r.arrival_s + r.download_s)


def test_cost_model_monotonic_in_work_and_cores():
  def seconds(samples=100, per_sample=1e6, cores=1, batch=16):
    work = clock.ClientWork(
        np.array([samples]), np.array([batch]), 1e3, per_sample, [0], [0]
    )
    return COST.computation_seconds(work, np.array([cores]))[0]

  assert seconds(samples=100) < seconds(samples=101) < seconds(samples=200)
  assert seconds(per_sample=1e6) < seconds(per_sample=2e6)
  by_cores = [seconds(cores=c) for c in (1, 2, 3, 4)]
  assert np.all(np.diff(by_cores) < 0)
  # A larger batch (higher measured throughput, fewer overheads) is faster.
  by_batch = [seconds(batch=b) for b in (1, 4, 16, 64, 100)]
  assert np.all(np.diff(by_batch) < 0)


def test_profiles_are_seeded_and_in_range():
  a = clock.draw_profiles(jax.random.key(3), 100, bandwidth_gbps=(1, 100))
  b = clock.draw_profiles(jax.random.key(3), 100, bandwidth_gbps=(1, 100))
  c = clock.draw_profiles(jax.random.key(4), 100, bandwidth_gbps=(1, 100))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a.cores, c.cores)
  assert set(a.cores.tolist()) == {1, 2, 3, 4}
  assert 1e9 <= a.bandwidth_bps.min() < a.bandwidth_bps.max() <= 100e9
  with pytest.raises(ValueError, match="cores"):
    clock.draw_profiles(jax.random.key(0), 3, cores=(0, 2))


@pytest.fixture(scope="module")
def synthetic_run():
  """FedACnnL's federation and algorithm on 8 synthetic clients."""
  cfg = afl.get_config(num_clients=8, model="mlp", num_devices=2)
  fed = runtime.federation(cfg)
  return fed, runtime.build(cfg, fed)


def make_clock(fed, adaptive):
  return clock.Clock(
      clock.draw_profiles(jax.random.key(0), 8),
      COST,
      4,
      fed.client_sizes,
      adaptive,
  )


def train(run, timed):
  fed, algorithm = run
  return runtime.run_rounds(algorithm, fed.key, clock=timed)


def test_adaptive_batch_size_changes_time_not_weights(synthetic_run):
  trained, clocks = {}, {}
  for adaptive in (True, False):
    clocks[adaptive] = make_clock(synthetic_run[0], adaptive)
    trained[adaptive] = train(synthetic_run, clocks[adaptive])
  for a, b in zip(
      jax.tree.leaves(trained[True]["tested"].params),
      jax.tree.leaves(trained[False]["tested"].params),
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  fixed = [r.batch_size.tolist() for r in clocks[False].rounds]
  grown = [r.batch_size.tolist() for r in clocks[True].rounds]
  assert fixed[0] == grown[0] and all(f == fixed[0] for f in fixed)
  assert grown[-1] != fixed[-1]
  assert clocks[True].summary()["mean_per_client"]["idle_s"] < (
      clocks[False].summary()["mean_per_client"]["idle_s"]
  )
  summary = json.loads(json.dumps(clocks[True].summary()))
  assert len(summary["rounds"]) == len(trained[True]["records"]) == 3
  total = summary["mean_per_client"]
  assert total["total_s"] == pytest.approx(
      total["computation_s"] + total["communication_s"] + total["idle_s"]
  )
  assert "idle_s_mean" in trained[True]["records"][0]["timing"]


def test_communication_bytes_are_the_arrays_sent(synthetic_run):
  fed, algorithm = synthetic_run
  timed = make_clock(fed, True)
  trained = train(synthetic_run, timed)
  params = jax.tree.map(lambda a: a[0], trained["tested"].params)
  blocks = fed.blocks("train", algorithm.layout)
  x = np.asarray(blocks.x[0])
  for layer, record in enumerate(timed.rounds):
    one_client = statistics.block_statistics(
        fed.model,
        layer,
        params,
        x,
        np.asarray(blocks.y[0]),
        np.asarray(blocks.mask[0]),
        10,
        np.float64,
    )
    up = sum(np.asarray(a).nbytes for a in one_client)
    down = (
        sum(
            np.asarray(a).nbytes
            for a in jax.tree.leaves(params["params"][models.layer_name(layer)])
        )
        + 4
    )
    bandwidth, latency = timed.profiles.bandwidth_bps, timed.profiles.latency_s
    expected = latency + 8 * np.array([[up], [down]]) / bandwidth
    np.testing.assert_allclose(record.upload_s, expected[0], rtol=1e-12)
    np.testing.assert_allclose(record.download_s, expected[1], rtol=1e-12)


def test_step_flops_are_xla_cost_analysis():
  flops = clock.step_flops(
      lambda x, w: x @ w,
      lambda b: (
          jax.ShapeDtypeStruct((b, 30), np.float32),
          jax.ShapeDtypeStruct((30, 20), np.float32),
      ),
  )
  assert flops.per_sample == pytest.approx(2 * 30 * 20)
  assert flops.fixed == pytest.approx(0.0, abs=1.0)


def test_calibration_is_measured_once_and_cached(tmp_path):
  first = clock.calibrate((1, 64), str(tmp_path))
  (cached,) = tmp_path.glob("calibration-*.json")
  assert json.loads(cached.read_text())["batch_sizes"] == [1, 64]
  assert first.overhead_s > 0
  assert 0 < first.flops_per_s[0] <= first.flops_per_s[1]
  clock.calibrate.cache_clear()
  assert clock.calibrate((1, 64), str(tmp_path)) == first
