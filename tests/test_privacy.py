"""Differential privacy (afl.privacy): calibration against the accountant,
epsilon = inf is the non-private run, the noise has the calibrated std,
indefinite noisy statistics are solved, personalization releases nothing,
DP-FedAvg clips, bad settings are refused."""

import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats

import afl
from afl import analytic
from afl import config as config_lib
from afl import editing
from afl import fedacnnl
from afl import federated
from afl import lanes
from afl import layers
from afl import models
from afl import privacy
from afl import runtime
from afl import solve
from afl import statistics
from baselines import algorithms
from tests.test_resume import assert_same_results
from tests.test_resume import interrupt_and_resume

DELTA = 1e-5
# A chi-square statistic outside its two-sided 1e-6 interval fails.
TAIL = 1e-6


def chi_square_agrees(standardized: np.ndarray) -> bool:
  """Whether sum z^2 of n draws that should be N(0, 1) is within the
  chi-square(n) distribution's central 1 - TAIL."""
  n = standardized.size
  statistic = float(np.sum(np.square(standardized)))
  low, high = scipy_stats.chi2.ppf([TAIL / 2, 1 - TAIL / 2], n)
  return low < statistic < high


@pytest.mark.parametrize("releases, epsilon", [(1, 1.0), (4, 2.0), (20, 4.0)])
def test_the_calibrated_noise_multiplier_reproduces_the_target_epsilon(
    releases, epsilon
):
  z = privacy.calibrate(epsilon, DELTA, releases)
  accountant = dp_accounting.pld.PLDAccountant()
  accountant.compose(
      dp_accounting.SelfComposedDpEvent(
          dp_accounting.GaussianDpEvent(z), releases
      )
  )
  assert accountant.get_epsilon(DELTA) == pytest.approx(epsilon, rel=1e-3)
  # The least such z: 1% less noise spends more than the target.
  assert privacy.epsilon_spent(0.99 * z, releases, DELTA) > epsilon
  # k Gaussians of multiplier z are one of z / sqrt(k) (exact).
  assert dp_accounting.get_epsilon_gaussian(
      z / math.sqrt(releases), DELTA
  ) == pytest.approx(epsilon, rel=1e-3)


def _small(**settings):
  return afl.get_config(num_clients=8, model="mlp", **settings)


@pytest.mark.parametrize(
    "algorithm, extra",
    [
        ("fedacnnl", {}),
        ("pfedacnnl", {"num_groups": 3}),
        ("fedavg", {"rounds": 2, "model": "lr"}),
    ],
)
def test_infinite_epsilon_gives_exactly_the_non_private_run(
    algorithm, extra, tmp_path
):
  settings = dict(dict(model="mlp", num_clients=8), **extra)
  plain = afl.get_config(algorithm=algorithm, **settings)
  private = afl.get_config(
      algorithm=algorithm,
      dp_mode="local",
      dp_epsilon=math.inf,
      dp_clip=0.5,  # would change the weights if rows were clipped
      **settings,
  )
  a = afl.train_and_evaluate(plain, tmp_path / "plain", progress=False)
  b = afl.train_and_evaluate(private, tmp_path / "inf", progress=False)
  assert_same_results(tmp_path / "plain", tmp_path / "inf")
  assert a["privacy"]["mode"] == "off"
  assert b["privacy"]["noise_multiplier"] == 0.0
  assert b["privacy"]["epsilon_spent"] == math.inf


def _federation(num_clients=6, features=12, seed=0):
  """Blocks of a separable 3-class problem over `num_clients` clients."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 3, 40 * num_clients).astype(np.int32)
  x = rng.normal(size=(3, features))[y] * 2 + rng.normal(
      size=(len(y), features)
  )
  x = x.astype(np.float32)
  clients = np.array_split(np.arange(len(y)), num_clients)
  mesh = federated.client_mesh()
  blocks = federated.shard(
      federated.federate(x, y, clients, 16, num_shards=mesh.size), mesh
  )
  return x, y, clients, mesh, blocks


def test_the_noise_added_has_the_calibrated_std():
  key = jax.random.key(0)
  # add_noise on zero statistics: the noise itself, per segment std.
  zeros = statistics.Statistics(
      jnp.zeros((2, 150, 150)), jnp.zeros((2, 150, 10)), jnp.zeros((2, 10))
  )
  std = np.array([3.0, 0.25])
  noisy = privacy.add_noise(key, zeros, std)
  gram = np.asarray(noisy.gram)
  np.testing.assert_array_equal(gram, np.swapaxes(gram, 1, 2))  # symmetric
  upper = np.triu_indices(150)
  for s in range(2):
    assert chi_square_agrees(gram[s][upper] / std[s])
    assert chi_square_agrees(np.asarray(noisy.label_sums[s]) / std[s])
  # Distributed shares: n clients' N(0, s^2 / n) sum to N(0, s^2).
  n, total = 16, 2.0
  shares = privacy.add_noise(
      jax.random.key(1),
      statistics.Statistics(
          jnp.zeros((n, 60, 60)), jnp.zeros((n, 60, 10)), jnp.zeros((n, 10))
      ),
      privacy.share_std(total, n, "distributed"),
  )
  assert chi_square_agrees(
      np.asarray(shares.gram.sum(0))[np.triu_indices(60)] / total
  )
  assert privacy.sum_std(total, [n], "distributed")[0] == total
  assert privacy.sum_std(total, [n], "local")[0] == total * 4


@pytest.mark.parametrize("mode", ["local", "distributed"])
def test_a_private_round_adds_the_calibrated_noise_to_the_sums(mode):
  """End to end: round 1's noisy sums (the server's kept state) less the
  exact sums of the clipped rows are N(0, sum_std^2) entry by entry."""
  x, _, clients, mesh, blocks = _federation()
  clip = 3.0  # clips most rows (norms about 5)
  model = models.logistic_regression(3).clone(row_clip=clip)
  algorithm = fedacnnl.fedacnnl(
      model, num_classes=3, input_shape=x.shape[1:], mesh=mesh
  )
  private = privacy.plan(mode, 1.0, DELTA, clip, 1)
  run = runtime.run_rounds(
      analytic.rounds(
          algorithm, blocks, private=private, noise_key=jax.random.key(7)
      ),
      jax.random.key(0),
  )
  noisy = run["state"].kept
  params = algorithm.init(jax.random.key(0), 1)
  group = jnp.zeros(blocks.num_blocks, jnp.int32)
  exact = algorithm.client_statistics(0, params, blocks, group, group, 1)
  std = private.noise_multiplier * privacy.sensitivity(clip)
  assert run["records"][0]["dp_noise_std"] == pytest.approx(std)
  total = privacy.sum_std(std, [len(clients)], mode)[0]
  gram = np.asarray(noisy.gram - exact.gram)[0]
  np.testing.assert_allclose(gram, gram.T)
  assert chi_square_agrees(gram[np.triu_indices(len(gram))] / total)
  assert chi_square_agrees(
      np.asarray(noisy.label_sums - exact.label_sums) / total
  )
  # The clipped rows: no sample's row beyond C.
  rows = privacy.clip_rows(jnp.asarray(x), clip)
  assert float(jnp.linalg.norm(rows, axis=-1).max()) <= clip * (1 + 1e-6)


@pytest.mark.parametrize("layer", [models.Dense(4), models.Conv(4, 3)])
def test_one_sample_changes_the_statistics_by_at_most_the_sensitivity(layer):
  """Adding a sample of huge rows moves (gram, label_sums, label_counts) by
  at most Delta = P sqrt(C^4 + C^2 + 1), P the rows per sample."""
  clip = 2.0
  model = models.LayerwiseNet((models.Stage(layer),), row_clip=clip)
  shape = (5, 5, 2)
  params = models.init_params(model, jax.random.key(0), shape)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(9, *shape)) * 50, jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 9), jnp.int32)

  def of(n):
    mask = jnp.arange(9) < n
    return statistics.block_statistics(
        model, 0, params, x * mask[:, None, None, None], y, mask, 3
    )

  with_it, without = of(9), of(8)
  change = math.sqrt(
      sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(with_it, without))
  )
  positions = 1 if isinstance(layer, models.Dense) else 25
  bound = privacy.sensitivity(clip, positions)
  assert change <= bound * (1 + 1e-5)
  if positions == 1:  # every row at the bound: Delta is attained
    assert change == pytest.approx(bound, rel=1e-4)


@pytest.mark.parametrize("layer", [models.Dense(4), models.Conv(4, 3)])
def test_the_private_model_clips_every_row_as_its_statistics(layer):
  """The tested model's layer sees the same clipped rows (a Conv layer's
  patches) that its statistics were formed from."""
  net = models.LayerwiseNet(
      (models.Stage(layer, "relu"), models.Stage(models.Dense(3))),
      row_clip=2.0,
  )
  x = jax.random.normal(jax.random.key(0), (5, 6, 6, 2)) * 3
  params = models.init_params(net, jax.random.key(1), (6, 6, 2))
  flat = x.reshape(5, -1) if isinstance(layer, models.Dense) else x
  rows = privacy.clip_rows(layers.design_rows(layer, flat, None), 2.0)
  kernel = layers.from_params(layer, params["params"]["layer_0"])
  expected = jax.nn.relu(
      jnp.concatenate([rows, jnp.ones(rows.shape[:2] + (1,))], -1) @ kernel
  )
  np.testing.assert_allclose(
      np.asarray(net.apply(params, x, upto=1)).reshape(5, -1),
      np.asarray(expected).reshape(5, -1),
      atol=1e-5,
  )
  # A private run of a model that does not clip so is refused.
  with pytest.raises(ValueError, match="must clip its rows"):
    analytic.rounds(
        fedacnnl.fedacnnl(
            net.clone(row_clip=None),
            num_classes=3,
            input_shape=(6, 6, 2),
            mesh=federated.client_mesh(),
        ),
        None,
        np.zeros(2, np.int32),
        private=privacy.plan("local", 1.0, DELTA, 2.0, 2),
    )


def test_indefinite_noisy_statistics_are_projected_and_solved():
  d, gamma = 8, 1.0
  rng = np.random.default_rng(0)
  rows = rng.normal(size=(5, d - 1)) * 0.1
  labels = np.eye(3)[rng.integers(0, 3, 5)]
  exact = statistics.Statistics(
      jnp.asarray(rows.T @ rows)[None],
      jnp.asarray(rows.T @ labels)[None],
      jnp.asarray(labels.sum(0))[None],
  )
  noisy = jax.tree.map(
      lambda a: a[0], privacy.add_noise(jax.random.key(3), exact, 5.0)
  )
  system = np.asarray(noisy.full_gram()) + gamma * np.eye(d)
  assert np.linalg.eigvalsh(system).min() < 0  # the noise made it indefinite
  plain = solve.segment_solve(noisy, gamma)
  # The plain Cholesky fails (which `solve.check` raises as NumericalError).
  assert plain.diagnostics.not_positive_definite == 1
  private = solve.private_segment_solve(noisy, gamma)
  assert private.diagnostics.not_positive_definite == 0
  values, vectors = np.linalg.eigh(np.asarray(noisy.full_gram()))
  projected = (vectors * np.maximum(values, 0)) @ vectors.T
  expected = np.linalg.solve(
      projected + gamma * np.eye(d), np.asarray(noisy.labels())
  )
  np.testing.assert_allclose(private.solution, expected, rtol=1e-8, atol=1e-10)


def test_a_run_at_tiny_epsilon_completes(tmp_path):
  """So much noise that the sums are indefinite: the run still solves."""
  config = _small(
      algorithm="fedacnnl", dp_mode="local", dp_epsilon=0.05, dp_clip=5.0
  )
  results = afl.train_and_evaluate(config, tmp_path, progress=False)
  assert results["status"] == "completed"
  assert 0 <= results["accuracy"] <= 1
  assert results["privacy"]["epsilon_spent"] == pytest.approx(0.05, rel=1e-3)
  # Trained on clipped rows, tested so (the model clips as the rows were).
  assert "row_clip = 5.0" in results["model_spec"]
  # Its kept sums are noisy: editing them is refused, not silently done.
  with pytest.raises(ValueError, match="dp_mode=local"):
    editing.load(tmp_path)


def test_personalization_releases_nothing():
  """pFedACnnL's private meta-models are pFedACnnL-WP's, bit for bit, and
  its personalized models are the non-private personalization (eq. 13)
  from them: the noise reaches eq. 13 only through the meta-models; the
  accounting counts the grouping and the L federated layers only."""
  x, y, clients, mesh, blocks = _federation(seed=1)
  model = models.mlp(3, (6,)).clone(row_clip=4.0)
  algorithm = fedacnnl.fedacnnl(
      model, num_classes=3, input_shape=x.shape[1:], mesh=mesh
  )
  groups = np.array([0, 1, 0, 1, 0, 1])
  private = privacy.plan("local", 2.0, DELTA, 4.0, algorithm.num_layers + 1)
  key, noise_key = jax.random.key(0), jax.random.key(5)

  def run(personalized, dp):
    return runtime.run_rounds(
        analytic.rounds(
            algorithm,
            blocks,
            groups,
            eps=100.0,
            personalized=personalized,
            private=dp,
            noise_key=noise_key,
        ),
        key,
    )["state"]

  whole = run(True, private)
  meta_only = run(False, private)
  for a, b in zip(whole.meta, meta_only.meta):
    np.testing.assert_array_equal(a, b)
  # Personalization rounds L+1..2L without privacy, from those meta-models.
  plain = analytic.rounds(
      algorithm, blocks, groups, eps=100.0, personalized=True
  )
  state = meta_only._replace(solutions=(), full=None)
  for index in range(algorithm.num_layers + 1, 2 * algorithm.num_layers + 1):
    state, _ = plain.round(state, index, None)
  jax.tree.map(np.testing.assert_array_equal, state.full, whole.full)
  assert private.releases == algorithm.num_layers + 1


def test_dp_fedavg_clips_every_update_and_accounts_its_rounds(tmp_path):
  # A client that moves the model by `step`: its upload is the start plus
  # the update scaled to norm <= clip.
  def moving(step):
    local = lanes.LocalTraining(
        init=lambda params, key: params,
        step=lambda carry, x, y, mask, key: (
            jax.tree.map(lambda a: a + step, carry),
            0.0,
        ),
        upload=lambda carry: carry,
    )
    return algorithms.Baseline(local, server=lambda params, mean: mean)

  start = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4)}
  for step, expected in ((1.0, 0.5), (0.01, 0.01 * 4)):
    clipped = algorithms.clipped_updates(moving(step), 0.5).local
    carry, _ = clipped.step(clipped.init(start, None), None, None, None, None)
    update = jax.tree.map(jnp.subtract, clipped.upload(carry), start)
    norm = float(jnp.sqrt(sum(jnp.sum(a**2) for a in jax.tree.leaves(update))))
    assert norm == pytest.approx(expected, rel=1e-5)
  config = afl.get_config(
      algorithm="fedavg",
      num_clients=8,
      model="lr",
      rounds=3,
      dp_mode="local",
      dp_epsilon=4.0,
      dp_clip=0.5,
  )
  results = afl.train_and_evaluate(config, tmp_path, progress=False)
  section = results["privacy"]
  assert section["releases"] == 3
  assert section["noise_multiplier"] == privacy.calibrate(4.0, DELTA, 3)
  assert section["epsilon_spent"] == pytest.approx(4.0, rel=1e-3)
  assert all(
      r["dp_noise_std"] == pytest.approx(section["noise_multiplier"] * 0.5)
      for r in results["rounds"]
  )
  assert set(section) >= {
      "mode",
      "epsilon",
      "delta",
      "noise_multiplier",
      "clip",
      "accountant",
      "epsilon_spent",
  }


@pytest.mark.parametrize(
    "settings, match",
    [
        (dict(dp_mode="local", dp_epsilon=0.0), "dp_epsilon=0.0 must be >"),
        (dict(dp_mode="local", dp_epsilon=-1.0), "must be >"),
        (dict(dp_mode="local", dp_delta=1.0), "dp_delta=1.0 must be <"),
        (dict(dp_mode="local", dp_delta=0.0), "dp_delta=0.0 must be >"),
        (dict(dp_mode="local", dp_clip=0.0), "dp_clip=0.0 must be >"),
        (dict(dp_mode="central"), "is not one of"),
        (dict(dp_epsilon=1.0), "needs --dp_mode=local or distributed"),
        (dict(dp_mode="distributed"), "needs the secure sum"),
        (dict(algorithm="pfedme", dp_mode="local"), "does not apply"),
    ],
)
def test_bad_privacy_settings_are_refused(settings, match):
  with pytest.raises(ValueError, match=match):
    afl.get_config(**dict(dict(num_clients=8, model="lr"), **settings))


def test_distributed_mode_refuses_dropouts():
  secure = dict(
      num_clients=8, dp_mode="distributed", secure_sum=True, secure_sum_bound=5
  )
  afl.get_config(**secure, dp_epsilon=1.0)
  with pytest.raises(ValueError, match="does not allow --dropout"):
    afl.get_config(**secure, dropout=0.1)


@pytest.mark.parametrize(
    "settings, kill_after",
    [
        (dict(algorithm="fedavg", model="lr", rounds=4), 2),
        (dict(algorithm="pfedacnnl", model="lr", num_groups=2), 1),
    ],
)
def test_a_private_run_resumes_to_the_same_noise(
    settings, kill_after, tmp_path, monkeypatch
):
  """The noise is keyed by round (stream "privacy"): a killed and resumed
  private run equals the uninterrupted one."""
  config = afl.get_config(
      num_clients=8,
      dp_mode="local",
      dp_epsilon=2.0,
      checkpoint_every=1,
      **settings,
  )
  afl.train_and_evaluate(config, tmp_path / "whole", progress=False)
  resumed = interrupt_and_resume(
      config, tmp_path / "part", kill_after, monkeypatch
  )
  assert resumed["resumed_after_round"] == kill_after
  assert_same_results(tmp_path / "part", tmp_path / "whole")


def test_runs_saved_before_the_privacy_settings_are_still_reused():
  """A saved config without dp_ settings is the non-private run's."""
  wanted = afl.get_config(algorithm="fedacnnl").to_dict()
  saved = dict(
      wanted,
      fedacnnl={
          k: v for k, v in wanted["fedacnnl"].items() if not k.startswith("dp_")
      },
  )
  assert config_lib.differences(saved, wanted) == []
  private = afl.get_config(algorithm="fedacnnl", dp_mode="local").to_dict()
  assert "fedacnnl.dp_mode: '(unset)' -> 'local'" in config_lib.differences(
      saved, private
  )
