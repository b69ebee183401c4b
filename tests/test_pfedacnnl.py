"""pFedACnnL: grouping, group meta-models and personalization (section IV)."""

import functools

import jax
import numpy as np
import pytest

from afl import analytic
from afl import data as data_lib
from afl import fedacnnl
from afl import federated
from afl import models
from afl import pfedacnnl
from afl import solve
from tests import reference

GAMMA, EPS = 100.0, 2500.0


@pytest.fixture(scope="module")
def mnist(data_dir):
  """3,000 real MNIST samples over 12 Dirichlet(0.3) clients."""
  ds = data_lib.load_mnist(data_dir)
  x = data_lib.preprocess("mnist", ds.x_train[:3000]).reshape(3000, -1)
  y = ds.y_train[:3000]
  return x, y, data_lib.dirichlet_partition(y, 12, 0.3, seed=1)


@pytest.fixture(scope="module")
def synthetic():
  x, y, clients = data_lib.synthetic(0.5, 0.5, num_clients=6, seed=2)
  return x, y, clients


@functools.lru_cache
def algorithm_for(model, input_shape):
  """One algorithm per model: its compiled rounds serve every test whose
  data has the same shapes (compiling is most of these tests' time)."""
  return fedacnnl.fedacnnl(
      model,
      num_classes=10,
      input_shape=input_shape,
      mesh=federated.client_mesh(),
      gamma=GAMMA,
      statistics_dtype="float64",
  )


def build(model, x, groups=None):
  order = None if groups is None else np.argsort(groups, kind="stable")
  return algorithm_for(model, x.shape[1:]), federated.client_mesh(), order


def blocks(x, y, clients, mesh, order=None):
  return federated.shard(
      federated.federate(x, y, clients, 16, num_shards=mesh.size, order=order),
      mesh,
  )


def test_personalization_matches_a_per_client_float64_reference(mnist):
  x, y, clients = mnist
  model = models.mlp(10)
  counts = data_lib.client_label_histograms(clients, y, 10)
  algorithm, mesh, _ = build(model, x)
  groups, _ = pfedacnnl.assign_groups(counts, algorithm, 3, seed=0)
  data = blocks(x, y, clients, mesh, np.argsort(groups, kind="stable"))
  result = analytic.train(
      algorithm, data, jax.random.key(0), groups, eps=EPS, personalized=True
  )
  assert result.params["params"]["layer_0"]["kernel"].shape[0] == 12
  for k in range(3):  # meta-models: centralized ACnnL on each group (eq. 11)
    members = np.concatenate([clients[i] for i in np.flatnonzero(groups == k)])
    meta = reference.centralized_acnnl(
        model, x[members], y[members], algorithm.encodings, GAMMA
    )
    for i in np.flatnonzero(groups == k):
      expected = reference.centralized_acnnl(
          model,
          x[clients[i]],
          y[clients[i]],
          algorithm.encodings,
          EPS,
          priors=meta,
      )
      for got, want in zip(
          reference.solved_weights(model, result.params, i), expected
      ):
        assert reference.relative_error(got, want) < 1e-5


def test_group_meta_models_equal_fedacnnl_on_each_group_alone(mnist):
  x, y, clients = mnist
  model = models.mlp(10)
  groups = np.arange(len(clients)) % 3
  algorithm, mesh, order = build(model, x, groups)
  meta = analytic.train(
      algorithm,
      blocks(x, y, clients, mesh, order),
      jax.random.key(0),
      groups,
      personalized=False,
  )
  np.testing.assert_array_equal(meta.client_model, groups)
  for k in range(3):
    alone = [clients[i] for i in np.flatnonzero(groups == k)]
    single = analytic.train(
        algorithm, blocks(x, y, alone, mesh), jax.random.key(0)
    )
    for got, want in zip(
        reference.solved_weights(model, meta.params, k),
        reference.solved_weights(model, single.params, 0),
    ):
      assert reference.relative_error(got, want) < 1e-6  # float32 params


def test_huge_eps_gives_the_meta_model_and_tiny_eps_the_local_fit(synthetic):
  x, y, clients = synthetic
  model = models.logistic_regression(10)
  groups = np.zeros(len(clients), np.int32)
  algorithm, mesh, _ = build(model, x)
  data = blocks(x, y, clients, mesh)
  meta = analytic.train(
      algorithm, data, jax.random.key(0), groups, personalized=False
  )
  near_meta = analytic.train(
      algorithm,
      data,
      jax.random.key(0),
      groups,
      eps=1e12,
      personalized=True,
  )
  with pytest.warns(solve.ConditioningWarning):  # bound about 7e11
    local = analytic.train(
        algorithm, data, jax.random.key(0), groups, eps=1e-6, personalized=True
    )
  for i, c in enumerate(clients):
    assert (
        reference.relative_error(
            reference.solved_weights(model, near_meta.params, i)[0],
            reference.solved_weights(model, meta.params, 0)[0],
        )
        < 1e-6
    )
    rows = np.c_[x[c], np.ones(len(c))].astype(np.float64)
    least_squares = np.linalg.lstsq(rows, np.eye(10)[y[c]], rcond=None)[0]
    assert (
        reference.relative_error(
            reference.solved_weights(model, local.params, i)[0], least_squares
        )
        < 1e-4
    )


def test_one_group_is_the_wc_variant(mnist):
  x, y, clients = mnist
  model = models.mlp(10)
  counts = data_lib.client_label_histograms(clients, y, 10)
  algorithm, mesh, _ = build(model, x)
  groups, _ = pfedacnnl.assign_groups(counts, algorithm, 1, seed=0)
  np.testing.assert_array_equal(groups, 0)
  data = blocks(x, y, clients, mesh)
  one_group = analytic.train(
      algorithm, data, jax.random.key(0), groups, personalized=True
  )
  wc = analytic.train(
      algorithm,
      data,
      jax.random.key(1),
      np.zeros(len(clients), np.int32),
      personalized=True,
  )
  for i in range(len(clients)):
    for got, want in zip(
        reference.solved_weights(model, one_group.params, i),
        reference.solved_weights(model, wc.params, i),
    ):
      assert reference.relative_error(got, want) <= 1e-12


def test_clustering_is_seeded_and_groups_identical_distributions():
  base = np.array([[50, 0, 0, 5], [0, 40, 10, 0], [3, 3, 3, 30]])
  kind = np.array([0, 1, 2, 1, 0, 2, 2, 1, 0, 0])
  counts = base[kind] * (1 + np.arange(len(kind)))[:, None]  # sizes differ
  q = np.random.default_rng(0).standard_normal((4, 8))
  vectors = pfedacnnl.encoded_label_vectors(counts, q)
  groups = pfedacnnl.group_clients(vectors, 3, seed=5)
  np.testing.assert_array_equal(groups, kind)  # numbered by first appearance
  np.testing.assert_array_equal(
      pfedacnnl.group_clients(vectors, 3, seed=5), groups
  )


def test_encoded_vectors_follow_eq_9_and_lr_uses_the_label_distribution():
  counts = np.array([[2, 0, 6], [0, 0, 0], [1, 1, 1]])
  q = np.arange(6.0).reshape(3, 2)
  np.testing.assert_allclose(
      pfedacnnl.encoded_label_vectors(counts, q),
      [[0.25 * q[0] + 0.75 * q[2]][0], [0, 0], q.mean(0)],
  )
  mesh = federated.client_mesh()
  lr = fedacnnl.fedacnnl(
      models.logistic_regression(3), num_classes=3, input_shape=(5,), mesh=mesh
  )
  groups, _ = pfedacnnl.assign_groups(
      np.array([[4, 0, 0], [0, 3, 0], [8, 0, 0]]), lr, 2, seed=0
  )
  np.testing.assert_array_equal(groups, [0, 1, 0])


def test_bad_settings_are_rejected(synthetic):
  x, y, clients = synthetic
  with pytest.raises(ValueError, match="num_groups"):
    pfedacnnl.group_clients(np.zeros((4, 2)), 5, seed=0)
  model = models.logistic_regression(10)
  algorithm, mesh, _ = build(model, x)
  with pytest.raises(ValueError, match="eps"):
    analytic.train(
        algorithm,
        blocks(x, y, clients, mesh),
        jax.random.key(0),
        np.zeros(len(clients), np.int32),
        eps=0.0,
        personalized=True,
    )


def test_small_clients_dual_form_equals_their_primal_solve(mnist):
  """eq. 13 through X X^T for clients of at most d / 2 rows equals the
  d x d solve, on every layer, with clients straddling devices."""
  x, y, _ = mnist
  sizes = [300, 40, 20, 500, 90, 10, 130, 60, 700, 50, 5, 400, 30]
  clients = np.split(np.arange(sum(sizes)), np.cumsum(sizes)[:-1])
  model = models.mlp(10)
  mesh = federated.client_mesh()  # 8 devices
  data = federated.shard(
      federated.federate(x, y, clients, 16, num_shards=mesh.size), mesh
  )
  groups = np.zeros(len(clients), np.int32)
  algorithm, _, _ = build(model, x)
  meta = analytic.train(algorithm, data, jax.random.key(0), groups)
  params = algorithm.factored(tuple(s[groups] for s in meta.solutions))
  solved = [  # dual where it fits; never
      [
          algorithm.solve(
              layer,
              params,
              data,
              data.client,
              data.client,
              len(clients),
              EPS,
              meta.solutions[layer][groups],
              dual=dual,
          ).solution
          for layer in range(algorithm.num_layers)
      ]
      for dual in (True, False)
  ]
  for dual, primal in zip(*solved):
    # Both are mixed-precision solves (float32 factorizations refined once).
    assert reference.relative_error(dual, primal) < 1e-7
  # Some clients did take the dual form: at most 8 blocks of 16 rows on the
  # first layer (d = 785), inside one device.
  taken = jax.jit(federated.segment_apply, static_argnums=(0, 5, 6, 7))(
      lambda p, x, y, m, s, a: m.sum(),
      params,
      data,
      data.client,
      data.client,
      len(clients),
      mesh,
      8,
  )[0]
  assert 0 < int((taken > 0).sum()) < len(clients)


def test_each_round_from_layer_l_tests_a_complete_model(tmp_path):
  """From round L on a pFedACnnL run tests the model of the round (Fig. 6):
  at round L its group meta-models, which are pFedACnnL-WP's final model;
  then every personalization round's; the run reports the final model's
  accuracy (the paper's protocol), not the best round's."""
  import afl  # pylint: disable=g-import-not-at-top

  settings = dict(dataset="synthetic", model="mlp", num_clients=8, seed=3)
  runs = {
      name: afl.train_and_evaluate(
          afl.get_config(algorithm=name, num_groups=2, **settings),
          tmp_path / name,
          progress=False,
      )
      for name in ("pfedacnnl", "pfedacnnl_wp")
  }
  per_round = runs["pfedacnnl"]["accuracy_per_round"]
  layers = len(runs["pfedacnnl_wp"]["accuracy_per_round"])
  assert len(per_round) == 2 * layers
  assert per_round[: layers - 1] == [None] * (layers - 1)
  assert per_round[layers - 1] == runs["pfedacnnl_wp"]["accuracy"]
  assert None not in per_round[layers:]
  assert runs["pfedacnnl"]["accuracy"] == per_round[-1]
  assert runs["pfedacnnl"]["best_accuracy"] == max(per_round[layers - 1 :])
