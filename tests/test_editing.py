"""Editing a trained analytic federation (`afl.editing`): unlearning equals
retraining without the clients, joining equals training with them, the
groups an edit does not touch keep their models bit for bit."""

import json
import subprocess
import sys

import flax.serialization
import jax
import numpy as np
import pytest

import afl
import baselines  # pylint: disable=unused-import  (registers fedavg)
from afl import analytic
from afl import editing
from afl import federated
from afl import models
from afl import results as results_lib
from afl.data import files

NUM_CLIENTS = 12


def make_npz(path, n=1200):
  """n 8 x 8 x 1 images of 4 classes: class c brightens row block c."""
  rng = np.random.default_rng(0)
  y = rng.integers(0, 4, n)
  x = rng.integers(0, 60, (n, 8, 8, 1))
  for c in range(4):
    x[y == c, 2 * c : 2 * c + 2] += 150
  np.savez(path, x=x.astype(np.uint8), y=y)


def settings(tmp, algorithm, **more):
  return dict(
      algorithm=algorithm,
      dataset="npz",
      data_file=str(tmp / "own.npz"),
      statistics_dtype="float64",
      **more,
  )


def train(tmp, name, split_file=None, **config):
  """A run of `config` in tmp/name (over the split file, if given)."""
  extra = {} if split_file is None else dict(split_file=str(split_file))
  if split_file is None:
    extra["num_clients"] = NUM_CLIENTS
  afl.train_and_evaluate(
      afl.get_config(**config, **extra), tmp / name, progress=False
  )
  return tmp / name


def params_of(run_dir):
  saved = flax.serialization.msgpack_restore(
      results_lib.params_path(run_dir).read_bytes()
  )
  return saved["models"], np.asarray(saved["client_model"])


def client_split(run_dir, clients, path):
  """A split file of `clients` of run_dir's split (in that order)."""
  with np.load(run_dir / "split.npz") as arrays:
    train = np.split(arrays["train_indices"], arrays["train_offsets"][1:-1])
    test = np.split(arrays["test_indices"], arrays["test_offsets"][1:-1])
  files.save_split(
      path, [train[c] for c in clients], [test[c] for c in clients]
  )
  return path


def assert_close(edited_params, edited_model, params, client_model, rtol=1e-5):
  """Every client's model of the two runs equal to rtol (relative to each
  leaf's largest entry)."""
  for a, b in zip(jax.tree.leaves(edited_params), jax.tree.leaves(params)):
    a, b = a[edited_model], b[client_model]
    scale = np.abs(b).max()
    assert np.abs(a - b).max() <= rtol * scale, np.abs(a - b).max() / scale


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
  path = tmp_path_factory.mktemp("editing")
  make_npz(path / "own.npz")
  return path


@pytest.fixture(scope="module")
def mlp_run(tmp):
  return train(tmp, "mlp", **settings(tmp, "fedacnnl", model="mlp"))


@pytest.fixture(scope="module")
def pfedacnnl_run(tmp):
  return train(
      tmp, "pfed", **settings(tmp, "pfedacnnl", model="mlp", num_groups=3)
  )


@pytest.mark.parametrize("leaving", [[0, 5, 11]])
def test_fedacnnl_unlearned_equals_retrained_without_the_clients(
    mlp_run, tmp, leaving
):
  source = editing.load(mlp_run)
  edited = editing.unlearn(source, leaving, progress=False)
  stay = [c for c in range(NUM_CLIENTS) if c not in leaving]
  retrained = train(
      tmp,
      f"mlp_without_{'_'.join(map(str, leaving))}",
      client_split(mlp_run, stay, tmp / f"stay{len(stay)}.npz"),
      **settings(tmp, "fedacnnl", model="mlp"),
  )
  assert_close(edited.params, edited.client_model, *params_of(retrained))
  record = edited.results["edit"]
  assert record["removed"] == leaving and record["touched_groups"] == [0]
  assert edited.results["num_clients"] == len(stay)


def test_a_small_conv_net_unlearns_exactly_and_rejoins(tmp):
  config = settings(tmp, "fedacnnl_wa", model="dcnn", width=0.01)
  run = train(tmp, "dcnn", **config)
  source = editing.load(run)
  edited = editing.unlearn(source, [2, 7], progress=False)
  stay = [c for c in range(NUM_CLIENTS) if c not in (2, 7)]
  retrained = train(
      tmp,
      "dcnn_without",
      client_split(run, stay, tmp / "dcnn_stay.npz"),
      **config,
  )
  assert_close(edited.params, edited.client_model, *params_of(retrained))
  # join(train(all but S), S) = train(all): the clients in another order.
  editing.write(edited, tmp / "dcnn_edited")
  back = editing.join(
      editing.load(tmp / "dcnn_edited"),
      editing.newcomers_from(source, run / "split.npz", [2, 7]),
      progress=False,
  )
  assert_close(back.params, back.client_model, *params_of(run))


def reference(source, clients, groups, personalized):
  """analytic.train (not the editing code) on the source's `clients`
  with the grouping fixed; (params, client_model) per client."""
  config = source.config
  hparams = config[config.algorithm]
  model = models.get_model(config.model, source.split.num_classes)
  mesh = federated.client_mesh()
  inputs = source.split.x.reshape(len(source.split.x), -1)
  algorithm = analytic.build_fedacnnl(
      model,
      num_classes=source.split.num_classes,
      input_shape=inputs.shape[1:],
      mesh=mesh,
      gamma=hparams.gamma,
      encoding_seed=config.seed,
      statistics_dtype=hparams.statistics_dtype,
  )
  groups = np.unique(groups, return_inverse=True)[1]  # numbered 0..K'-1
  data = federated.distribute(
      inputs,
      source.split.y,
      [source.split.train_indices[c] for c in clients],
      mesh,
      order=np.argsort(groups, kind="stable"),
  )
  trained = analytic.train(
      algorithm,
      data,
      jax.random.key(0),
      groups,
      eps=hparams.get("eps", 1.0),
      personalized=personalized,
  )
  return jax.tree.map(np.asarray, trained.params), trained.client_model


def whole_group(source):
  sizes = source.server.group_sizes
  k = int(np.argmin(np.where(sizes > 1, sizes, 99)))
  return np.flatnonzero(source.server.client_group == k).tolist()


@pytest.mark.parametrize("which", ["one", "several", "group"])
def test_pfedacnnl_unlearned_equals_retrained_and_untouched_groups_are_kept(
    pfedacnnl_run, which
):
  source = editing.load(pfedacnnl_run)
  groups = source.server.client_group
  leaving = {"one": [1], "several": [1, 6, 9], "group": whole_group(source)}[
      which
  ]
  edited = editing.unlearn(source, leaving, progress=False)
  stay = np.setdiff1d(np.arange(NUM_CLIENTS), leaving)
  assert_close(
      edited.params,
      edited.client_model,
      *reference(source, stay, groups[stay], personalized=True),
  )
  touched = set(edited.results["edit"]["touched_groups"])
  assert touched == set(groups[leaving]) - (
      {groups[leaving[0]]} if which == "group" else set()
  )
  if which == "group":
    assert edited.results["edit"]["dropped_groups"] == [groups[leaving[0]]]
  untouched = [i for i, c in enumerate(stay) if groups[c] not in touched]
  assert untouched  # the test means something
  for a, b in zip(
      jax.tree.leaves(edited.params), jax.tree.leaves(source.params)
  ):
    np.testing.assert_array_equal(  # bit for bit
        a[edited.client_model[untouched]],
        b[source.client_model[stay[untouched]]],
    )


def test_meta_models_unlearn_and_join_exactly(tmp):
  run = train(
      tmp, "wp", **settings(tmp, "pfedacnnl_wp", model="mlp", num_groups=3)
  )
  source = editing.load(run)
  groups = source.server.client_group
  edited = editing.unlearn(source, [3, 8], progress=False)
  stay = np.setdiff1d(np.arange(NUM_CLIENTS), [3, 8])
  params, client_model = reference(source, stay, groups[stay], False)
  assert_close(edited.params, edited.client_model, params, client_model)
  editing.write(edited, tmp / "wp_edited")
  back = editing.join(
      editing.load(tmp / "wp_edited"),
      editing.newcomers_from(source, run / "split.npz", [3, 8]),
      progress=False,
  )
  # The newcomers went back to their groups (nearest centroid), and the
  # meta-models are the full run's.
  order = np.concatenate([stay, [3, 8]])
  np.testing.assert_array_equal(back.server.client_group, groups[order])
  params, client_model = params_of(run)
  assert_close(back.params, back.client_model, params, client_model[order])


def test_a_large_client_leaving_a_small_group_loses_no_accuracy(tmp):
  """Ill-conditioned subtraction: client 0 holds 95% of the samples and
  leaves; the float64 sums keep the rest exact (module docstring's bound)."""
  with np.load(tmp / "own.npz") as arrays:
    n = len(arrays["y"])
  order = np.random.default_rng(1).permutation(n)
  big, rest = order[: int(0.95 * n)], order[int(0.95 * n) :]
  small = np.array_split(rest, 4)
  path = tmp / "lopsided.npz"
  files.save_split(
      path,
      [big[:-50]] + [s[:-5] for s in small],
      [big[-50:]] + [s[-5:] for s in small],
  )
  config = settings(tmp, "fedacnnl", model="mlp")
  run = train(tmp, "lopsided", path, **config)
  edited = editing.unlearn(editing.load(run), [0], progress=False)
  retrained = train(
      tmp,
      "lopsided_without",
      client_split(run, [1, 2, 3, 4], tmp / "l4.npz"),
      **config,
  )
  assert_close(edited.params, edited.client_model, *params_of(retrained), 1e-8)


def test_the_command_line_edits_and_refuses_bad_edits(pfedacnnl_run, tmp):
  def edit(*flags):
    return subprocess.run(
        [sys.executable, "-m", "experiments.edit", f"--from={pfedacnnl_run}"]
        + list(flags),
        capture_output=True,
        text=True,
    )

  out = edit("--remove_clients=2", f"--output_dir={tmp / 'cli'}")
  assert out.returncode == 0, out.stderr
  results = json.loads((tmp / "cli" / "results.json").read_text())
  assert results["edit"]["removed"] == [2] and results["num_clients"] == 11
  assert results["files"]["server_state.npz"] > 0
  for flags, message in [
      (["--remove_clients=12"], "out of range: there are 12 clients"),
      (["--remove_clients=a"], "--remove_clients takes client ids"),
      (["--add_clients=1"], "--add_clients needs --add_from"),
      (
          [f"--add_from={pfedacnnl_run / 'split.npz'}", "--add_clients=2"],
          "samples of the run's client 2",
      ),
      ([], "nothing to edit"),
  ]:
    out = edit(*flags, f"--output_dir={tmp / 'refused'}")
    assert out.returncode == 2 and message in out.stderr, out.stderr
  assert not (tmp / "refused").exists()


def test_runs_that_cannot_be_edited_say_why(tmp):
  fedavg = train(
      tmp,
      "fedavg",
      algorithm="fedavg",
      dataset="npz",
      data_file=str(tmp / "own.npz"),
      model="lr",
      rounds=1,
  )
  with pytest.raises(ValueError, match="only the analytic algorithms"):
    editing.load(fedavg)
  partial = train(
      tmp, "partial", **settings(tmp, "fedacnnl", model="lr", dropout=0.2)
  )
  with pytest.raises(ValueError, match="ran with --dropout=0.2"):
    editing.load(partial)
