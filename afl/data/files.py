"""The user's own data and client split, as files.

A dataset file (`--dataset=npz --data_file=PATH`, `load_npz`) is an .npz
with

  x: [N, features] or [N, H, W, C] samples, any float or uint8 dtype
     (uint8 is scaled by 1 / 255, floats are taken as they are);
  y: [N] integer labels 0 .. K - 1 (K = max + 1 classes).

A split file (`--split_file=PATH`, `load_split` / `save_split`) is an .npz
with four integer arrays

  train_indices, train_offsets, test_indices, test_offsets

client i's training samples being train_indices[train_offsets[i] :
train_offsets[i + 1]] (test the same; offsets have C + 1 entries, from 0 to
the length of the indices, non-decreasing), indexing the pooled dataset in
the loader's order: for MNIST and CIFAR-10 the training rows, then the test
rows; for an .npz its rows; for the synthetic data the generator's rows.
Every run writes its own split in this format (split.npz in its output
folder), so that a split can be reused and shared and a run reproduced.

Files are checked before anything is trained: missing keys, wrong dtypes or
shapes, indices out of range, a sample in two places (two clients, or a
client's train and test), offsets that do not run from 0 up to the indices'
length; the message names the key and the first offending entry.
"""

import hashlib
import io
import pathlib

import numpy as np

from afl.data import sources

SPLIT_KEYS = ("train_indices", "train_offsets", "test_indices", "test_offsets")


def sha256(path: str | pathlib.Path) -> str:
  """The hex SHA-256 of a file's bytes."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _open(path, flag: str, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
  """The arrays `keys` of an .npz, or DataError naming the flag."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise sources.DataError(f"{flag}={path}: no such file")
  try:
    with np.load(path, allow_pickle=False) as archive:
      missing = [k for k in keys if k not in archive.files]
      if missing:
        raise sources.DataError(
            f"{flag}={path} lacks {', '.join(missing)} (it holds "
            f"{', '.join(archive.files) or 'nothing'}; expected "
            f"{', '.join(keys)})"
        )
      return {k: archive[k] for k in keys}
  except (OSError, ValueError) as error:
    if isinstance(error, sources.DataError):
      raise
    raise sources.DataError(f"{flag}={path} is not an .npz: {error}") from None


def load_npz(path: str | pathlib.Path) -> tuple[np.ndarray, np.ndarray, int]:
  """(x float32 [N, ...] preprocessed, y int32 [N], K) of a dataset file."""
  arrays = _open(path, "--data_file", ("x", "y"))
  x, y = arrays["x"], arrays["y"]
  where = f"--data_file={path}"
  if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
    raise sources.DataError(f"{where}: x must be float or uint8, got {x.dtype}")
  if x.ndim not in (2, 4):
    raise sources.DataError(
        f"{where}: x must be [N, features] or [N, H, W, C], got shape "
        f"{x.shape}"
    )
  if not np.issubdtype(y.dtype, np.integer) or y.shape != (len(x),):
    raise sources.DataError(
        f"{where}: y must be [N] = [{len(x)}] integer labels, got "
        f"{y.dtype} {y.shape}"
    )
  if len(y) and y.min() < 0:
    raise sources.DataError(f"{where}: labels must be >= 0, got {y.min()}")
  if x.dtype == np.uint8:
    x = x.astype(np.float32) / np.float32(255)
  return x.astype(np.float32), y.astype(np.int32), int(y.max()) + 1


def num_clients_of(path: str | pathlib.Path) -> int:
  """C of a split file (its train_offsets' length - 1)."""
  offsets = _open(path, "--split_file", ("train_offsets",))["train_offsets"]
  return max(0, len(offsets) - 1)


def _parts(
    indices: np.ndarray, offsets: np.ndarray, name: str, where: str
) -> list[np.ndarray]:
  for key, a in ((f"{name}_indices", indices), (f"{name}_offsets", offsets)):
    if not np.issubdtype(a.dtype, np.integer) or a.ndim != 1:
      raise sources.DataError(
          f"{where}: {key} must be a 1-D integer array, got {a.dtype} "
          f"{a.shape}"
      )
  if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != len(indices):
    raise sources.DataError(
        f"{where}: {name}_offsets must run from 0 to len({name}_indices) = "
        f"{len(indices)} with one entry per client and one more, got "
        f"{offsets[:3].tolist()} .. {offsets[-1:].tolist()} "
        f"({len(offsets)} entries)"
    )
  falling = np.flatnonzero(np.diff(offsets) < 0)
  if len(falling):
    i = falling[0]
    raise sources.DataError(
        f"{where}: {name}_offsets decrease at client {i} ({offsets[i]} -> "
        f"{offsets[i + 1]})"
    )
  return np.split(indices.astype(np.int64), offsets[1:-1])


def load_split(
    path: str | pathlib.Path, num_samples: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """(train, test) per-client indices of a split file into a dataset of
  `num_samples` rows, checked (module docstring)."""
  arrays = _open(path, "--split_file", SPLIT_KEYS)
  where = f"--split_file={path}"
  train = _parts(
      arrays["train_indices"], arrays["train_offsets"], "train", where
  )
  test = _parts(arrays["test_indices"], arrays["test_offsets"], "test", where)
  if len(train) != len(test):
    raise sources.DataError(
        f"{where}: train_offsets give {len(train)} clients, test_offsets "
        f"{len(test)}"
    )
  every = np.concatenate([arrays["train_indices"], arrays["test_indices"]])
  bad = np.flatnonzero((every < 0) | (every >= num_samples))
  if len(bad):
    raise sources.DataError(
        f"{where}: index {every[bad[0]]} is out of range for the dataset's "
        f"{num_samples} samples ({len(bad)} such indices)"
    )
  values, counts = np.unique(every, return_counts=True)
  if (counts > 1).any():
    sample = int(values[np.argmax(counts > 1)])
    owners = [
        f"client {c} ({part})"
        for part, per_client in (("train", train), ("test", test))
        for c, idx in enumerate(per_client)
        if np.any(idx == sample)
    ]
    raise sources.DataError(
        f"{where}: sample {sample} appears more than once: in "
        f"{', '.join(owners)} ({int((counts > 1).sum())} such samples)"
    )
  empty = [c for c, idx in enumerate(train) if not len(idx)]
  if empty:
    raise sources.DataError(
        f"{where}: client(s) {empty[:10]} have no training samples"
    )
  return train, test


def save_split(
    path,
    train: list[np.ndarray],
    test: list[np.ndarray],
) -> None:
  """Writes a split file (module docstring) to a path or a binary file;
  int32 indices where they fit."""

  def pack(per_client):
    indices = np.concatenate([np.asarray(i, np.int64) for i in per_client])
    offsets = np.concatenate([[0], np.cumsum([len(i) for i in per_client])])
    dtype = np.int32 if indices.size == 0 or indices.max() < 2**31 else np.int64
    return indices.astype(dtype), offsets.astype(np.int64)

  train_indices, train_offsets = pack(train)
  test_indices, test_offsets = pack(test)
  np.savez(
      path,
      train_indices=train_indices,
      train_offsets=train_offsets,
      test_indices=test_indices,
      test_offsets=test_offsets,
  )


def split_bytes(train: list[np.ndarray], test: list[np.ndarray]) -> bytes:
  """A split file's content (`save_split`), for a run folder's split.npz."""
  buffer = io.BytesIO()
  save_split(buffer, train, test)
  return buffer.getvalue()
