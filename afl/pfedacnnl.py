"""pFedACnnL (section IV): group meta-models and analytic personalization.

Three stages (Fig. 3):
  1. Initialization (IV-B): client i uploads h_i = Q_enc^T mean(y over D_i)
     (eq. 9), Q_enc being the label encoding of smallest width (eq. 8); the
     server runs K-means on {h_i} and forms K groups.
  2. Federated optimization (IV-C): FedACnnL inside each group, all groups at
     once: per-group sums A_0^[k], A_1^[k] and one Cholesky solve per group
     (eq. 10, 11) give the meta-models M^[k] (`fedacnnl.solve_layer` with a
     client -> group map).
  3. Local personalization (IV-D, `personalize_layer`): every client, layer
     by layer,
     W_l^(i) = (G_i + eps I)^-1 (H_i + eps M_l^[k]) (eq. 12, 13), with G_i,
     H_i computed through its own *personalized* layers 1..l-1. No
     communication; all clients at once, their solves spread over devices.

Ablations (section V-A): pFedACnnL-WC is K = 1 (no clustering);
pFedACnnL-WP stops after stage 2 (each client uses its group's meta-model).
`afl.analytic` composes the stages into the registered algorithms.

Encoding for a model without hidden layers (LR): there is no Q_l, so Q_enc
is the identity and h_i is the client's label distribution itself. This is
the exact version of what a hidden encoding gives: with Q ~ N(0, 1) of width
d >= d_y, Q Q^T ~ d I, so K-means on Q_enc^T p_i sees (up to scale) the
distances between the label distributions p_i.

Memory: a client's d x d statistics exist only while they are formed: each
client's are solved (eq. 13) as soon as its blocks are summed
(`federated.segment_sum`'s finalize), and only the d x d_y solution is kept.
A client with fewer rows than half the layer's width is solved in the dual
form, P + X^T (X X^T + eps I)^-1 (Y - X P), an n x n system
(`solve.dual_solve`): on MNIST's first layer (d = 785, blocks of 128) the
clients of at most 384 samples, 44 of 100 under Dirichlet(0.1).
All clients personalize in one pass over the data per layer, with memory
O(devices d^2 + C d d_y), never O(C d^2).
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from sklearn import cluster

from afl import fedacnnl
from afl import federated
from afl import solve


def encoded_label_vectors(
    label_counts: np.ndarray, label_encoding: np.ndarray
) -> np.ndarray:
  """eq. 9: h_i = Q_enc^T (1/|D_i|) sum_n y_n.

  Args:
    label_counts: [C, d_y] number of training samples of each class per
      client.
    label_encoding: Q_enc [d_y, d].

  Returns:
    [C, d] float64; zeros for a client without data.
  """
  counts = np.asarray(label_counts, np.float64)
  sizes = counts.sum(1, keepdims=True)
  distribution = np.divide(
      counts, sizes, out=np.zeros_like(counts), where=sizes > 0
  )
  return distribution @ np.asarray(label_encoding, np.float64)


def group_clients(
    vectors: np.ndarray, num_groups: int, seed: int
) -> np.ndarray:
  """The server's K-means on {h_i} (section IV-B), seeded.

  Returns:
    [C] int32 group of each client, groups numbered by first appearance so
    that equal partitions give equal labels.
  """
  num_clients = len(vectors)
  if not 1 <= num_groups <= num_clients:
    raise ValueError(
        f"num_groups must be in [1, {num_clients}] (the number "
        f"of clients), got {num_groups}"
    )
  if num_groups == 1:
    return np.zeros(num_clients, np.int32)
  labels = cluster.KMeans(
      n_clusters=num_groups, n_init=10, random_state=seed
  ).fit_predict(vectors)
  _, first = np.unique(labels, return_index=True)
  renumber = np.empty(labels.max() + 1, np.int32)
  renumber[labels[np.sort(first)]] = np.arange(len(first))
  return renumber[labels]


def grouping_report(groups: np.ndarray, counts: np.ndarray) -> str:
  """Group sizes and the label histogram of each group, printable."""
  lines = ["group clients samples | label counts"]
  for k in range(groups.max() + 1):
    members = groups == k
    hist = counts[members].sum(0)
    lines.append(
        f"{k:5d} {members.sum():7d} {hist.sum():7d} | "
        + " ".join(f"{c:5d}" for c in hist)
    )
  return "\n".join(lines)


def personalize_layer(
    algorithm: fedacnnl.FedACnnL,
    data: federated.FederatedData,
    layer: int,
    params: fedacnnl.Params,
    prior: jax.Array,
    eps: float,
) -> solve.Solved:
  """Personalization round `layer` (eq. 12, 13) of every client at once.

  Args:
    algorithm: the FedACnnL functions (statistics, solve, write).
    data: training blocks, sharded over the algorithm's mesh; each client's
      blocks next to each other (as `federated.federate` lays them out).
    layer: l (0-based).
    params: factored params [C, ...], each client's personalized layers < l
      and its group's meta-model after.
    prior: [C, d, d_y] the label-space solution of each client's group
      meta-model (M^[k] = P^[k] Q_l, see `solve`).
    eps: the proximal weight epsilon of eq. 12 (paper: 2500).

  Returns:
    `solve.Solved`: [C, d, d_y] each client's P_l, and the Diagnostics [C]
    of its solve. A client without training samples has G_i = 0, H_i = 0:
    eq. 13 gives its meta-model, which it keeps (the pass finalizes only
    clients it sees; its Diagnostics are zeros).
  """
  solution, diagnostics = algorithm.solve(
      layer,
      params,
      data,
      data.client,
      data.client,
      data.num_clients,
      eps,
      prior,
  )
  has_data = jnp.asarray(data.client_sizes() > 0)[:, None, None]
  return solve.Solved(jnp.where(has_data, solution, prior), diagnostics)


def label_vectors(
    counts: np.ndarray, algorithm: fedacnnl.FedACnnL
) -> np.ndarray:
  """eq. 8, 9: every client's h_i [C, d_h] from its label counts [C, d_y],
  with the narrowest hidden layer's encoding (LR: the identity)."""
  hidden = algorithm.encodings[:-1] or algorithm.encodings  # LR: identity
  label_encoding = min(hidden, key=lambda q: q.shape[1])  # eq. 8
  return encoded_label_vectors(counts, label_encoding)


def assign_groups(
    counts: np.ndarray, algorithm: fedacnnl.FedACnnL, num_groups: int, seed: int
) -> tuple[np.ndarray, float]:
  """Stage 1: eq. 8, 9 and K-means. Returns (groups [C], seconds)."""
  start = time.perf_counter()
  groups = group_clients(label_vectors(counts, algorithm), num_groups, seed)
  return groups, time.perf_counter() - start


def nearest_groups(vectors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
  """[n] the group whose centroid [K, d_h] is nearest to each h [n, d_h]
  (a late joiner's group, `afl.editing`; K-means' assignment step)."""
  distances = ((vectors[:, None] - centroids[None]) ** 2).sum(-1)
  return np.argmin(distances, 1).astype(np.int32)
