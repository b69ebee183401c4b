"""The paper's federated data protocol: load, pool, partition, split.

MNIST and CIFAR-10: the train and test sets are pooled (70,000 / 60,000
samples), partitioned over the clients with per-class Dirichlet(0.1)
proportions (`partition.dirichlet_partition`), and each client's samples are
split into a local train and test set. Synthetic: the FedProx synthetic(0.5,
0.5) generator with its own power-law clients (`synthetic.synthetic`), split
the same way. "Overall accuracy" is then the total number of correct
predictions over the total number of test samples of all clients.

The user's own data (`dataset='npz'`, an .npz of x and y) is pooled and
partitioned the same way; a split file (`split_file`, `afl.data.files`)
replaces the partition and the train / test split with given indices into
the pooled data. Every split carries its `origin` (the files and their
checksums) for results.json.

The generator, the partition and the split draw from independent seeds,
spawned from the one `seed` with `np.random.SeedSequence`, so that a change
in one stage's use of randomness does not move the others.

`prepare` rejects a split with a non-finite feature in any client's sample
(`check_finite`, which also checks a split built by hand): one NaN would
make every solve it enters NaN. Finite but huge values are left to the
solves' own guards (`afl.solve`), which see them in the statistics.
"""

from typing import NamedTuple

import numpy as np

from afl.data import files
from afl.data import partition as partition_lib
from afl.data import sources
from afl.data import synthetic as synthetic_lib

DATASETS = ("mnist", "cifar10", "synthetic", "npz")
PARTITIONS = ("default", "dirichlet", "iid", "power_law")
_SYNTHETIC_NUM_CLASSES = 10  # FedProx's synthetic data: 10 classes
_CHECK_CHUNK = 8192  # samples per pass of `check_finite`

# Per-channel (R, G, B) mean and standard deviation of the CIFAR-10 training
# set's pixels scaled to [0, 1]: the usual normalization constants.
CIFAR10_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
CIFAR10_STD = np.array([0.2470, 0.2435, 0.2616], np.float32)


class ClientSplit(NamedTuple):
  """A dataset partitioned over clients, each with a local train/test split."""

  x: np.ndarray  # float32 [N, ...] all samples, preprocessed
  y: np.ndarray  # int32 [N]
  train_indices: list[np.ndarray]  # per client, int64 [n_train_k] into x
  test_indices: list[np.ndarray]  # per client, int64 [n_test_k] into x
  num_classes: int
  name: str
  # Where the data came from, for results.json's "data" (`prepare`); None
  # for a split built by hand.
  origin: dict | None = None


def preprocess(name: str, x: np.ndarray) -> np.ndarray:
  """Scales raw samples to model inputs.

  Args:
    name: 'mnist', 'cifar10' or 'synthetic'.
    x: uint8 [N, 28, 28, 1] (mnist), uint8 [N, 32, 32, 3] (cifar10) or
      float [N, d] (synthetic).

  Returns:
    float32, same shape: mnist x / 255 in [0, 1]; cifar10 (x / 255 - mean) /
    std per channel; synthetic unchanged.
  """
  if name == "mnist":
    return x.astype(np.float32) / np.float32(255)
  if name == "cifar10":
    return (x.astype(np.float32) / np.float32(255) - CIFAR10_MEAN) / CIFAR10_STD
  if name == "synthetic":
    return x.astype(np.float32)
  raise ValueError(f'unknown dataset {name!r}; valid: {", ".join(DATASETS)}')


def _stage_seeds(seed: int) -> tuple[int, int, int]:
  """Independent integer seeds for (data generation, partition, split)."""
  children = np.random.SeedSequence(seed).spawn(3)
  return tuple(int(child.generate_state(1, np.uint64)[0]) for child in children)


def prepare(
    dataset: str,
    *,
    num_clients: int = 100,
    partition: str = "default",
    dirichlet_beta: float = 0.1,
    min_client_size: int = 10,
    test_fraction: float = 0.25,
    seed: int = 0,
    data_dir: sources.PathLike | None = None,
    source: str = "auto",
    synthetic_alpha: float = 0.5,
    synthetic_beta: float = 0.5,
    data_file: sources.PathLike | None = None,
    split_file: sources.PathLike | None = None,
) -> ClientSplit:
  """Builds the federated dataset of the paper's protocol.

  Args:
    dataset: 'mnist', 'cifar10', 'synthetic' or 'npz' (the user's file,
      `files.load_npz`).
    num_clients: number of clients.
    partition: 'default' ('dirichlet' for mnist / cifar10 / npz, the
      generator's own power-law clients for synthetic, which accepts only
      'default'), 'dirichlet', 'iid' or 'power_law' (not synthetic).
    dirichlet_beta: Dirichlet concentration of the 'dirichlet' partition.
    min_client_size: least number of samples per client ('dirichlet' and
      'power_law').
    test_fraction: share of each client's samples held out as its test set.
    seed: the one seed of all randomness here.
    data_dir: data directory of mnist / cifar10 (see
      `sources.resolve_data_dir`).
    source: 'auto', 'files' or 'tfds' (see `sources.load_dataset`).
    synthetic_alpha: alpha of synthetic(alpha, beta) (a standard deviation).
    synthetic_beta: beta of synthetic(alpha, beta) (a standard deviation).
    data_file: the .npz of dataset 'npz'.
    split_file: the clients' train and test indices (`files.load_split`)
      instead of the partition and the train / test split.

  Returns:
    all samples preprocessed, their labels, per-client train and test
    indices into them, and where they came from (`origin`).

  Raises:
    ValueError: unknown dataset or partition, or invalid sizes.
    sources.DataError: the dataset's files cannot be found or read, a split
      file is malformed, or a client's sample has a non-finite feature
      (`check_finite`).
  """
  if dataset not in DATASETS:
    raise ValueError(
        f'unknown dataset {dataset!r}; valid: {", ".join(DATASETS)}'
    )
  if partition not in PARTITIONS:
    raise ValueError(
        f'unknown partition {partition!r}; valid: {", ".join(PARTITIONS)}'
    )
  if (dataset == "npz") != (data_file is not None):
    raise ValueError("--data_file goes with --dataset=npz, and only with it")
  data_seed, partition_seed, split_seed = _stage_seeds(seed)
  origin = {"dataset": dataset}
  client_indices = None
  if dataset == "synthetic":
    if partition != "default":
      raise ValueError(
          "synthetic data comes with its own power-law clients: partition "
          f"must be 'default', got {partition!r}"
      )
    num_classes = _SYNTHETIC_NUM_CLASSES
    x, y, client_indices = synthetic_lib.synthetic(
        synthetic_alpha,
        synthetic_beta,
        num_clients=num_clients,
        num_classes=num_classes,
        seed=data_seed,
    )
    x = preprocess(dataset, x)
    origin["source"] = "FedProx synthetic generator"
  elif dataset == "npz":
    x, y, num_classes = files.load_npz(data_file)
    origin.update(
        source="npz file",
        data_file=str(data_file),
        data_sha256=files.sha256(data_file),
    )
  else:
    data = sources.load_dataset(dataset, data_dir, source)
    x = preprocess(dataset, np.concatenate([data.x_train, data.x_test]))
    y = np.concatenate([data.y_train, data.y_test])
    num_classes = data.num_classes
    origin["source"] = f"{data.name}: training rows, then test rows"
  origin["num_samples"] = len(y)
  if split_file is not None:
    train_indices, test_indices = files.load_split(split_file, len(y))
    origin.update(
        split_file=str(split_file), split_sha256=files.sha256(split_file)
    )
  else:
    if client_indices is None:
      client_indices = _partition(
          y,
          dataset,
          num_clients,
          partition,
          dirichlet_beta,
          min_client_size,
          partition_seed,
      )
    train_indices, test_indices = partition_lib.split_train_test(
        client_indices, test_fraction, split_seed
    )
  split = ClientSplit(
      x=x,
      y=y.astype(np.int32),
      train_indices=train_indices,
      test_indices=test_indices,
      num_classes=num_classes,
      name=dataset,
      origin=origin,
  )
  check_finite(split)
  return split


def _partition(
    y, dataset, num_clients, partition, beta, min_size, seed
) -> list[np.ndarray]:
  """The clients' samples of `partition`, its errors in the settings'
  names."""
  dirichlet = partition in ("default", "dirichlet")
  try:
    if dirichlet:
      return partition_lib.dirichlet_partition(
          y, num_clients, beta, seed, min_size=min_size
      )
    if partition == "iid":
      return partition_lib.iid_partition(len(y), num_clients, seed)
    return partition_lib.power_law_partition(
        len(y), num_clients, seed, min_size=min_size
    )
  except ValueError as error:
    named = f" dirichlet_beta={beta}" if dirichlet else ""
    raise ValueError(
        f"num_clients={num_clients} min_client_size={min_size}{named} on "
        f"{dataset} ({len(y)} samples): {error}"
    ) from error


def check_finite(split: ClientSplit, limit: int = 10) -> None:
  """Raises DataError if a sample of some client has a non-finite feature.

  One NaN or Inf in one sample makes its client's statistics, and with them
  every sum they enter (the global model, a group's meta-model), NaN (eq.
  4, 6), so it is rejected here, at load. Samples that belong to no client
  (train or test) are not looked at. Vectorized: one pass over x in chunks
  of `_CHECK_CHUNK` samples (bounded memory), then only the non-finite
  samples are matched to their clients.

  Args:
    split: e.g. from `prepare`, or built by hand.
    limit: at most this many (client, sample) pairs are named.

  Raises:
    sources.DataError: naming the clients and samples, e.g. "non-finite
      features in 1 sample(s): client 3 (train sample 1234: nan)".
  """
  x = np.asarray(split.x)
  if not np.issubdtype(x.dtype, np.inexact):
    return  # integers are finite
  flat = x.reshape(len(x), -1)
  finite = np.ones(len(x), bool)
  for start in range(0, len(x), _CHECK_CHUNK):
    finite[start : start + _CHECK_CHUNK] = np.isfinite(
        flat[start : start + _CHECK_CHUNK]
    ).all(1)
  if finite.all():
    return
  parts = [
      (which, np.asarray(indices, np.int64))
      for which, per_client in (
          ("train", split.train_indices),
          ("test", split.test_indices),
      )
      for indices in per_client
  ]
  num_clients = len(split.train_indices)
  samples = np.concatenate([indices for _, indices in parts])
  client = np.repeat(
      np.tile(np.arange(num_clients), 2), [len(i) for _, i in parts]
  )
  which = np.repeat([w for w, _ in parts], [len(i) for _, i in parts])
  hit = ~finite[samples]
  if not hit.any():
    return
  samples, client, which = samples[hit], client[hit], which[hit]
  shown = np.lexsort((samples, client))[:limit]
  rows = flat[samples[shown]]
  values = rows[np.arange(len(shown)), np.argmax(~np.isfinite(rows), 1)]
  pairs = [
      f"client {c} ({w} sample {i}: {v})"
      for c, w, i, v in zip(client[shown], which[shown], samples[shown], values)
  ]
  more = len(samples) - len(shown)
  raise sources.DataError(
      f"{split.name}: non-finite features in {len(np.unique(samples))} "
      f"sample(s) of {len(np.unique(client))} client(s): "
      + ", ".join(pairs)
      + (f" and {more} more" if more > 0 else "")
      + ". Remove or repair these samples (e.g. np.nan_to_num, or drop "
      "their indices from the clients' train / test indices)."
  )
