"""Differential privacy of what clients upload (issue 19, part 1).

Guarantee. Sample-level (epsilon, delta)-DP for the analytic algorithms
(FedACnnL, FedACnnL-WA, pFedACnnL and its ablations): neighbouring
federations differ by adding or removing one training sample of one client
(dp_accounting's ADD_OR_REMOVE_ONE). Client-level for DP-FedAvg: they
differ by one client's whole data. The guarantee covers everything the run
releases to the server, for the whole run.

What a client releases (analytic). A design row is x = [r, 1] (the layer
input r and the bias, `statistics.Statistics`). Before the products of eq. 6
every row is clipped to ||r|| <= C (`--dp_clip`, `clip_rows`); labels are
one-hot, so ||y|| = 1 by construction. Per layer the client's upload is
(gram = sum r r^T, label_sums = sum r y^T, label_counts = sum y), from
which the server assembles A_0 (with the bias row, `full_gram`) and X^T Y
(eq. 4, 5; A_1 = X^T Y Q_l, eq. 2): the bias row of A_0 is the row sums of
label_sums and the count, so it is post-processing, not a release of its
own. One sample with P design rows (P = 1 for a Dense layer, H*W positions
for a conv layer: each position is a row, so the sensitivity scales with
P) changes, in Frobenius norm,
  gram         by ||sum_p r_p r_p^T||_F <= sum_p ||r_p||^2 <= P C^2,
  label_sums   by ||sum_p r_p y^T||_F = ||sum_p r_p|| <= P C,
  label_counts by P (one class),
so the release has L2 sensitivity
  Delta_l = P sqrt(C^4 + C^2 + 1)                           (`sensitivity`).
The gram is symmetric: only its upper triangle (with the diagonal) is
released, noised, and mirrored (`symmetric_noise`); the upper triangle of
r r^T has norm <= ||r r^T||_F, so Delta_l bounds it too. Gaussian noise
N(0, (z Delta_l)^2) on every entry is the Gaussian mechanism with noise
multiplier z. Delta_l holds whatever the earlier layers' (released, noisy)
weights are, since layer l's own rows are clipped: the composition below
may be adaptive.

The grouping step (pFedACnnL, eq. 8, 9, clustered variants only): h_i =
Q_enc^T (counts_i / |D_i|) is a function of the client's label counts, whose
L2 sensitivity is 1 (one one-hot label). The client releases its counts plus
N(0, z^2) each (`noisy_label_counts`) and h_i is computed from them
(negative counts floored at 0): post-processing. K-means needs every h_i, so
this release is local in both modes.

Personalization (eq. 12, 13) is computed by each client from its own data
and the (already private) meta-model and never leaves the client: it
releases nothing and costs nothing (the accounting counts federated
releases only; the test suite checks that the personalized models depend on
the noise only through the meta-models).

Composition. A run is an adaptive composition of Gaussian mechanisms, all
with the same noise multiplier z: the grouping (if clustered) and one per
layer, L + 1 at most (a sample lies in one client, so in one group: the
groups' sums are parallel, not composed). They are accounted with
dp_accounting's PLD accountant (privacy loss distributions): for a few
Gaussian mechanisms without subsampling it is tight (composing k Gaussians
of multiplier z is exactly one of multiplier z / sqrt(k), and PLD gives that
epsilon to its discretization, 1e-4), where RDP overstates epsilon by about
10% here (measured at k = 3: 8.6 for a target of 8). `calibrate` finds z for
the target (epsilon, delta) of the whole run with
`dp_accounting.calibrate_dp_mechanism`; `epsilon_spent` reads the accountant
back. DP-FedAvg is T rounds of the Gaussian mechanism on the sum of the
clients' clipped updates (sensitivity C): the same accountant over T
releases. Client sampling and dropouts are not credited (no amplification by
subsampling): the epsilon reported is an upper bound then.

DP-FedAvg (McMahan et al., 2018; `baselines.algorithms.clipped_updates`,
`baselines.iterative`): each client uploads the server model plus its
round's update scaled to norm <= C; the server takes the equal-weight mean
of the n uploads that arrive (n, who reported, is public) with noise of
std z C / n on the mean, i.e. z C on the sum, in distributed mode (the
central DP-FedAvg: the same distribution whether the server or the
clients' shares add it); in local mode every client noises its own update
with std z C (the sum carries z C sqrt(n)).

Modes. `local`: each client's upload is private by itself (it adds N(0,
(z Delta)^2)); `distributed`: each client adds N(0, (z Delta)^2 / n) for the
n clients of its sum, so only the sum is private, which needs the secure
sum (the server never sees an upload alone). Simulation adds the noise of a
segment's sum at once (`sum_std`): in local mode the sum of n independent
N(0, s^2) is N(0, n s^2), in distributed mode the n shares sum to N(0, s^2):
identical in distribution to noising every upload. `add_noise` also noises
per-client uploads [C, ...] (`share_std`), for a per-client path. Distributed
mode assumes every client of a sum reports (a dropped share would leave the
sum under-noised), so it refuses dropouts.

Non-positive-definite statistics. The noisy A_0 + E can be indefinite: the
noise E of std s per entry (s the sum's, `sum_std`) has eigenvalues down to
about -2 s sqrt(d) (the edge of Wigner's semicircle), beyond the small
eigenvalues of A_0. Two data-independent remedies, both post-processing:
  1. the ridge grows with the noise, gamma + s sqrt(d) (`noise_ridge`, per
     group; AdaSSP-like): the noise's directions are damped at the cost of
     shrinking. s sqrt(d) is half the noise's spectral norm; of 0, 1 and 2
     times s sqrt(d), 1 was best on MNIST (FedACnnL-MLP, local mode,
     epsilon 1: 0.17, 0.67, 0.55; experiments/README.md, "Privacy");
  2. the noisy A_0 is projected onto the positive semi-definite cone
     before the ridge (`solve.project_psd`: eigenvalues floored at 0, the
     nearest PSD matrix in Frobenius norm), so the system's smallest
     eigenvalue is at least the ridge and its Cholesky factorization
     succeeds whatever the draw.

Test time. The clipping is part of the trained model: a private run's
network clips every layer's input rows as its statistics did
(`models.LayerwiseNet.row_clip`, recorded in results.json's model_spec), a
fixed per-sample map that costs no privacy; testing raw rows on weights
fitted to clipped ones loses up to 12 points (MNIST-LR, ridge without
noise on rows clipped to 3, gamma 100: 87.3% tested clipped, 75.7% raw).

Cost. The private path forms each group's d x d sums before noising them
(`afl.analytic`), and solves them through an eigendecomposition: fine for
MNIST (d = 785, a few seconds a run), not for the DCNN's widest layers
(d = 18,433: 2.7 GB of float64 a group), where the non-private path
streams the sums into the solve.

--dp_epsilon=inf (or --dp_mode=off) takes none of these paths: no clipping,
no noise, no projection: the non-private run, bit for bit.
"""

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from afl import catalog

MODES = catalog.PRIVACY_MODES
ACCOUNTANT = "PLD (dp_accounting, add-or-remove-one, Gaussian mechanisms)"
LABEL_COUNT_SENSITIVITY = 1.0  # one one-hot label


class Privacy(NamedTuple):
  """A run's privacy setting and its calibrated noise.

  Attributes:
    mode: "off", "local" or "distributed".
    epsilon, delta: the target for the whole run (epsilon may be inf).
    clip: C, the row (analytic) or update (DP-FedAvg) norm bound.
    releases: Gaussian mechanisms composed over the run.
    noise_multiplier: z, each release's noise std / its sensitivity (0 when
      the run is not private).
  """

  mode: str
  epsilon: float
  delta: float
  clip: float
  releases: int
  noise_multiplier: float

  @property
  def enabled(self) -> bool:
    return self.mode != "off" and math.isfinite(self.epsilon)

  def summary(self) -> dict:
    """results.json's "privacy"."""
    return {
        "mode": self.mode,
        "epsilon": self.epsilon,
        "delta": self.delta,
        "noise_multiplier": self.noise_multiplier,
        "clip": self.clip,
        "accountant": ACCOUNTANT,
        "releases": self.releases,
        "epsilon_spent": (
            epsilon_spent(self.noise_multiplier, self.releases, self.delta)
            if self.enabled
            else math.inf
        ),
    }


def _accounting():
  """dp_accounting, imported on first use (it takes about a second, which
  a run without privacy should not pay)."""
  import dp_accounting  # pylint: disable=g-import-not-at-top
  from dp_accounting import pld  # pylint: disable=g-import-not-at-top,unused-import

  return dp_accounting


def event(noise_multiplier: float, releases: int):
  """`releases` Gaussian mechanisms of multiplier z, composed (a
  dp_accounting DpEvent)."""
  dp_accounting = _accounting()
  return dp_accounting.SelfComposedDpEvent(
      dp_accounting.GaussianDpEvent(noise_multiplier), releases
  )


@functools.lru_cache(maxsize=64)
def epsilon_spent(noise_multiplier: float, releases: int, delta: float):
  """The PLD accountant's epsilon at `delta` of `releases` Gaussian
  mechanisms of multiplier z."""
  accountant = _accounting().pld.PLDAccountant()
  accountant.compose(event(noise_multiplier, releases))
  return float(accountant.get_epsilon(delta))


@functools.lru_cache(maxsize=64)
def calibrate(epsilon: float, delta: float, releases: int) -> float:
  """The least noise multiplier z for which `releases` Gaussian mechanisms
  are (epsilon, delta)-DP under the PLD accountant.

  The search is bracketed around the exact answer for Gaussians (one
  Gaussian of multiplier z / sqrt(k), `get_sigma_gaussian`) because the
  PLD of a far too small z does not fit in memory."""
  dp_accounting = _accounting()
  guess = dp_accounting.get_sigma_gaussian(epsilon, delta) * math.sqrt(releases)
  return float(
      dp_accounting.calibrate_dp_mechanism(
          dp_accounting.pld.PLDAccountant,
          lambda z: event(z, releases),
          epsilon,
          delta,
          dp_accounting.ExplicitBracketInterval(guess / 2, guess * 2),
      )
  )


def plan(
    mode: str, epsilon: float, delta: float, clip: float, releases: int
) -> Privacy:
  """The run's Privacy, its noise multiplier calibrated (0 if not
  private)."""
  if mode not in MODES:
    raise ValueError(f"--dp_mode={mode!r} is not one of {', '.join(MODES)}")
  private = mode != "off" and math.isfinite(epsilon)
  multiplier = calibrate(epsilon, delta, releases) if private else 0.0
  return Privacy(mode, epsilon, delta, clip, releases, multiplier)


def from_settings(hparams, releases: int) -> Privacy:
  """`plan` of an algorithm's settings (dp_mode, dp_epsilon, ...)."""
  return plan(
      hparams.dp_mode,
      hparams.dp_epsilon,
      hparams.dp_delta,
      hparams.dp_clip,
      releases,
  )


def sensitivity(clip: float, positions: int = 1) -> float:
  """Delta_l of one layer's statistics (module docstring)."""
  return positions * math.sqrt(clip**4 + clip**2 + 1)


def clip_rows(rows: jax.Array, clip) -> jax.Array:
  """Every row [..., d] scaled down to norm <= clip (zero rows stay 0)."""
  norms = jnp.linalg.norm(rows, axis=-1, keepdims=True)
  scale = jnp.minimum(1.0, clip / jnp.maximum(norms, 1e-30))
  return rows * scale.astype(rows.dtype)


def sum_std(std: float, contributors: np.ndarray, mode: str) -> np.ndarray:
  """[S] noise std of each segment's sum of `contributors` [S] uploads
  whose own noise is what `share_std` gives: local, std sqrt(n); distributed,
  std (0 for a segment nobody contributes to)."""
  contributors = np.asarray(contributors, np.float64)
  if mode == "local":
    return std * np.sqrt(contributors)
  return np.where(contributors > 0, std, 0.0)


def noise_ridge(std, width: int) -> np.ndarray:
  """The ridge added to gamma for sums of noise std `std` ([S]) on a d x d
  gram: std sqrt(d), half the noise's spectral norm (module docstring)."""
  return np.asarray(std, np.float64) * math.sqrt(width)


def share_std(std: float, contributors: int, mode: str) -> float:
  """The noise std one client adds to its upload when `contributors`
  clients' uploads are summed: local, all of it; distributed, its share."""
  if mode == "local":
    return std
  return std / math.sqrt(max(contributors, 1))


def symmetric_noise(key: jax.Array, shape, dtype=jnp.float64) -> jax.Array:
  """[..., d, d] N(0, 1) on and above the diagonal, mirrored below."""
  noise = jax.random.normal(key, shape, dtype)
  upper = jnp.triu(noise)
  return upper + jnp.swapaxes(jnp.triu(noise, 1), -1, -2)


def add_noise(key: jax.Array, stats, std) -> Any:
  """`statistics.Statistics` [S, ...] with N(0, std[s]^2) on every released
  entry of segment (or client) s: the gram's upper triangle (mirrored), the
  label sums and the label counts.

  Args:
    key: e.g. `rng.stream(root, "privacy")` folded with the round.
    stats: Statistics with a leading axis (segments, or clients' uploads).
    std: scalar or [S].

  Returns:
    Statistics of the same shapes and dtypes.
  """
  std = jnp.broadcast_to(jnp.asarray(std, jnp.float64), stats.gram.shape[:1])
  keys = jax.random.split(key, 3)
  gram, sums, counts = stats.gram, stats.label_sums, stats.label_counts

  def scaled(noise, like):
    return (like + std.reshape((-1,) + (1,) * (like.ndim - 1)) * noise).astype(
        like.dtype
    )

  return stats._replace(
      gram=scaled(symmetric_noise(keys[0], gram.shape), gram),
      label_sums=scaled(jax.random.normal(keys[1], sums.shape), sums),
      label_counts=scaled(jax.random.normal(keys[2], counts.shape), counts),
  )


def noisy_label_counts(
    key: jax.Array, counts: np.ndarray, std: float
) -> np.ndarray:
  """[C, d_y] each client's label counts with N(0, std^2) each, floored at
  0 (the grouping's release, module docstring)."""
  noise = np.asarray(jax.random.normal(key, counts.shape, jnp.float64))
  return np.maximum(np.asarray(counts, np.float64) + std * noise, 0.0)


def clip_tree(tree, clip):
  """The pytree scaled down to global L2 norm <= clip (DP-FedAvg's update
  clipping)."""
  norm = jnp.sqrt(
      sum(
          jnp.sum(jnp.square(a.astype(jnp.float32)))
          for a in jax.tree.leaves(tree)
      )
  )
  scale = jnp.minimum(1.0, clip / jnp.maximum(norm, 1e-30))
  return jax.tree.map(lambda a: (a * scale).astype(a.dtype), tree)


def tree_noise(key: jax.Array, tree, std):
  """The pytree with N(0, std^2) on every entry."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten(
      [
          (a + std * jax.random.normal(k, a.shape, jnp.float32)).astype(a.dtype)
          for a, k in zip(leaves, keys)
      ]
  )
