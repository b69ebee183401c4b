"""Numeric guards: non-finite inputs are rejected at load."""

import numpy as np
import pytest

from afl import data as data_lib

BAD = 3  # the client whose data is spoiled (a 10-sample client: dual form)
SIZES = (150, 200, 120, 10, 180, 90, 12, 130, 100, 8)


@pytest.fixture(scope="module")
def synthetic():
  """1,000 synthetic samples over 10 clients of uneven sizes (some small
  enough for the dual form of eq. 13)."""
  x, y, _ = data_lib.synthetic(0.5, 0.5, num_clients=6, seed=2)
  x, y = x[: sum(SIZES)].astype(np.float32), y[: sum(SIZES)]
  clients = np.split(np.arange(sum(SIZES)), np.cumsum(SIZES)[:-1])
  return x, y, clients


# Non-finite data are rejected at load.


def client_split(x, y, clients):
  train, test = data_lib.split_train_test(clients, 0.25, seed=0)
  return data_lib.ClientSplit(x, y, train, test, 10, "synthetic")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_features_are_rejected_naming_client_and_sample(
    synthetic, value
):
  x, y, clients = synthetic
  split = client_split(x.copy(), y, clients)
  data_lib.check_finite(split)  # clean: passes
  sample = split.test_indices[BAD][0]
  split.x[sample, 7] = value
  with pytest.raises(data_lib.DataError) as error:
    data_lib.check_finite(split)
  assert (
      f"non-finite features in 1 sample(s) of 1 client(s): client {BAD} "
      f"(test sample {sample}: {np.float32(value)})" in str(error.value)
  )


def test_only_the_clients_samples_are_checked(synthetic):
  x, y, clients = synthetic
  x = np.concatenate([x, np.full((1, 60), np.nan, np.float32)])
  data_lib.check_finite(client_split(x, np.append(y, 0), clients))


def test_prepare_checks_its_split(monkeypatch):
  generator = data_lib.synthetic

  def with_a_nan(*args, **kwargs):
    x, y, clients = generator(*args, **kwargs)
    x = x.copy()
    x[clients[2][0], 0] = np.nan
    return x, y, clients

  monkeypatch.setattr("afl.data.pipeline.synthetic_lib.synthetic", with_a_nan)
  with pytest.raises(data_lib.DataError, match=r"client 2 \((train|test) "):
    data_lib.prepare("synthetic", num_clients=5)
