"""The user's own data (--dataset=npz) and client split (--split_file):
runs on them, results that trace them, and clear errors for bad files."""

import json

import numpy as np
import pytest

import afl
import baselines  # registers fedavg
from afl import data as data_lib
from afl import results as results_lib
from afl import runtime
from afl.data import files


def make_npz(path, n=400, uint8=True, nan_row=None):
  """n 8 x 8 x 1 images of 3 classes: class c brightens row block c."""
  rng = np.random.default_rng(0)
  y = rng.integers(0, 3, n)
  x = rng.integers(0, 60, (n, 8, 8, 1))
  for c in range(3):
    x[y == c, 2 * c : 2 * c + 3] += 150
  x = x.astype(np.uint8) if uint8 else (x / 255.0).astype(np.float64)
  if nan_row is not None:
    x[nan_row, 0, 0, 0] = np.nan
  np.savez(path, x=x, y=y)
  return x, y


@pytest.mark.parametrize("algorithm", ["fedacnnl", "fedavg"])
def test_an_npz_dataset_trains_and_a_written_split_reproduces_the_run(
    algorithm, tmp_path
):
  make_npz(tmp_path / "own.npz")
  # Flax's init: PyTorch's smaller one has FedAvg at 0.31 after 2 rounds.
  rounds = {"fedavg": dict(rounds=2, init="flax")}.get(algorithm, {})
  first = afl.train_and_evaluate(
      afl.get_config(
          algorithm=algorithm,
          dataset="npz",
          data_file=str(tmp_path / "own.npz"),
          num_clients=8,
          **rounds,
      ),
      tmp_path / "first",
      progress=False,
  )
  assert first["dataset"] == "npz" and first["data"]["num_samples"] == 400
  assert first["data"]["data_sha256"] == files.sha256(tmp_path / "own.npz")
  assert first["accuracy"] > 0.8
  split = tmp_path / "first" / "split.npz"
  again = afl.train_and_evaluate(
      afl.get_config(
          algorithm=algorithm,
          dataset="npz",
          data_file=str(tmp_path / "own.npz"),
          split_file=str(split),
          **rounds,
      ),
      tmp_path / "again",
      progress=False,
  )
  assert again["num_clients"] == 8  # from the split file
  assert again["data"]["split_sha256"] == files.sha256(split)
  assert (
      results_lib.params_path(tmp_path / "again").read_bytes()
      == results_lib.params_path(tmp_path / "first").read_bytes()
  )
  assert again["per_client_train_samples"] == first["per_client_train_samples"]


def write_split(path, **changes):
  arrays = dict(
      train_indices=np.array([0, 1, 2, 5, 6]),
      train_offsets=np.array([0, 2, 5]),
      test_indices=np.array([3, 7]),
      test_offsets=np.array([0, 1, 2]),
  )
  arrays.update(changes)
  np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
  return path


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(test_offsets=None), "lacks test_offsets"),
        (dict(train_indices=np.array([0.0, 1, 2, 5, 6])), "integer array"),
        (dict(train_indices=np.array([0, 1, 2, 5, 10])), "index 10 is out"),
        (dict(train_indices=np.array([0, 1, 2, 5, 3])), "sample 3 appears"),
        (dict(train_offsets=np.array([0, 3, 2, 5])), "decrease at client 1"),
        (dict(train_offsets=np.array([0, 2, 4])), "run from 0 to"),
        (dict(test_offsets=np.array([0, 2])), "2 clients, test_offsets 1"),
        (
            dict(
                train_offsets=np.array([0, 0, 5]),
                test_offsets=np.array([0, 1, 2]),
            ),
            "no training samples",
        ),
    ],
)
def test_bad_split_files_are_named(changes, match, tmp_path):
  path = write_split(tmp_path / "split.npz", **changes)
  with pytest.raises(data_lib.DataError, match=match):
    files.load_split(path, 8)


def test_bad_data_files_and_settings_are_refused_before_anything_is_written(
    tmp_path,
):
  make_npz(tmp_path / "nan.npz", uint8=False, nan_row=17)
  np.savez(tmp_path / "noy.npz", x=np.zeros((4, 3)))
  np.savez(
      tmp_path / "ints.npz", x=np.zeros((4, 3), np.int64), y=np.zeros(4, int)
  )
  (tmp_path / "text.npz").write_text("not an archive")
  split = write_split(tmp_path / "split.npz")
  cases = [
      (dict(data_file="nan.npz"), "non-finite features"),
      (dict(data_file="noy.npz"), "lacks y"),
      (dict(data_file="ints.npz"), "float or uint8"),
      (dict(data_file="text.npz"), "not an .npz"),
      (dict(data_file="none.npz"), "no such file"),
  ]
  for settings, match in cases:
    config = afl.get_config(
        dataset="npz",
        num_clients=4,
        data_file=str(tmp_path / settings["data_file"]),
    )
    with pytest.raises(ValueError, match=match):
      runtime.prepare(config, tmp_path / "out")
  for settings, match in (
      (dict(dataset="npz"), "needs --data_file"),
      (dict(data_file=str(tmp_path / "nan.npz")), "--dataset=npz"),
      (dict(split_file=str(split), num_clients=3), "holds 2 clients"),
      (
          dict(split_file=str(split), dirichlet_beta=0.5, dataset="mnist"),
          "does not apply with --split_file",
      ),
  ):
    with pytest.raises(ValueError, match=match):
      afl.get_config(**settings)
  assert not (tmp_path / "out").exists()


def test_a_split_built_by_hand_is_described_as_such(tmp_path):
  x, y = make_npz(tmp_path / "own.npz", uint8=False)
  idx = np.arange(400).reshape(4, 100)
  split = data_lib.ClientSplit(
      x.astype(np.float32),
      y.astype(np.int32),
      [i[:80] for i in idx],
      [i[80:] for i in idx],
      3,
      "mine",
  )
  results = afl.train_and_evaluate(
      afl.get_config(num_clients=4),
      tmp_path / "run",
      split=split,
      progress=False,
  )
  assert results["dataset"] == "mine"
  assert "Python API" in results["data"]["source"]
  saved = json.loads((tmp_path / "run" / "results.json").read_text())
  assert saved["data"]["arrays_sha256"] == results["data"]["arrays_sha256"]
  train, test = files.load_split(tmp_path / "run" / "split.npz", 400)
  np.testing.assert_array_equal(train[2], idx[2][:80])
