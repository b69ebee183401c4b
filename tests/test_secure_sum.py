"""Secure sum of the analytic statistics (afl.secure_sum): masks cancel,
decoded sums equal the float64 sums within the quantization bound, dropped
clients are recovered from Shamir shares, a masked upload looks uniform,
and FedACnnL / pFedACnnL with the secure sum equal their plain runs."""

import itertools
import json

from Crypto.Protocol.SecretSharing import Shamir
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats

import afl
from afl import analytic
from afl import catalog
from afl import editing
from afl import fedacnnl
from afl import federated
from afl import models
from afl import participation
from afl import runtime
from afl import secure_sum
from afl import statistics
from tests.test_participation import schedule_dropping
from tests.test_pfedacnnl import mnist  # noqa: F401  (a fixture)
from tests.test_resume import assert_same_results
from tests.test_resume import interrupt_and_resume

EPS64 = 2.0**-52


def client_data(num_clients=12, width=6, num_classes=3, seed=0):
  """Per-client rows in [0, 1) and labels; their Statistics [C] float64."""
  rng = np.random.default_rng(seed)
  rows = [
      rng.uniform(0, 1, (rng.integers(5, 30), width))
      for _ in range(num_clients)
  ]
  labels = [rng.integers(0, num_classes, len(r)) for r in rows]
  per_client = [
      statistics.Statistics(
          r.T @ r, r.T @ np.eye(num_classes)[y], np.eye(num_classes)[y].sum(0)
      )
      for r, y in zip(rows, labels)
  ]
  stacked = jax.tree.map(lambda *a: np.stack(a), *per_client)
  return stacked, sum(len(r) for r in rows)


def uploads_of(stacked):
  """client_uploads for `SecureSum.aggregate` from Statistics [C]."""

  def fn(clients, args):
    present = clients >= 0
    stats = jax.tree.map(
        lambda a: jnp.asarray(
            np.where(
                present.reshape((-1,) + (1,) * (a.ndim - 1)),
                a[np.maximum(clients, 0)],
                0.0,
            )
        ),
        stacked,
    )
    return secure_sum.masked_uploads(stats, *args)

  return fn


def one_group(seed, num_clients):
  """SecureSum of one group, k = 4 neighbours, threshold 3."""
  return secure_sum.SecureSum(
      jax.random.key(seed),
      np.zeros(num_clients, np.int32),
      input_bound=1.0,
      neighbours=4,
      threshold=3,
  )


def assert_sums_within_bound(got, stacked, groups, reported, encoding):
  """Decoded group sums == float64 sums of the reporting clients, within
  the quantization bound (plus float64's rounding of the sums)."""
  num_reported = int(reported.sum())
  for field, got_field, bound in zip(
      stacked, got, encoding.quantization_bound(num_reported)
  ):
    for k in range(int(groups.max()) + 1):
      members = (groups == k) & reported
      plain = field[members].sum(0)
      size = np.abs(field[members]).sum(0)
      error = np.abs(np.asarray(got_field)[k] - plain)
      assert (error <= bound + 4 * num_reported * EPS64 * size).all()


def test_masks_cancel_and_decoded_sums_are_the_plain_sums():
  stacked, rows = client_data()
  groups = np.array([0] * 7 + [1] * 5)
  protocol = secure_sum.SecureSum(
      jax.random.key(0), groups, input_bound=1.0, neighbours=4
  )
  encoding = secure_sum.encoding_for(1.0, rows)
  width, classes = stacked.label_sums.shape[1:]
  sums, record = protocol.aggregate(
      1, uploads_of(stacked), encoding, width, classes
  )
  assert_sums_within_bound(sums, stacked, groups, np.ones(12, bool), encoding)
  assert record["secure_sum_recovered"] == []
  # Counts are integers: exact.
  np.testing.assert_array_equal(
      np.asarray(sums.label_counts)[0], stacked.label_counts[:7].sum(0)
  )
  # Masks cancel only in the sum: the pairwise masks of a group add to 0.
  seeds, signs = protocol._client_masks([bytes(16)] * 12, np.ones(12, bool))
  pairwise = np.asarray(
      secure_sum.mask_total(seeds[:, 1:], signs[:, 1:], 3, np.zeros(64))
  )
  assert (pairwise != 0).all()
  for k in range(2):
    total = pairwise[groups == k].sum(0, dtype=np.uint64)
    np.testing.assert_array_equal(total, 0)


def test_dropouts_below_the_threshold_are_recovered_and_still_exact(
    monkeypatch,
):
  stacked, rows = client_data(num_clients=16)
  width, classes = stacked.label_sums.shape[1:]
  # Uploads in chunks of 5 clients, the last one padded.
  upload_bytes = 8 * secure_sum.upload_size(width, classes)
  monkeypatch.setattr(secure_sum, "CHUNK_BYTES", 5 * upload_bytes)
  groups = np.zeros(16, np.int32)
  protocol = secure_sum.SecureSum(
      jax.random.key(1), groups, input_bound=1.0, neighbours=6, threshold=3
  )
  encoding = secure_sum.encoding_for(1.0, rows)
  first_key = secure_sum._private_bytes(protocol._private[2])
  sampled = np.ones(16, bool)
  sampled[15] = False  # sits out: masks with no one
  for counter, dropped in ((1, [2, 9]), (2, [2, 5, 11])):
    reported = sampled.copy()
    reported[dropped] = False
    sums, record = protocol.aggregate(
        counter,
        uploads_of(stacked),
        encoding,
        width,
        classes,
        sampled,
        reported,
    )
    assert record["secure_sum_recovered"] == dropped
    assert_sums_within_bound(sums, stacked, groups, reported, encoding)
  # Client 2's private key was rebuilt in round 1: it re-keyed since, and
  # round 2 rebuilt its new one.
  assert protocol.recovered == [2, 9, 2, 5, 11]
  assert secure_sum._private_bytes(protocol._private[2]) != first_key


def test_too_many_dropouts_are_a_clear_error_naming_the_clients():
  stacked, rows = client_data(num_clients=10)
  protocol = one_group(2, 10)
  reported = np.ones(10, bool)
  # Two of client 0's four neighbours drop: it has 2 < 3 shares left.
  reported[protocol.graph[0][:2]] = False
  width, classes = stacked.label_sums.shape[1:]
  with pytest.raises(
      secure_sum.RecoveryError, match="round 1: .* client 0 needs 3"
  ):
    protocol.aggregate(
        1,
        uploads_of(stacked),
        secure_sum.encoding_for(1.0, rows),
        width,
        classes,
        reported=reported,
    )


def test_shamir_rebuilds_a_key_from_any_t_shares_only():
  protocol = one_group(3, 8)
  secret = secure_sum._private_bytes(protocol._private[0])
  halves = protocol._key_shares[0]
  for chosen in itertools.combinations(range(4), 3):
    rebuilt = b"".join(
        Shamir.combine([half[p] for p in chosen]) for half in halves
    )
    assert rebuilt == secret
  fewer = b"".join(Shamir.combine([half[p] for p in (0, 1)]) for half in halves)
  assert fewer != secret


def test_a_masked_upload_is_uniform_over_the_ring_whatever_the_data():
  """Chi-square of the top 4 bits of one client's masked upload: zero
  statistics and large ones give the same uniform histogram."""
  stacked, rows = client_data(num_clients=6, width=40)
  protocol = secure_sum.SecureSum(
      jax.random.key(4), np.zeros(6, np.int32), input_bound=1.0
  )
  encoding = secure_sum.encoding_for(1.0, rows)
  seeds, signs = protocol._client_masks(
      [bytes(range(16))] * 6, np.ones(6, bool)
  )
  zeros = jax.tree.map(np.zeros_like, stacked)
  for data in (zeros, stacked):
    upload = np.asarray(
        secure_sum.masked_uploads(
            jax.tree.map(lambda a: jnp.asarray(a[:1]), data),
            np.zeros(1, np.int32),
            seeds[:1],
            signs[:1],
            1,
            encoding.scales,
            jax.random.key(0),
            None,
        )
    )[0]
    encoded = np.asarray(
        secure_sum.encode(jax.tree.map(lambda a: a[:1], data), encoding.scales)
    )[0]
    histogram = np.bincount((upload >> np.uint64(60)).astype(int), minlength=16)
    assert scipy_stats.chisquare(histogram).pvalue > 1e-3
    if data is stacked:  # the data itself is far from uniform
      raw = np.bincount((encoded >> np.uint64(60)).astype(int), minlength=16)
      assert scipy_stats.chisquare(raw).pvalue < 1e-6


@pytest.mark.parametrize("grouped", [False, True])
def test_fedacnnl_with_secure_sum_equals_plain_within_the_bound(
    mnist, grouped, monkeypatch  # noqa: F811
):
  """FedACnnL (one group) and pFedACnnL's group meta-models (three groups),
  with two clients dropping out of every round; the first layer's uploads
  in passes of 5 clients."""
  monkeypatch.setattr(
      secure_sum, "CHUNK_BYTES", 5 * 8 * secure_sum.upload_size(784, 10)
  )
  x, y, clients = mnist
  model = models.mlp(10, hidden=(16,))
  mesh = federated.client_mesh()
  algorithm = fedacnnl.fedacnnl(
      model,
      num_classes=10,
      input_shape=x.shape[1:],
      mesh=mesh,
      statistics_dtype=jnp.float64,
  )
  groups = np.arange(12, dtype=np.int32) % 3 if grouped else None
  order = None if groups is None else np.argsort(groups, kind="stable")
  blocks = federated.shard(
      federated.federate(x, y, clients, 64, num_shards=mesh.size, order=order),
      mesh,
  )

  def run(secure):
    plan = participation.Plan(
        jax.random.key(0), 12, schedule=schedule_dropping([1, 6], 12, 2)
    )
    return analytic.train(
        algorithm, blocks, jax.random.key(0), groups, plan=plan, secure=secure
    )

  plain = run(None)
  protocol = secure_sum.SecureSum(
      jax.random.key(5),
      np.zeros(12, np.int32) if groups is None else groups,
      input_bound=1.0,
  )
  secured = run(protocol)
  assert [r["secure_sum_recovered"] for r in secured.rounds] == [[1, 6]] * 2
  for p, s in zip(
      jax.tree.leaves(plain.params), jax.tree.leaves(secured.params)
  ):
    p, s = np.asarray(p, np.float64), np.asarray(s, np.float64)
    # Statistics within ~1e-12 relative; the solve's conditioning (~1e4)
    # and float32 weights leave float32's rounding.
    assert np.abs(p - s).max() <= 1e-6 * np.abs(p).max()
  # Not vacuous: the second layer's scale follows the first's weights.
  first, second = (r["secure_sum_row_bound"] for r in secured.rounds)
  assert first == pytest.approx(1.001) and second > first


def test_a_run_with_secure_sum_and_dropout_writes_its_section_and_resumes(
    tmp_path, monkeypatch
):
  """Masks cancel exactly in the ring, so a resumed run (fresh keys after
  the checkpoint) gives the uninterrupted run's weights bit for bit."""
  config = afl.get_config(
      algorithm="fedacnnl",
      dataset="synthetic",
      model="mlp",
      num_clients=8,
      dropout=0.15,
      secure_sum=True,
      secure_sum_bound=1e3,
      secure_sum_neighbours=4,
      secure_sum_threshold=2,
      checkpoint_every=1,
  )
  results = afl.train_and_evaluate(config, tmp_path / "run", progress=False)
  section = results["secure_sum"]
  assert section["ring_bits"] == 64 and section["neighbours"] == 4
  assert section["threshold"] == 2
  assert len(section["rounds"]) == 3  # mlp: three layers
  dropped = sorted(
      {c for r in results["rounds"] for c in r["participation"]["dropped"]}
  )
  assert dropped and section["recovered_clients"] == dropped
  assert section["upload_bytes_per_client"]["statistics"] > 0
  saved = json.loads((tmp_path / "run" / "results.json").read_text())
  assert saved["secure_sum"]["recovered_clients"] == dropped
  resumed = interrupt_and_resume(config, tmp_path / "part", 1, monkeypatch)
  assert resumed["resumed_after_round"] == 1
  assert_same_results(tmp_path / "part", tmp_path / "run")


def test_pfedacnnl_runs_with_secure_sum_as_without(tmp_path):
  """K-means groups (some of one client, which holds its own shares), group
  sums, then personalization: every client's accuracy as without."""
  settings = dict(
      algorithm="pfedacnnl",
      dataset="synthetic",
      model="mlp",
      num_clients=10,
      num_groups=4,
      statistics_dtype="float64",
  )
  plain = afl.train_and_evaluate(
      afl.get_config(**settings), tmp_path / "plain", progress=False
  )
  secured = afl.train_and_evaluate(
      afl.get_config(**settings, secure_sum=True, secure_sum_bound=1e3),
      tmp_path / "secure",
      progress=False,
  )
  assert secured["per_client_accuracy"] == plain["per_client_accuracy"]
  assert len(secured["secure_sum"]["rounds"]) == 3  # the federated rounds
  with pytest.raises(ValueError, match="ran with --secure_sum"):
    editing.load(tmp_path / "secure")


@pytest.mark.parametrize(
    "settings, match",
    [
        (
            dict(algorithm="fedacnnl", dataset="synthetic", secure_sum=True),
            "secure_sum_bound",
        ),
        (
            dict(algorithm="fedacnnl", secure_sum_neighbours=4),
            "only with --secure_sum",
        ),
        (
            dict(
                algorithm="fedacnnl",
                dataset="mnist",
                secure_sum=True,
                clients_per_round=3,
            ),
            "clients_per_round",
        ),
        (dict(algorithm="fedavg", secure_sum=True), "does not apply"),
        (
            dict(
                algorithm="fedacnnl",
                dataset="synthetic",
                secure_sum=True,
                secure_sum_bound=0.01,
            ),
            "exceeded by",
        ),
    ],
)
def test_settings_that_cannot_apply_are_refused(tmp_path, settings, match):
  import baselines  # noqa: F401  (declares fedavg)

  with pytest.raises(ValueError, match=match):
    config = afl.get_config(num_clients=10, **settings)
    runtime.prepare(config, tmp_path / "out")
  assert not (tmp_path / "out").exists()


def test_the_catalog_knows_the_datasets_with_an_input_bound():
  assert set(catalog.BOUNDED_DATASETS) == set(secure_sum.DATA_BOUNDS)
  assert secure_sum.DATA_BOUNDS["cifar10"] == pytest.approx(2.1256, abs=1e-3)


def test_noise_shares_added_before_masking_sum_to_the_calibrated_std():
  """Distributed DP through the secure sum: each client adds N(0, s_i^2)
  to its statistics before they are encoded and masked (`privatize`); the
  decoded group sum less the plain sum is then N(0, sum_i s_i^2) on every
  released entry (the gram's upper triangle mirrored), within the bound."""
  from tests.test_privacy import chi_square_agrees  # pylint: disable=g-import-not-at-top

  stacked, rows = client_data(num_clients=12, width=20)
  width, classes = stacked.label_sums.shape[1:]
  groups = np.zeros(12, np.int32)
  stds = np.full(12, 0.5 / np.sqrt(12))  # shares of std 0.5 for the sum
  encoding = secure_sum.encoding_for(
      1.0, rows, secure_sum.NOISE_TAILS * stds.sum()
  )
  protocol = secure_sum.SecureSum(
      jax.random.key(7), groups, input_bound=1.0, neighbours=4
  )
  sums, _ = protocol.aggregate(
      1, uploads_of(stacked), encoding, width, classes, stds=stds
  )
  noise = jax.tree.map(
      lambda got, f: np.asarray(got)[0] - f.sum(0), sums, stacked
  )
  np.testing.assert_array_equal(noise.gram, noise.gram.T)  # symmetric
  released = np.concatenate(
      [
          noise.gram[np.triu_indices(width)],
          noise.label_sums.ravel(),
          noise.label_counts,
      ]
  )
  assert chi_square_agrees(released / 0.5)
  assert not chi_square_agrees(released / 0.25)  # the test can tell
