"""Partitions of a dataset over federated clients, and per-client splits.

* `dirichlet_partition`: label-based Dirichlet partition of NIID-Bench (Li,
  Diao, Chen & He, "Federated Learning on Non-IID Data Silos: An Experimental
  Study", ICDE 2022, `noniid-labeldir`; also FedLab's `hetero_dir_partition`):
  for each class, proportions p ~ Dir(beta * 1) over the clients, zeroed for
  clients that already hold >= N / num_clients samples and renormalized; the
  class's shuffled samples are cut at the cumulative proportions. The whole
  draw is repeated until every client holds >= min_size samples. Smaller
  beta gives more skewed label distributions (the paper's setting: 0.1).
* `iid_partition`: a random permutation cut into near-equal parts.
* `power_law_partition`: client sizes from a log-normal (as in FedProx and
  pFedMe's synthetic data), rescaled to the dataset size.
* `split_train_test`: each client's local train / test split.

All functions are deterministic given `seed` (numpy `default_rng`) and return
one sorted int64 index array per client.
"""

import numpy as np

_MAX_DIRICHLET_ATTEMPTS = 1000


def _check_at_least(name: str, value: int, low: int) -> None:
  if value < low:
    raise ValueError(f"{name} must be >= {low}, got {value}")


def _check_fits(num_samples: int, num_clients: int, min_size: int) -> None:
  _check_at_least("num_clients", num_clients, 1)
  _check_at_least("min_size", min_size, 0)
  if num_clients * max(min_size, 1) > num_samples:
    raise ValueError(
        f"cannot give {num_clients} clients at least {max(min_size, 1)} "
        f"samples each from {num_samples} samples"
    )


def dirichlet_partition(
    labels: np.ndarray,
    num_clients: int,
    beta: float,
    seed: int,
    min_size: int = 10,
) -> list[np.ndarray]:
  """Splits samples over clients with per-class Dir(beta) proportions.

  Args:
    labels: int [N] class of each sample.
    num_clients: number of clients.
    beta: Dirichlet concentration (> 0); small is heterogeneous.
    seed: seed of the numpy Generator.
    min_size: every client gets at least this many samples.

  Returns:
    num_clients sorted int64 arrays that together hold each of 0..N-1 once.

  Raises:
    ValueError: bad arguments, min_size * num_clients > N, or no draw within
      1000 attempts gave every client min_size samples.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
  if not beta > 0:
    raise ValueError(f"beta must be > 0, got {beta}")
  num_samples = len(labels)
  _check_fits(num_samples, num_clients, min_size)
  rng = np.random.default_rng(seed)
  classes = np.unique(labels)
  # Clients holding this many samples get no further classes (NIID-Bench).
  cap = num_samples / num_clients
  for _ in range(_MAX_DIRICHLET_ATTEMPTS):
    client_parts = [[] for _ in range(num_clients)]
    sizes = np.zeros(num_clients, np.int64)  # [num_clients]
    for c in classes:
      members = rng.permutation(np.flatnonzero(labels == c))
      proportions = rng.dirichlet(np.full(num_clients, beta))
      open_proportions = proportions * (sizes < cap)
      if open_proportions.sum() > 0:  # else all mass sat on full clients
        proportions = open_proportions
      cuts = (np.cumsum(proportions / proportions.sum()) * len(members)).astype(
          np.int64
      )[:-1]
      for k, part in enumerate(np.split(members, cuts)):
        client_parts[k].append(part)
        sizes[k] += len(part)
    if sizes.min() >= min_size:
      return [np.sort(np.concatenate(parts)) for parts in client_parts]
  raise ValueError(
      f"dirichlet_partition: no draw in {_MAX_DIRICHLET_ATTEMPTS} attempts "
      f"gave all {num_clients} clients >= {min_size} of the {num_samples} "
      f"samples with beta={beta}; lower the minimum client size or the "
      "number of clients, or raise beta"
  )


def iid_partition(
    num_samples: int, num_clients: int, seed: int
) -> list[np.ndarray]:
  """Cuts a random permutation of range(num_samples) into near-equal parts."""
  _check_fits(num_samples, num_clients, 1)
  order = np.random.default_rng(seed).permutation(num_samples)
  return [np.sort(part) for part in np.array_split(order, num_clients)]


def power_law_partition(
    num_samples: int,
    num_clients: int,
    seed: int,
    mean: float = 4.0,
    sigma: float = 2.0,
    min_size: int = 10,
) -> list[np.ndarray]:
  """Gives clients log-normally distributed shares of shuffled samples.

  Each client gets min_size samples plus a share of the rest proportional to
  a LogNormal(mean, sigma) draw (largest-remainder rounding, so the sizes sum
  to num_samples); a random permutation is then cut at those sizes.

  Args:
    num_samples: N, the number of samples 0..N-1 to distribute.
    num_clients: number of clients.
    seed: seed of the numpy Generator.
    mean: mean of the underlying normal (FedProx / pFedMe: 4).
    sigma: standard deviation of the underlying normal (> 0; they use 2).
    min_size: every client gets at least this many samples.

  Returns:
    num_clients sorted int64 arrays that together hold each of 0..N-1 once.
  """
  _check_fits(num_samples, num_clients, min_size)
  if not sigma > 0:
    raise ValueError(f"sigma must be > 0, got {sigma}")
  rng = np.random.default_rng(seed)
  weights = rng.lognormal(mean, sigma, num_clients)  # [num_clients]
  shares = weights / weights.sum() * (num_samples - num_clients * min_size)
  sizes = np.floor(shares).astype(np.int64)
  leftover = num_samples - num_clients * min_size - sizes.sum()
  sizes[np.argsort(sizes - shares)[:leftover]] += 1  # largest remainders
  sizes += min_size
  order = rng.permutation(num_samples)
  return [np.sort(part) for part in np.split(order, np.cumsum(sizes)[:-1])]


def split_train_test(
    client_indices: list[np.ndarray], test_fraction: float = 0.25, seed: int = 0
) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Splits each client's samples at random into local train and test sets.

  A client with n samples gets round(test_fraction * n) test samples, clipped
  so that it keeps >= 1 train sample and, when n >= 2, has >= 1 test sample.

  Args:
    client_indices: per client, int [n_k] sample indices.
    test_fraction: the share of each client's samples held out, in (0, 1).
    seed: seed of the numpy Generator.

  Returns:
    (train, test): per client, sorted int64 arrays partitioning its indices.
  """
  if not 0 < test_fraction < 1:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
  rng = np.random.default_rng(seed)
  train, test = [], []
  for k, indices in enumerate(client_indices):
    indices = np.asarray(indices, np.int64)
    n = len(indices)
    if n == 0:
      raise ValueError(f"client {k} has no samples")
    num_test = min(max(round(test_fraction * n), 1), n - 1)
    shuffled = rng.permutation(indices)
    test.append(np.sort(shuffled[:num_test]))
    train.append(np.sort(shuffled[num_test:]))
  return train, test


def client_label_histograms(
    client_indices: list[np.ndarray], labels: np.ndarray, num_classes: int
) -> np.ndarray:
  """Returns int64 [num_clients, num_classes]: label counts of each client."""
  labels = np.asarray(labels)
  return np.stack(
      [
          np.bincount(
              labels[np.asarray(indices, np.int64)], minlength=num_classes
          )[:num_classes]
          for indices in client_indices
      ]
  )


def summarize(
    client_indices: list[np.ndarray],
    labels: np.ndarray,
    num_classes: int,
    max_rows: int = 20,
) -> str:
  """Returns a printable table: client size statistics and label histograms.

  Args:
    client_indices: per client, int [n_k] sample indices.
    labels: int [N] class of each sample.
    num_classes: number of classes (histogram columns).
    max_rows: clients listed before the table is cut with '...'.
  """
  histograms = client_label_histograms(client_indices, labels, num_classes)
  sizes = histograms.sum(axis=1)  # [num_clients]
  width = max(len(str(sizes.max())), 4)
  lines = [
      f"{len(sizes)} clients; sizes min {sizes.min()} / median "
      f"{np.median(sizes):g} / mean {sizes.mean():.1f} / max {sizes.max()} "
      f"/ total {sizes.sum()}",
      f'{"client":>6} {"size":>{width}} | label counts 0..{num_classes - 1}',
  ]
  for k in range(min(len(sizes), max_rows)):
    counts = " ".join(f"{c:>{width}}" for c in histograms[k])
    lines.append(f"{k:>6} {sizes[k]:>{width}} | {counts}")
  if len(sizes) > max_rows:
    lines.append(f"... ({len(sizes) - max_rows} more clients)")
  return "\n".join(lines)
