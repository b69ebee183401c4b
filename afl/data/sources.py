"""Loaders for the original MNIST and CIFAR-10 distributions, and for tfds.

Reads the files exactly as their authors distribute them, with numpy only:

* MNIST: the four IDX files of LeCun, Cortes & Burges
  (http://yann.lecun.com/exdb/mnist/, mirrored at
  https://ossci-datasets.s3.amazonaws.com/mnist/), gzipped or not. An IDX file
  is a big-endian header (magic number 0x0000080D: unsigned bytes, D dims;
  then D uint32 sizes) followed by the row-major payload.
* CIFAR-10 (Krizhevsky 2009, https://www.cs.toronto.edu/~kriz/cifar.html):
  the binary version (`cifar-10-batches-bin/`: records of 1 label byte +
  3072 pixel bytes, R, G, B planes of 32x32 row-major) and the python version
  (`cifar-10-batches-py/`: pickled dicts with b'data' uint8 [n, 3072] in the
  same plane order and b'labels').
* Either dataset through `tensorflow_datasets`, when it is installed.

Every missing, truncated or corrupt file raises `DataError`, whose message
names the file, what was expected (size, record count, magic number, md5)
and where to get the data. The project ships no dataset: callers point
`data_dir` (the `--data_dir` flag, or the `AFL_DATA_DIR` environment
variable) at their own copy; see `resolve_data_dir`.
"""

import gzip
import hashlib
import importlib.util
import os
import pathlib
import pickle
import re
import zlib
from typing import Callable, NamedTuple

import numpy as np

PathLike = str | os.PathLike
DATA_DIR_ENV = "AFL_DATA_DIR"
DATASETS = ("mnist", "cifar10")
SOURCES = ("auto", "files", "tfds")

_GZIP_MAGIC = b"\x1f\x8b"
_NUM_CLASSES = 10


class DataError(ValueError):
  """A dataset file is missing, truncated or corrupt, or a client's samples
  are unusable (non-finite features); the message says how."""


class ArrayDataset(NamedTuple):
  """A labelled image dataset as uint8 NHWC arrays, in distribution order."""

  x_train: np.ndarray  # uint8 [num_train, height, width, channels]
  y_train: np.ndarray  # int32 [num_train]
  x_test: np.ndarray  # uint8 [num_test, height, width, channels]
  y_test: np.ndarray  # int32 [num_test]
  num_classes: int
  name: str


def resolve_data_dir(data_dir: PathLike | None = None) -> pathlib.Path:
  """Returns the data directory: argument, else $AFL_DATA_DIR, else a cache.

  The argument is what the `--data_dir` flag holds; None or '' means unset.
  The default is `$XDG_CACHE_HOME/afl/data` (`~/.cache/afl/data` when
  XDG_CACHE_HOME is unset). The directory is neither created nor checked.
  """
  if data_dir is not None and str(data_dir):
    return pathlib.Path(data_dir).expanduser()
  if os.environ.get(DATA_DIR_ENV):
    return pathlib.Path(os.environ[DATA_DIR_ENV]).expanduser()
  cache = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(cache).expanduser() / "afl" / "data"


def _how_to_get(name: str) -> str:
  """The paragraph every DataError ends with: where the data comes from."""
  if name == "mnist":
    files = (
        "the four files train-images-idx3-ubyte.gz, "
        "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
        "t10k-labels-idx1-ubyte.gz from "
        "https://ossci-datasets.s3.amazonaws.com/mnist/ (a mirror of "
        "http://yann.lecun.com/exdb/mnist/) into <data_dir>/mnist/"
    )
  else:
    files = (
        "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz (md5 "
        "c32a1d4ab5d03f1284b67883e8d87530) or "
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (md5 "
        "c58f30108f718f92721af3b95e74349a) and extract it into "
        "<data_dir> (giving cifar-10-batches-bin/ or "
        "cifar-10-batches-py/)"
    )
  return (
      f"To get {name}: download {files}, then pass --data_dir=<data_dir> "
      f"or set {DATA_DIR_ENV}=<data_dir>. Alternatively install "
      "tensorflow-datasets (pip install -e .[tfds]) and use source='tfds'."
  )


def _error(
    path: PathLike, problem: str, expected: str, dataset: str
) -> DataError:
  return DataError(
      f"{path}: {problem}. Expected {expected}. " f"{_how_to_get(dataset)}"
  )


def _md5(data: bytes) -> str:
  return hashlib.md5(data).hexdigest()


def _read_bytes(path: pathlib.Path, expected: str, dataset: str) -> bytes:
  try:
    return path.read_bytes()
  except OSError as e:
    raise _error(path, f"cannot be read ({e})", expected, dataset) from e


def _check_labels(
    path: pathlib.Path, labels: np.ndarray, expected: str, dataset: str
) -> np.ndarray:
  """Returns `labels` as int32 after checking they lie in 0..9."""
  bad = np.flatnonzero((labels < 0) | (labels >= _NUM_CLASSES))
  if bad.size:
    raise _error(
        path,
        f"{bad.size} label(s) outside 0..{_NUM_CLASSES - 1}, the first "
        f"at record {bad[0]} (value {labels[bad[0]]})",
        expected,
        dataset,
    )
  return labels.astype(np.int32)


# ----------------------------------------------------------------------------
# MNIST (IDX files).


class _IdxFile(NamedTuple):
  """One canonical MNIST file; the md5s are those of the LeCun originals."""

  stem: str  # 'train-images'
  item_shape: tuple[int, ...]  # (28, 28) for images, () for labels
  count: int  # records in the canonical file
  gz_bytes: int
  gz_md5: str
  raw_md5: str  # of the decompressed file

  @property
  def magic(self) -> int:
    return 0x0800 + 1 + len(self.item_shape)  # 2051 images, 2049 labels

  @property
  def header_bytes(self) -> int:
    return 4 * (2 + len(self.item_shape))

  @property
  def raw_bytes(self) -> int:
    return self.header_bytes + self.count * int(np.prod(self.item_shape))

  @property
  def names(self) -> tuple[str, ...]:
    """File names accepted, in order of preference."""
    idx = f"idx{1 + len(self.item_shape)}-ubyte"
    return (f"{self.stem}-{idx}.gz", f"{self.stem}-{idx}", f"{self.stem}.{idx}")

  def describe(self, compressed: bool) -> str:
    dims = " x ".join(str(d) for d in (self.count,) + self.item_shape)
    raw = (
        f"{self.raw_bytes} bytes (md5 {self.raw_md5}): an IDX file with "
        f"magic number {self.magic} and {dims} unsigned bytes"
    )
    if compressed:
      return (
          f"the canonical {self.names[0]}: {self.gz_bytes} bytes, md5 "
          f"{self.gz_md5}, decompressing to {raw}"
      )
    return f"the canonical uncompressed {self.names[1]}: {raw}"


_MNIST_FILES = {
    "x_train": _IdxFile(
        "train-images",
        (28, 28),
        60000,
        9912422,
        "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "6bbc9ace898e44ae57da46a324031adb",
    ),
    "y_train": _IdxFile(
        "train-labels",
        (),
        60000,
        28881,
        "d53e105ee54ea40749a09fcbcd1e9432",
        "a25bea736e30d166cdddb491f175f624",
    ),
    "x_test": _IdxFile(
        "t10k-images",
        (28, 28),
        10000,
        1648877,
        "9fb629c4189551a2d022fa330f9573f3",
        "2646ac647ad5339dbf082846283269ea",
    ),
    "y_test": _IdxFile(
        "t10k-labels",
        (),
        10000,
        4542,
        "ec29112dd5afa0611ce80d1b7f02629c",
        "27ae3e4e09519cfbb04c329615203637",
    ),
}


def _mnist_folders(root: pathlib.Path) -> tuple[pathlib.Path, ...]:
  return (root / "mnist", root)


def _find_mnist(root: pathlib.Path) -> dict[str, pathlib.Path | None]:
  """Maps each array name to its file (the first match), or None."""
  found = {}
  for key, spec in _MNIST_FILES.items():
    candidates = (
        folder / name for folder in _mnist_folders(root) for name in spec.names
    )
    found[key] = next((path for path in candidates if path.is_file()), None)
  return found


def _read_idx(path: pathlib.Path, spec: _IdxFile) -> np.ndarray:
  """Reads one IDX file (gzipped or not); returns uint8 [count, *item_shape]."""
  data = _read_bytes(path, spec.describe(path.suffix == ".gz"), "mnist")
  compressed = data[:2] == _GZIP_MAGIC

  def fail(problem: str) -> DataError:
    # The md5 is computed only here, on failure, so that a valid file
    # compressed differently from the original is still accepted.
    found = f"; found {len(data)} bytes with md5 {_md5(data)}"
    return _error(path, problem, spec.describe(compressed) + found, "mnist")

  if compressed:
    try:
      data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
      raise fail(f"cannot be decompressed ({type(e).__name__}: {e})") from e
  if len(data) < spec.header_bytes:
    raise fail(
        f"holds {len(data)} bytes, too few for a "
        f"{spec.header_bytes}-byte IDX header"
    )
  header = np.frombuffer(data, ">u4", count=spec.header_bytes // 4)
  magic, dims = int(header[0]), tuple(int(d) for d in header[1:])
  if magic != spec.magic:
    raise fail(
        f"magic number {magic} (0x{magic:08x}) where {spec.magic} "
        f"(0x{spec.magic:08x}) was expected"
    )
  if dims[1:] != spec.item_shape:
    raise fail(f"record shape {dims[1:]} where {spec.item_shape} was expected")
  needed = spec.header_bytes + int(np.prod(dims))
  if len(data) != needed:
    kind = "truncated" if len(data) < needed else "has trailing bytes"
    raise fail(
        f"{kind}: its header announces {dims[0]} records, which take "
        f"{needed} bytes, but it holds {len(data)} bytes"
        + (" once decompressed" if compressed else "")
    )
  # Copied so that callers get a writable array, not a view of `data`.
  return (
      np.frombuffer(data, np.uint8, offset=spec.header_bytes)
      .reshape(dims)
      .copy()
  )


def load_mnist(data_dir: PathLike | None = None) -> ArrayDataset:
  """Loads MNIST from its IDX files in `data_dir/mnist/` or `data_dir/`.

  Accepts `train-images-idx3-ubyte.gz` and the other original names, the same
  names uncompressed, and the `train-images.idx3-ubyte` spelling.

  Args:
    data_dir: the data directory; None resolves it with `resolve_data_dir`.

  Returns:
    x uint8 [60000 | 10000, 28, 28, 1] and y int32 labels in 0..9.

  Raises:
    DataError: a file is missing, truncated or corrupt, or images and labels
      disagree in count.
  """
  root = resolve_data_dir(data_dir)
  paths = _find_mnist(root)
  missing = [
      _MNIST_FILES[key].names[0] for key, path in paths.items() if path is None
  ]
  if missing:
    looked_in = " and ".join(str(f) for f in _mnist_folders(root))
    where = looked_in if root.is_dir() else f"{root} (no such directory)"
    originals = "; ".join(
        f"{s.names[0]}: {s.gz_bytes} bytes, md5 {s.gz_md5}"
        for s in _MNIST_FILES.values()
    )
    raise DataError(
        f'MNIST file(s) {", ".join(missing)} not found in {where} (the same '
        "names without .gz, and the train-images.idx3-ubyte spelling, are "
        f"also accepted). Expected the four original IDX files ({originals}). "
        f'{_how_to_get("mnist")}'
    )
  arrays = {
      key: _read_idx(paths[key], spec) for key, spec in _MNIST_FILES.items()
  }
  for split in ("train", "test"):
    images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
    if len(images) != len(labels):
      raise DataError(
          f'{paths[f"x_{split}"]} holds {len(images)} images but '
          f'{paths[f"y_{split}"]} holds {len(labels)} labels; expected equal '
          f'counts ({_MNIST_FILES[f"x_{split}"].count} in the originals). '
          f'{_how_to_get("mnist")}'
      )
    arrays[f"y_{split}"] = _check_labels(
        paths[f"y_{split}"], labels, "labels 0..9", "mnist"
    )
    arrays[f"x_{split}"] = images[..., None]  # [n, 28, 28, 1]
  return ArrayDataset(num_classes=_NUM_CLASSES, name="mnist", **arrays)


# ----------------------------------------------------------------------------
# CIFAR-10 (binary and python versions).

_CIFAR_FOLDERS = (
    "cifar-10-batches-bin",
    "cifar-10-batches-py",
    "cifar10",
    "cifar10-subset",
    ".",
)
_CIFAR_PIXELS = 3 * 32 * 32  # bytes per image: R, G, B planes of 32x32
_CIFAR_RECORD = 1 + _CIFAR_PIXELS  # binary version: label byte + pixels
_CIFAR_BATCH = 10000  # records per original batch file
# md5s of the python-version batches (as published with torchvision).
_CIFAR_PICKLE_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}


class _CifarLayout(NamedTuple):
  reader: Callable[[pathlib.Path], tuple[np.ndarray, np.ndarray]]
  train: list[pathlib.Path]  # data_batch_1, data_batch_2, ... in order
  test: pathlib.Path


def _planes_to_nhwc(pixels: np.ndarray) -> np.ndarray:
  """uint8 [n, 3072] (R, G, B planes, row-major) -> uint8 [n, 32, 32, 3]."""
  return np.ascontiguousarray(
      pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  )


def _read_cifar_bin(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  """Reads a binary-version batch; returns x [n, 32, 32, 3], y int32 [n]."""
  expected = (
      f"records of {_CIFAR_RECORD} bytes (1 label byte + "
      f"{_CIFAR_PIXELS} pixel bytes); an original batch holds "
      f"{_CIFAR_BATCH} records, {_CIFAR_BATCH * _CIFAR_RECORD} bytes"
  )
  data = _read_bytes(path, expected, "cifar10")
  if not data or len(data) % _CIFAR_RECORD:
    raise _error(
        path,
        f"size {len(data)} bytes is not a positive multiple "
        f"of {_CIFAR_RECORD}",
        expected,
        "cifar10",
    )
  records = np.frombuffer(data, np.uint8).reshape(-1, _CIFAR_RECORD)
  labels = _check_labels(path, records[:, 0], expected, "cifar10")
  return _planes_to_nhwc(records[:, 1:]), labels


def _read_cifar_pickle(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  """Reads a python-version batch; returns x [n, 32, 32, 3], y int32 [n].

  Unpickling runs code chosen by the file's author: load only trusted copies.
  """
  md5 = _CIFAR_PICKLE_MD5.get(path.name)
  expected = (
      "a pickled dict with b'data' (uint8 [n, 3072]) and b'labels' "
      f"(n ints); an original batch holds {_CIFAR_BATCH} images"
      + (f" and has md5 {md5}" if md5 else "")
  )
  data = _read_bytes(path, expected, "cifar10")
  try:
    batch = pickle.loads(data, encoding="bytes")
  except Exception as e:  # pylint: disable=broad-except
    # A corrupt pickle can raise nearly any exception type.
    raise _error(
        path,
        f"cannot be unpickled ({type(e).__name__}: {e}; "
        f"{len(data)} bytes, md5 {_md5(data)})",
        expected,
        "cifar10",
    ) from e
  if not isinstance(batch, dict):
    raise _error(
        path, f"holds a {type(batch).__name__}, not a dict", expected, "cifar10"
    )
  # Python-2 pickles give bytes keys; a batch re-pickled by Python 3 may not.
  batch = {
      k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()
  }
  if "data" not in batch or "labels" not in batch:
    raise _error(path, f"has keys {sorted(batch)}", expected, "cifar10")
  try:
    pixels = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"], np.int64)
  except (TypeError, ValueError, OverflowError) as e:
    raise _error(
        path, f"has unreadable data or labels ({e})", expected, "cifar10"
    ) from e
  if (
      pixels.dtype != np.uint8
      or pixels.ndim != 2
      or pixels.shape[1] != _CIFAR_PIXELS
      or labels.shape != pixels.shape[:1]
  ):
    raise _error(
        path,
        f"has data {pixels.dtype} {pixels.shape} and labels " f"{labels.shape}",
        expected,
        "cifar10",
    )
  labels = _check_labels(path, labels, expected, "cifar10")
  return _planes_to_nhwc(pixels), labels


def _batch_number(path: pathlib.Path) -> int:
  return int(re.search(r"(\d+)", path.name).group(1))


def _cifar_layout(folder: pathlib.Path) -> _CifarLayout | None:
  """The batches in `folder` (binary version first), or None if incomplete."""
  if not folder.is_dir():
    return None
  try:
    files = [p for p in folder.iterdir() if p.is_file()]
  except OSError as e:
    raise DataError(
        f"{folder}: cannot list the CIFAR-10 folder ({e}). "
        f'{_how_to_get("cifar10")}'
    ) from e
  for suffix, reader in ((".bin", _read_cifar_bin), ("", _read_cifar_pickle)):
    pattern = re.compile(rf"data_batch_\d+{re.escape(suffix)}")
    train = sorted(
        (p for p in files if pattern.fullmatch(p.name)), key=_batch_number
    )
    test = folder / f"test_batch{suffix}"
    if train and test.is_file():
      return _CifarLayout(reader, train, test)
  return None


def _find_cifar(root: pathlib.Path) -> _CifarLayout | None:
  folders = (root / name for name in _CIFAR_FOLDERS)
  return next(filter(None, map(_cifar_layout, folders)), None)


def load_cifar10(data_dir: PathLike | None = None) -> ArrayDataset:
  """Loads CIFAR-10 from the original binary or python batch files.

  Looks in `cifar-10-batches-bin/`, `cifar-10-batches-py/`, `cifar10/` and
  `cifar10-subset/` under `data_dir`, then in `data_dir` itself; the first
  folder holding `test_batch[.bin]` and at least one `data_batch_N[.bin]`
  wins. All its training batches are loaded, in order of N.

  Args:
    data_dir: the data directory; None resolves it with `resolve_data_dir`.

  Returns:
    x uint8 [n, 32, 32, 3] (NHWC) and y int32 labels in 0..9.

  Raises:
    DataError: no folder holds the batches, or a batch is truncated or
      corrupt or has labels outside 0..9.
  """
  root = resolve_data_dir(data_dir)
  layout = _find_cifar(root)
  if layout is None:
    where = ", ".join(str(root / name) for name in _CIFAR_FOLDERS)
    raise DataError(
        f"CIFAR-10 batches not found in any of {where}"
        + ("" if root.is_dir() else f" ({root} does not exist)")
        + ". Expected test_batch.bin and data_batch_1.bin .. data_batch_5.bin "
        f"({_CIFAR_BATCH} records of {_CIFAR_RECORD} bytes, "
        f"{_CIFAR_BATCH * _CIFAR_RECORD} bytes each) for the binary version, "
        "or test_batch and data_batch_1 .. data_batch_5 for the python "
        f'version. {_how_to_get("cifar10")}'
    )
  train = [layout.reader(path) for path in layout.train]
  x_test, y_test = layout.reader(layout.test)
  return ArrayDataset(
      x_train=np.concatenate([x for x, _ in train]),
      y_train=np.concatenate([y for _, y in train]),
      x_test=x_test,
      y_test=y_test,
      num_classes=_NUM_CLASSES,
      name="cifar10",
  )


# ----------------------------------------------------------------------------
# tensorflow_datasets and dispatch.


def _tfds_installed() -> bool:
  return importlib.util.find_spec("tensorflow_datasets") is not None


def _check_choice(kind: str, value: str, valid: tuple[str, ...]) -> None:
  if value not in valid:
    raise ValueError(f'unknown {kind} {value!r}; valid: {", ".join(valid)}')


def load_tfds(name: str, data_dir: PathLike | None = None) -> ArrayDataset:
  """Loads 'mnist' or 'cifar10' through tensorflow_datasets.

  Args:
    name: 'mnist' or 'cifar10' (the tfds names too).
    data_dir: tfds' data directory (it downloads there); None for tfds'
      default (~/tensorflow_datasets).

  Returns:
    the train and test splits as uint8 NHWC images and int32 labels.

  Raises:
    DataError: tensorflow_datasets is not installed or cannot load `name`.
  """
  _check_choice("dataset", name, DATASETS)
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError(
        f"loading {name!r} from tfds needs tensorflow_datasets, which is not "
        "installed: run `pip install -e .[tfds]` in the repository root, or "
        "use source='files'. " + _how_to_get(name)
    ) from e
  try:
    train, test = tfds.as_numpy(
        tfds.load(
            name,
            split=["train", "test"],
            batch_size=-1,
            data_dir=None if data_dir is None else str(data_dir),
        )
    )
  except Exception as e:  # pylint: disable=broad-except
    # tfds and TensorFlow raise many types (download, checksum, I/O).
    raise DataError(
        f"tensorflow_datasets could not load {name!r} into "
        f'{data_dir or "its default data_dir"}: '
        f"{type(e).__name__}: {e}. {_how_to_get(name)}"
    ) from e
  return ArrayDataset(
      x_train=np.asarray(train["image"], np.uint8),
      y_train=np.asarray(train["label"], np.int32),
      x_test=np.asarray(test["image"], np.uint8),
      y_test=np.asarray(test["label"], np.int32),
      num_classes=_NUM_CLASSES,
      name=name,
  )


def _has_mnist(root: pathlib.Path) -> bool:
  return all(_find_mnist(root).values())


# name -> (loader, predicate: does the data directory hold the files?)
_FILE_LOADERS = {
    "mnist": (load_mnist, _has_mnist),
    "cifar10": (load_cifar10, _find_cifar),
}


def load_dataset(
    name: str, data_dir: PathLike | None = None, source: str = "auto"
) -> ArrayDataset:
  """Loads a dataset by name from files or tfds.

  Args:
    name: 'mnist' or 'cifar10'.
    data_dir: the data directory (see `resolve_data_dir`). tfds, when used,
      downloads into its `tfds/` subfolder.
    source: 'files' (the original distribution under `data_dir`), 'tfds', or
      'auto': the files when `data_dir` has them, else tfds when it is
      installed, else the files' DataError.

  Returns:
    the dataset's train and test splits.

  Raises:
    ValueError: unknown `name` or `source`.
    DataError: the data cannot be found or read.
  """
  _check_choice("dataset", name, DATASETS)
  _check_choice("source", source, SOURCES)
  root = resolve_data_dir(data_dir)
  load_files, has_files = _FILE_LOADERS[name]
  if source == "tfds" or (
      source == "auto" and not has_files(root) and _tfds_installed()
  ):
    return load_tfds(name, root / "tfds")
  return load_files(root)
