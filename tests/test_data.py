"""Tests of afl.data on the real MNIST files and CIFAR-10 subset.

The expected counts and means are those published in the data directory's
README.md and cifar10-subset/README.md; corrupt copies are made in tmp_path.
"""

import gzip
import importlib.util
import pathlib
import pickle

import numpy as np
import pytest

from afl import data as afl_data
from afl.data import DataError

MNIST_TRAIN_COUNTS = [
    5923,
    6742,
    5958,
    6131,
    5842,
    5421,
    5918,
    6265,
    5851,
    5949,
]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
CIFAR_SUBSET_TRAIN_COUNTS = [396, 366, 420, 384, 422, 393, 414, 385, 407, 413]
CIFAR_SUBSET_TEST_COUNTS = [103, 89, 100, 103, 90, 86, 112, 102, 106, 109]
CIFAR_SUBSET_TRAIN_MEAN = [0.4916, 0.4818, 0.4447]
CIFAR_SUBSET_TEST_MEAN = [0.4967, 0.4867, 0.4510]
MNIST_GZ = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


@pytest.fixture(scope="module")
def mnist(data_dir):
  return afl_data.load_mnist(data_dir)


@pytest.fixture(scope="module")
def cifar(data_dir):
  return afl_data.load_cifar10(data_dir)


@pytest.fixture
def mnist_copy(data_dir, tmp_path) -> pathlib.Path:
  """tmp_path/mnist/ with links to the four original files (to corrupt)."""
  folder = tmp_path / "mnist"
  folder.mkdir()
  for name in MNIST_GZ:
    (folder / name).symlink_to(data_dir / "mnist" / name)
  return folder


def _replace(
    folder: pathlib.Path, old_name: str, new_name: str, content: bytes
) -> None:
  (folder / old_name).unlink()
  (folder / new_name).write_bytes(content)


def _raw_test_labels(data_dir) -> bytes:
  return gzip.decompress(
      (data_dir / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes()
  )


def _entropy(histograms: np.ndarray) -> np.ndarray:
  """Label entropy (nats) of each row of count histograms [clients, classes]."""
  p = histograms / histograms.sum(axis=1, keepdims=True)
  return -np.sum(p * np.log(np.where(p > 0, p, 1)), axis=1)


def _assert_partition(parts: list[np.ndarray], num_samples: int) -> None:
  """Every sample 0..num_samples-1 in exactly one part."""
  np.testing.assert_array_equal(
      np.sort(np.concatenate(parts)), np.arange(num_samples)
  )


# ---------------------------------------------------------------- MNIST


def test_mnist_matches_readme(mnist):
  assert mnist.name == "mnist" and mnist.num_classes == 10
  assert mnist.x_train.shape == (60000, 28, 28, 1)
  assert mnist.x_test.shape == (10000, 28, 28, 1)
  assert mnist.x_train.dtype == np.uint8 and mnist.y_train.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(mnist.y_train), MNIST_TRAIN_COUNTS)
  np.testing.assert_array_equal(np.bincount(mnist.y_test), MNIST_TEST_COUNTS)
  assert mnist.x_train.mean() / 255 == pytest.approx(0.1307, abs=1e-4)


def test_mnist_reads_uncompressed_files_in_both_spellings(
    mnist, mnist_copy, data_dir
):
  raw = gzip.decompress((mnist_copy / MNIST_GZ[2]).read_bytes())
  _replace(mnist_copy, MNIST_GZ[2], "t10k-images-idx3-ubyte", raw)
  _replace(
      mnist_copy,
      MNIST_GZ[3],
      "t10k-labels.idx1-ubyte",
      _raw_test_labels(data_dir),
  )
  loaded = afl_data.load_mnist(mnist_copy.parent)
  np.testing.assert_array_equal(loaded.x_test, mnist.x_test)
  np.testing.assert_array_equal(loaded.y_test, mnist.y_test)


def test_mnist_missing_directory_says_where_and_how(tmp_path):
  with pytest.raises(DataError, match=r"absent.*ossci-datasets.*AFL_DATA_DIR"):
    afl_data.load_mnist(tmp_path / "absent")


def test_mnist_missing_file_is_named(mnist_copy):
  (mnist_copy / "train-labels-idx1-ubyte.gz").unlink()
  with pytest.raises(
      DataError, match=r"train-labels-idx1-ubyte\.gz not found.*28881"
  ):
    afl_data.load_mnist(mnist_copy.parent)


@pytest.mark.parametrize(
    "name, size, md5",
    [
        ("t10k-labels-idx1-ubyte.gz", 4542, "ec29112dd5afa0611ce80d1b7f02629c"),
        (
            "t10k-images-idx3-ubyte.gz",
            1648877,
            "9fb629c4189551a2d022fa330f9573f3",
        ),
    ],
)
def test_mnist_truncated_gz(mnist_copy, name, size, md5):
  content = (mnist_copy / name).read_bytes()[: size // 2]
  _replace(mnist_copy, name, name, content)
  with pytest.raises(
      DataError,
      match=rf"{name}: cannot be decompressed.*"
      rf"{size} bytes, md5 {md5}.*found {size // 2} bytes",
  ):
    afl_data.load_mnist(mnist_copy.parent)


def test_mnist_truncated_uncompressed(mnist_copy, data_dir):
  _replace(
      mnist_copy,
      MNIST_GZ[3],
      "t10k-labels-idx1-ubyte",
      _raw_test_labels(data_dir)[:5000],
  )
  with pytest.raises(
      DataError,
      match=r"t10k-labels-idx1-ubyte: truncated.*"
      r"10000 records.*10008 bytes.*holds 5000 bytes",
  ):
    afl_data.load_mnist(mnist_copy.parent)


def test_mnist_wrong_magic(mnist_copy, data_dir):
  raw = bytearray(_raw_test_labels(data_dir))
  raw[:4] = (2051).to_bytes(4, "big")
  _replace(mnist_copy, MNIST_GZ[3], "t10k-labels-idx1-ubyte", bytes(raw))
  with pytest.raises(
      DataError,
      match=r"t10k-labels-idx1-ubyte: magic number "
      r"2051.*2049 .* was expected.*10008 bytes",
  ):
    afl_data.load_mnist(mnist_copy.parent)


def test_mnist_image_and_label_counts_must_agree(mnist_copy, data_dir):
  raw = bytearray(_raw_test_labels(data_dir)[:-1])  # drop the last label
  raw[4:8] = (9999).to_bytes(4, "big")
  _replace(mnist_copy, MNIST_GZ[3], "t10k-labels-idx1-ubyte", bytes(raw))
  with pytest.raises(
      DataError,
      match=r"10000 images but .*" r"t10k-labels-idx1-ubyte holds 9999 labels",
  ):
    afl_data.load_mnist(mnist_copy.parent)


# ---------------------------------------------------------------- CIFAR-10


def _cifar_records(data_dir, name: str, count: int) -> bytes:
  with open(data_dir / "cifar10-subset" / name, "rb") as f:
    return f.read(count * 3073)


def test_cifar_subset_matches_readme(cifar):
  assert cifar.name == "cifar10" and cifar.num_classes == 10
  assert cifar.x_train.shape == (4000, 32, 32, 3)
  assert cifar.x_test.shape == (1000, 32, 32, 3)
  assert cifar.x_train.dtype == np.uint8 and cifar.y_test.dtype == np.int32
  np.testing.assert_array_equal(
      np.bincount(cifar.y_train), CIFAR_SUBSET_TRAIN_COUNTS
  )
  np.testing.assert_array_equal(
      np.bincount(cifar.y_test), CIFAR_SUBSET_TEST_COUNTS
  )
  np.testing.assert_allclose(
      cifar.x_train.mean(axis=(0, 1, 2)) / 255,
      CIFAR_SUBSET_TRAIN_MEAN,
      atol=1e-4,
  )
  np.testing.assert_allclose(
      cifar.x_test.mean(axis=(0, 1, 2)) / 255, CIFAR_SUBSET_TEST_MEAN, atol=1e-4
  )
  # README: train image 0 starts with R row 0 = 59, 43, 50, 68, 98, ...
  np.testing.assert_array_equal(
      cifar.x_train[0, 0, :5, 0], [59, 43, 50, 68, 98]
  )


def test_cifar_pickle_distribution_gives_same_arrays(cifar, tmp_path):
  folder = tmp_path / "cifar-10-batches-py"
  folder.mkdir()
  for name, x, y in (
      ("data_batch_1", cifar.x_train, cifar.y_train),
      ("test_batch", cifar.x_test, cifar.y_test),
  ):
    batch = {
        b"batch_label": name.encode(),
        b"labels": y.tolist(),
        b"data": x.transpose(0, 3, 1, 2).reshape(len(x), 3072),
        b"filenames": [b"%d.png" % i for i in range(len(x))],
    }
    (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
  loaded = afl_data.load_cifar10(tmp_path)
  for a, b in zip(loaded[:4], cifar[:4]):
    np.testing.assert_array_equal(a, b)
    assert a.dtype == b.dtype


def test_cifar_loads_all_batches_in_order(data_dir, tmp_path):
  records = _cifar_records(data_dir, "data_batch_1.bin", 5)
  folder = tmp_path / "cifar-10-batches-bin"
  folder.mkdir()
  (folder / "data_batch_1.bin").write_bytes(records[: 3 * 3073])
  (folder / "data_batch_2.bin").write_bytes(records[3 * 3073 :])
  (folder / "test_batch.bin").write_bytes(records[:3073])
  loaded = afl_data.load_cifar10(tmp_path)
  np.testing.assert_array_equal(loaded.y_train, [6, 9, 9, 4, 1])
  assert loaded.x_train.shape == (5, 32, 32, 3)


def _bin_folder(data_dir, tmp_path, test_content: bytes) -> pathlib.Path:
  folder = tmp_path / "cifar10"
  folder.mkdir()
  (folder / "data_batch_1.bin").write_bytes(
      _cifar_records(data_dir, "data_batch_1.bin", 2)
  )
  (folder / "test_batch.bin").write_bytes(test_content)
  return tmp_path


def test_cifar_size_not_multiple_of_record(data_dir, tmp_path):
  content = _cifar_records(data_dir, "test_batch.bin", 2) + b"12345"
  root = _bin_folder(data_dir, tmp_path, content)
  with pytest.raises(
      DataError,
      match=r"test_batch\.bin: size 6151 bytes is "
      r"not a positive multiple of 3073.*10000 records",
  ):
    afl_data.load_cifar10(root)


def test_cifar_bad_label_byte(data_dir, tmp_path):
  content = bytearray(_cifar_records(data_dir, "test_batch.bin", 2))
  content[3073] = 12  # label byte of record 1
  root = _bin_folder(data_dir, tmp_path, bytes(content))
  with pytest.raises(
      DataError,
      match=r"test_batch\.bin: 1 label\(s\) outside "
      r"0\.\.9, the first at record 1 \(value 12\)",
  ):
    afl_data.load_cifar10(root)


def test_cifar_corrupt_pickle(tmp_path):
  folder = tmp_path / "cifar-10-batches-py"
  folder.mkdir()
  (folder / "data_batch_1").write_bytes(b"not a pickle")
  (folder / "test_batch").write_bytes(b"not a pickle")
  with pytest.raises(
      DataError,
      match=r"data_batch_1: cannot be unpickled.*"
      r"md5 c99cafc152244af753f735de768cd75f",
  ):
    afl_data.load_cifar10(tmp_path)


def test_cifar_missing_says_where_and_how(tmp_path):
  with pytest.raises(
      DataError,
      match=r"cifar-10-batches-bin.*test_batch\.bin"
      r".*30730000 bytes.*cifar-10-binary\.tar\.gz",
  ):
    afl_data.load_cifar10(tmp_path)


# ---------------------------------------------------------------- sources


def test_resolve_data_dir_precedence(monkeypatch, tmp_path):
  monkeypatch.setenv("AFL_DATA_DIR", str(tmp_path / "env"))
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert afl_data.resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
  assert afl_data.resolve_data_dir() == tmp_path / "env"
  monkeypatch.delenv("AFL_DATA_DIR")
  assert afl_data.resolve_data_dir("") == tmp_path / "xdg" / "afl" / "data"
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert afl_data.resolve_data_dir() == (
      tmp_path / "home" / ".cache" / "afl" / "data"
  )


def test_load_dataset_dispatch(data_dir, cifar, tmp_path):
  loaded = afl_data.load_dataset("cifar10", data_dir, source="files")
  np.testing.assert_array_equal(loaded.y_test, cifar.y_test)
  with pytest.raises(ValueError, match="mnist, cifar10"):
    afl_data.load_dataset("imagenet", data_dir)
  with pytest.raises(ValueError, match="auto, files, tfds"):
    afl_data.load_dataset("mnist", data_dir, source="web")
  if importlib.util.find_spec("tensorflow_datasets") is None:
    with pytest.raises(DataError, match=r"pip install -e \.\[tfds\]"):
      afl_data.load_dataset("mnist", tmp_path, source="tfds")
    with pytest.raises(DataError, match="not found"):  # auto: the files error
      afl_data.load_dataset("mnist", tmp_path)


# ---------------------------------------------------------------- synthetic


@pytest.fixture(scope="module")
def synthetic_05():
  return afl_data.synthetic(0.5, 0.5, seed=0)


def test_synthetic_shapes_and_clients(synthetic_05):
  x, y, clients = synthetic_05
  assert x.dtype == np.float32 and x.ndim == 2 and x.shape[1] == 60
  assert y.dtype == np.int32 and y.shape == (len(x),)
  assert 0 <= y.min() and y.max() < 10
  assert len(clients) == 100
  _assert_partition(clients, len(x))
  for part in clients:  # contiguous ranges, in client order
    np.testing.assert_array_equal(part, np.arange(part[0], part[-1] + 1))
  sizes = np.array([len(part) for part in clients])
  assert sizes.min() >= 50 and np.all(sizes % 5 == 0)  # (n + 50) * 5
  assert sizes.max() / np.median(sizes) > 10  # log-normal: heavy tail


def test_synthetic_deterministic_per_seed(synthetic_05):
  x, y, clients = afl_data.synthetic(0.5, 0.5, seed=0)
  np.testing.assert_array_equal(x, synthetic_05[0])
  np.testing.assert_array_equal(y, synthetic_05[1])
  other = afl_data.synthetic(0.5, 0.5, seed=1)
  assert [len(c) for c in other[2]] != [len(c) for c in clients]


def test_synthetic_features_follow_sigma():
  # Within a client x ~ N(v_k, diag(j^-1.2)).
  x, _, clients = afl_data.synthetic(0.0, 0.0, num_clients=5, seed=2)
  biggest = max(clients, key=len)
  np.testing.assert_allclose(
      x[biggest].var(axis=0), np.arange(1, 61) ** -1.2, rtol=0.3
  )


def test_synthetic_heterogeneity_grows_with_beta():
  # Mean label entropy per client: lower means more heterogeneous clients.
  def mean_entropy(alpha, beta):
    _, y, clients = afl_data.synthetic(alpha, beta, seed=0)
    return _entropy(afl_data.client_label_histograms(clients, y, 10)).mean()

  assert mean_entropy(0.0, 0.0) > mean_entropy(1.0, 1.0) + 0.1


def test_synthetic_alpha_shifts_all_logits_alike():
  # u_k is added to every entry of W_k and b_k: labels do not depend on it.
  x0, y0, _ = afl_data.synthetic(0.0, 0.5, num_clients=10, seed=3)
  x1, y1, _ = afl_data.synthetic(2.0, 0.5, num_clients=10, seed=3)
  np.testing.assert_array_equal(x0, x1)
  assert np.mean(y0 == y1) > 0.999


# ---------------------------------------------------------------- partitions


@pytest.fixture(scope="module")
def labels():
  return np.random.default_rng(0).integers(0, 10, 5000)


def test_dirichlet_partition(labels):
  parts = afl_data.dirichlet_partition(labels, 50, 0.1, seed=1, min_size=10)
  assert len(parts) == 50
  _assert_partition(parts, len(labels))
  assert min(len(p) for p in parts) >= 10
  again = afl_data.dirichlet_partition(labels, 50, 0.1, seed=1, min_size=10)
  for a, b in zip(parts, again):
    np.testing.assert_array_equal(a, b)


def test_dirichlet_smaller_beta_more_heterogeneous(labels):
  def mean_entropy(beta):
    parts = afl_data.dirichlet_partition(labels, 20, beta, seed=0)
    return _entropy(afl_data.client_label_histograms(parts, labels, 10)).mean()

  assert mean_entropy(0.1) < mean_entropy(100.0) - 0.5
  assert mean_entropy(100.0) > 0.95 * np.log(10)


def test_dirichlet_impossible(labels):
  with pytest.raises(ValueError, match="cannot give 50 clients"):
    afl_data.dirichlet_partition(labels, 50, 0.1, seed=0, min_size=101)
  with pytest.raises(ValueError, match="no draw in 1000 attempts"):
    afl_data.dirichlet_partition(labels[:500], 25, 0.01, seed=0, min_size=20)
  with pytest.raises(ValueError, match="beta must be > 0"):
    afl_data.dirichlet_partition(labels, 5, 0.0, seed=0)
  with pytest.raises(ValueError, match="num_clients must be >= 1"):
    afl_data.dirichlet_partition(labels, 0, 0.1, seed=0)


def test_an_impossible_partition_names_the_settings(data_dir):
  """prepare's message is in the settings' (flags') names."""
  with pytest.raises(
      ValueError,
      match=r"num_clients=1000 min_client_size=80 dirichlet_beta=0.01 on "
      r"mnist \(70000 samples\): cannot give 1000 clients at least 80",
  ):
    afl_data.prepare(
        "mnist",
        num_clients=1000,
        dirichlet_beta=0.01,
        min_client_size=80,
        data_dir=data_dir,
    )


def test_iid_partition():
  parts = afl_data.iid_partition(1003, 10, seed=0)
  _assert_partition(parts, 1003)
  assert sorted(len(p) for p in parts) == [100] * 7 + [101] * 3
  with pytest.raises(ValueError, match="cannot give 10 clients"):
    afl_data.iid_partition(9, 10, seed=0)


def test_power_law_partition():
  parts = afl_data.power_law_partition(10000, 100, seed=0, min_size=10)
  _assert_partition(parts, 10000)
  sizes = np.array([len(p) for p in parts])
  assert sizes.min() >= 10
  assert sizes.max() / np.median(sizes) > 10
  again = afl_data.power_law_partition(10000, 100, seed=0, min_size=10)
  assert [len(p) for p in again] == sizes.tolist()


def test_split_train_test():
  clients = [
      np.arange(0, 100),
      np.arange(100, 101),
      np.arange(101, 103),
      np.arange(103, 106),
  ]
  train, test = afl_data.split_train_test(clients, 0.25, seed=0)
  assert [len(t) for t in test] == [25, 0, 1, 1]
  for client, tr, te in zip(clients, train, test):
    assert not np.intersect1d(tr, te).size
    np.testing.assert_array_equal(np.sort(np.concatenate([tr, te])), client)
    assert len(tr) >= 1
  for fraction in (0.0, 1.0):
    with pytest.raises(ValueError, match="test_fraction"):
      afl_data.split_train_test(clients, fraction)


def test_summarize(labels):
  parts = afl_data.iid_partition(len(labels), 30, seed=0)
  histograms = afl_data.client_label_histograms(parts, labels, 10)
  assert histograms.shape == (30, 10)
  assert histograms.sum(axis=1).tolist() == [len(p) for p in parts]
  text = afl_data.summarize(parts, labels, 10, max_rows=5)
  assert "30 clients" in text and "total 5000" in text
  assert "min 166 / median 167 / mean 166.7 / max 167" in text
  assert text.splitlines()[-1].startswith("...")
  assert len(text.splitlines()) == 2 + 5 + 1


# ---------------------------------------------------------------- pipeline


def _check_client_split(split, num_clients: int, num_samples: int) -> None:
  assert len(split.train_indices) == len(split.test_indices) == num_clients
  assert split.x.dtype == np.float32 and split.y.dtype == np.int32
  assert len(split.x) == len(split.y) == num_samples
  _assert_partition(split.train_indices + split.test_indices, num_samples)
  num_test = sum(len(t) for t in split.test_indices)
  assert num_test / num_samples == pytest.approx(0.25, abs=0.01)


def test_prepare_mnist(data_dir, mnist):
  split = afl_data.prepare("mnist", data_dir=data_dir)
  _check_client_split(split, 100, 70000)
  assert split.x.shape == (70000, 28, 28, 1)
  assert split.x.min() == 0.0 and split.x.max() == 1.0
  np.testing.assert_array_equal(
      split.y, np.concatenate([mnist.y_train, mnist.y_test])
  )  # pooled
  np.testing.assert_allclose(split.x[60000], mnist.x_test[0] / 255, rtol=1e-6)
  sizes = [
      len(a) + len(b) for a, b in zip(split.train_indices, split.test_indices)
  ]
  assert min(sizes) >= 10


def test_prepare_cifar10_subset(data_dir, cifar):
  split = afl_data.prepare(
      "cifar10", num_clients=20, data_dir=data_dir, partition="iid"
  )
  _check_client_split(split, 20, 5000)
  assert split.x.shape == (5000, 32, 32, 3)
  mean = np.array([0.4914, 0.4822, 0.4465])
  std = np.array([0.2470, 0.2435, 0.2616])
  np.testing.assert_allclose(
      split.x[:4000] * std + mean, cifar.x_train / 255, atol=1e-5
  )


def test_prepare_synthetic_needs_no_data(tmp_path, monkeypatch):
  monkeypatch.setenv("AFL_DATA_DIR", str(tmp_path / "absent"))
  split = afl_data.prepare("synthetic", seed=0)
  _check_client_split(split, 100, len(split.y))
  assert split.num_classes == 10 and split.x.shape[1] == 60
  again = afl_data.prepare("synthetic", seed=0)
  for a, b in zip(split.test_indices, again.test_indices):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="partition must be 'default'"):
    afl_data.prepare("synthetic", partition="iid")


def test_prepare_rejects_unknown_names():
  with pytest.raises(ValueError, match="mnist, cifar10, synthetic"):
    afl_data.prepare("svhn")
  with pytest.raises(ValueError, match="default, dirichlet, iid, power_law"):
    afl_data.prepare("mnist", partition="shards")
  with pytest.raises(ValueError, match="unknown dataset"):
    afl_data.preprocess("svhn", np.zeros((1, 2)))
