"""Partial participation: sampling, dropouts and deadlines (afl.participation)
in the analytic rounds, the iterative baselines' lanes, the clock and runs."""

import json

import jax
import numpy as np
import pytest

import afl
from afl import analytic
from afl import clock
from afl import data as data_lib
from afl import fedacnnl
from afl import federated
from afl import lanes
from afl import models
from afl import participation
from afl import runtime
from baselines import algorithms
from tests import reference
from tests.test_resume import assert_same_results
from tests.test_resume import interrupt_and_resume

GAMMA = 100.0


@pytest.fixture(scope="module")
def mnist(data_dir):
  """3,000 real MNIST samples, flattened, over 20 Dirichlet(0.5) clients."""
  ds = data_lib.load_mnist(data_dir)
  x = data_lib.preprocess("mnist", ds.x_train[:3000]).reshape(3000, -1)
  y = ds.y_train[:3000]
  clients = data_lib.dirichlet_partition(y, 20, 0.5, seed=0)
  return x, y, clients


def schedule_dropping(dropped, num_clients, rounds):
  """Every client reports in every round but `dropped`, which drop out."""
  schedule = np.full((rounds, num_clients), participation.REPORTS, np.int8)
  schedule[:, dropped] = participation.DROPS
  return schedule


def analytic_run(x, y, clients, model, dropped, groups=None):
  mesh = federated.client_mesh()
  algorithm = fedacnnl.fedacnnl(
      model, num_classes=10, input_shape=x.shape[1:], mesh=mesh, gamma=GAMMA
  )
  order = None if groups is None else np.argsort(groups, kind="stable")
  blocks = federated.shard(
      federated.federate(x, y, clients, 64, num_shards=mesh.size, order=order),
      mesh,
  )
  plan = participation.Plan(
      jax.random.key(0),
      len(clients),
      schedule=schedule_dropping(dropped, len(clients), len(model.stages)),
  )
  return algorithm, analytic.train(
      algorithm, blocks, jax.random.key(0), groups, plan=plan
  )


def test_fedacnnl_without_dropped_clients_equals_centralized_on_the_rest(mnist):
  x, y, clients = mnist
  model = models.mlp(10)
  dropped = [0, 3, 4, 11]
  algorithm, result = analytic_run(x, y, clients, model, dropped)
  kept = np.concatenate([c for i, c in enumerate(clients) if i not in dropped])
  expected = reference.centralized_acnnl(
      model, x[kept], y[kept], algorithm.encodings, GAMMA
  )
  got = reference.solved_weights(model, result.params)
  for g, e in zip(got, expected):
    assert reference.relative_error(g, e) < 1e-5
  # Not vacuous: the dropped clients' data moves the weights.
  everyone = reference.centralized_acnnl(
      model,
      x[np.concatenate(clients)],
      y[np.concatenate(clients)],
      algorithm.encodings,
      GAMMA,
  )
  assert reference.relative_error(got[0], everyone[0]) > 1e-3


def test_group_meta_models_equal_fedacnnl_on_each_groups_reporting_clients(
    mnist,
):
  """pFedACnnL's eq. 11: a group's meta-model is FedACnnL on the group's
  clients that reported; a group of which no client reported has the
  ridge solution of no data (zero weights), and the run says so."""
  x, y, clients = mnist
  model = models.mlp(10)
  groups = np.arange(20) % 3
  dropped = [0, 1, 5, 2, 8, 14, 17, 20 - 1]  # every group loses some
  algorithm, result = analytic_run(x, y, clients, model, dropped, groups)
  for group in range(3):
    kept = np.concatenate(
        [
            c
            for i, c in enumerate(clients)
            if groups[i] == group and i not in dropped
        ]
    )
    expected = reference.centralized_acnnl(
        model, x[kept], y[kept], algorithm.encodings, GAMMA
    )
    got = reference.solved_weights(model, result.params, group)
    for g, e in zip(got, expected):
      assert reference.relative_error(g, e) < 1e-5
  # A whole group silent: zero weights, reported in every round's record.
  silent = np.flatnonzero(groups == 1)
  _, result = analytic_run(x, y, clients, model, silent, groups)
  assert all(r["groups_unreported"] == [1] for r in result.rounds)
  assert not np.any(reference.solved_weights(model, result.params, 1)[0])


def test_a_sampled_round_draws_m_clients_seeded_and_dropouts_among_them():
  plan = participation.Plan(jax.random.key(0), 50, 10, dropout=0.5)
  rounds = [plan.draw(r) for r in range(1, 21)]
  assert all(w.sampled.sum() == 10 for w in rounds)
  assert all(not (w.dropped & ~w.sampled).any() for w in rounds)
  dropped = sum(int(w.dropped.sum()) for w in rounds)
  assert 60 <= dropped <= 140  # 200 sampled, p = 0.5
  assert len({tuple(np.flatnonzero(w.sampled)) for w in rounds}) == 20
  again = participation.Plan(jax.random.key(0), 50, 10, dropout=0.5).draw(7)
  for a, b in zip(again, rounds[6]):
    np.testing.assert_array_equal(a, b)
  other = participation.Plan(jax.random.key(1), 50, 10, dropout=0.5).draw(7)
  assert not np.array_equal(other.sampled, rounds[6].sampled)
  assert participation.num_sampled(0.25, 50) == 12
  assert participation.num_sampled(0, 50) == 50
  for bad, match in ((2.5, "whole number"), (51, "exceeds")):
    with pytest.raises(ValueError, match=match):
      participation.num_sampled(bad, 50)


def test_schedule_files_are_checked(tmp_path):
  good = tmp_path / "trace.csv"
  good.write_text("1,0,2\n1,1,1\n")
  np.testing.assert_array_equal(
      participation.load_schedule(good, 3), [[1, 0, 2], [1, 1, 1]]
  )
  np.save(tmp_path / "trace.npy", np.ones((4, 3)))
  assert participation.load_schedule(tmp_path / "trace.npy", 3).shape == (4, 3)
  for text, match in (
      ("1,0\n", "shape"),
      ("1,0,3\n", "other than"),
      ("1,x,0\n", "not a matrix"),
  ):
    good.write_text(text)
    with pytest.raises(ValueError, match=match):
      participation.load_schedule(good, 3)
  with pytest.raises(ValueError, match="no such file"):
    participation.load_schedule(tmp_path / "none.csv", 3)
  plan = participation.Plan(
      jax.random.key(0), 3, schedule=np.ones((2, 3), np.int8)
  )
  with pytest.raises(ValueError, match="2 rows but the run has 3"):
    plan.check_rounds(3)


# The clock: 3 clients with the same work on 1, 2 and 4 cores.
HOST = clock.HostCalibration((1, 64), (1e9, 1e9), 0.0, "test host")
WORK = clock.ClientWork(
    np.array([64, 64, 64]), np.array([8, 8, 8]), 0.0, 1e7, [0, 0, 0], [0, 0, 0]
)
PROFILES = clock.DeviceProfiles(
    np.array([1, 2, 4]), np.full(3, 1e9), np.zeros(3)
)


def test_clock_round_with_a_dropout_and_a_deadline():
  computation = 64 * 1e7 / 1e9 / np.array([1, 2, 4])  # 0.64, 0.32, 0.16 s
  who = participation.Participation(
      np.array([True, True, True]),
      np.array([False, False, True]),
      np.zeros(3, bool),
  )
  timer = clock.Clock(PROFILES, clock.CostModel(HOST), 8, [64] * 3, True, 0.5)
  record, marked = timer.round(WORK, who)
  # Client 0 arrives at 0.64 s, past the 0.5 s deadline; client 2 drops.
  np.testing.assert_array_equal(marked.late, [True, False, False])
  np.testing.assert_array_equal(marked.reported, [False, True, False])
  timing = timer.rounds[0]
  np.testing.assert_allclose(timing.computation_s, computation)
  # The server waits until the deadline: idle from the one arrival to it.
  assert timing.server_idle_s == pytest.approx(0.5 - computation[1])
  np.testing.assert_allclose(timing.idle_s, [0, 0.5 - computation[1], 0])
  # The late client starts the next round when it is done, the others when
  # the server has closed the round.
  np.testing.assert_allclose(timer.state.start_s, [0.64, 0.5, 0.5])
  # eq. 7 only for the client that reported: the others keep B = 8.
  np.testing.assert_array_equal(timer.batch_size, [8, 8, 8])
  assert record["last_arrival_s"] == pytest.approx(0.64)
  summary = json.loads(json.dumps(timer.summary()))["rounds"][0]
  assert (summary["sampled"], summary["dropped"], summary["late"]) == (
      [0, 1, 2],
      [2],
      [0],
  )
  # Round 2 opens at 0.5 s; client 0, a sit-out, costs nothing.
  who = participation.Participation(
      np.array([False, True, True]), np.zeros(3, bool), np.zeros(3, bool)
  )
  _, marked = timer.round(WORK, who)
  np.testing.assert_array_equal(marked.reported, [False, True, True])
  assert timer.rounds[1].computation_s[0] == 0
  # eq. 7 over the two that reported: intervals 0.32 and 0.16 + 0.16 (its
  # failed round's work is on its busy clock, not in this interval).
  np.testing.assert_array_equal(timer.batch_size, [8, 16, 8])


def test_eq7_only_for_clients_that_reported():
  reported = np.array([True, False, True])
  assert clock.adaptive_batch_size(
      [2.0, 9.0, 6.0], [0.0, 9.0, 0.0], [10, 7, 10], [100] * 3, reported
  ).tolist() == [10, 7, 30]
  assert clock.adaptive_batch_size(
      [2.0, 9.0, 6.0],
      [0.0, 9.0, 0.0],
      [10, 7, 10],
      [100] * 3,
      np.zeros(3, bool),
  ).tolist() == [10, 7, 10]


def sampled_round(sizes, steps, sampled, num_lanes=2):
  return lanes.pad_schedule(
      lanes.make_schedule(
          np.where(sampled, sizes, 0),
          4,
          steps,
          num_shards=1,
          num_lanes=num_lanes,
      )
  )


@pytest.mark.parametrize("name", ["fedavg", "pfedme"])
def test_lanes_of_a_partial_round_equal_the_loop_and_ignore_dropouts(name):
  """Sampled clients train, reported ones count: the lanes equal the loop;
  the upload is that of the reporting clients alone (a dropped client's
  work never arrives) and clients that sit out keep their personal
  models."""
  x, y, indices = tiny_federation()
  model = models.get_model("lr", 3)
  params = models.init_params(model, jax.random.key(1), (6,))
  local = dict(
      fedavg=lambda: algorithms.fedavg(model.apply, 0.1),
      pfedme=lambda: algorithms.pfedme(model.apply, 0.05, 0.05, 15.0, 5, 1.0),
  )[name]().local
  steps = 4 if name == "pfedme" else 0
  data = lanes.client_data(x, y, indices)
  sizes = np.asarray(data.size)
  full = lanes.make_schedule(sizes, 4, steps, num_shards=1, num_lanes=2)
  mesh = federated.client_mesh(jax.devices()[:1])
  fast = lanes.round_fn(local, full, sizes, mesh)
  slow = lanes.loop_round(local, full, sizes)
  sampled = np.array([True, True, False, False, True, True, False])
  reported = sampled & np.array([True, False, True, True, True, True, True])
  previous = None
  if local.personal is not None:
    previous = jax.tree.map(
        lambda a: a + np.arange(7.0).reshape((7,) + (1,) * a.ndim), params
    )
  key = jax.random.key(3)
  weights = np.where(reported, sizes, 0)
  args = (params, data, key, sampled_round(sizes, steps, sampled), weights)
  a, b = fast(*args, previous), slow(*args, previous)
  close = lambda u, v: np.testing.assert_allclose(u, v, rtol=2e-4, atol=2e-5)
  jax.tree.map(close, a.upload, b.upload)
  only = fast(params, data, key, sampled_round(sizes, steps, reported), weights)
  jax.tree.map(close, a.upload, only.upload)
  if previous is not None:
    jax.tree.map(close, a.personal, b.personal)
    for c in np.flatnonzero(~sampled):  # sat out: kept
      jax.tree.map(
          lambda u, v: np.testing.assert_array_equal(u[c], v[c]),
          a.personal,
          previous,
      )
    for c in np.flatnonzero(sampled & (sizes > 0)):  # trained: moved
      assert not np.allclose(
          a.personal["params"]["layer_0"]["kernel"][c],
          previous["params"]["layer_0"]["kernel"][c],
      )


def tiny_federation():
  """7 uneven clients (one empty) of a separable 3-class problem."""
  rng = np.random.default_rng(0)
  sizes = np.array([2, 40, 7, 0, 23, 11, 31])
  centers = rng.normal(size=(3, 6)) * 3
  y = rng.integers(0, 3, sizes.sum()).astype(np.int32)
  x = (centers[y] + rng.normal(size=(len(y), 6))).astype(np.float32)
  bounds = np.concatenate([[0], np.cumsum(sizes)])
  return x, y, [np.arange(bounds[i], bounds[i + 1]) for i in range(7)]


def test_a_partial_run_records_who_took_part_and_resumes_exactly(
    tmp_path, monkeypatch
):
  config = afl.get_config(
      algorithm="pfedme",
      num_clients=10,
      model="lr",
      rounds=6,
      local_steps=2,
      clients_per_round=4,
      dropout=0.25,
      checkpoint_every=1,
  )
  whole = afl.train_and_evaluate(config, tmp_path / "whole", progress=False)
  records = whole["rounds"]
  assert all(r["sampled"] == 4 for r in records)
  assert sum(r["dropped"] for r in records) > 0
  section = whole["participation"]
  assert sum(section["sampled_per_client"]) == 24
  assert sum(section["reported_per_client"]) == sum(
      r["reported"] for r in records
  )
  timing_rounds = whole["timing"]["rounds"]
  assert [t["sampled"] for t in timing_rounds] == [
      r["participation"]["sampled"] for r in records
  ]
  resumed = interrupt_and_resume(config, tmp_path / "part", 3, monkeypatch)
  assert resumed["resumed_after_round"] == 3
  assert resumed["participation"] == section
  assert_same_results(tmp_path / "part", tmp_path / "whole")


def test_participation_settings_that_cannot_apply_are_refused(tmp_path):
  for settings, match in (
      (dict(algorithm="persafl", dropout=0.1), "asynchronous"),
      (dict(clients_per_round=11), "exceeds"),
      (
          dict(clients_per_round=3, participation_file=str(tmp_path / "t.csv")),
          "no such file",
      ),
  ):
    config = afl.get_config(num_clients=10, **settings)
    with pytest.raises(ValueError, match=match):
      runtime.prepare(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()
  (tmp_path / "t.csv").write_text("1 1 1\n")
  config = afl.get_config(
      num_clients=3, dropout=0.1, participation_file=str(tmp_path / "t.csv")
  )
  with pytest.raises(ValueError, match="replaces"):
    runtime.prepare(config, tmp_path / "out")
