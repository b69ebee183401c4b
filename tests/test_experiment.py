"""The run loop's entry points: results files, accuracy floors, clear
errors, the command line and its config files."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import afl
from afl import data as data_lib
from afl import encoding
from afl import layers
from afl import models
from afl import results as results_lib
import baselines  # pylint: disable=unused-import  (registers them)
from tests import reference

_REPO = pathlib.Path(__file__).resolve().parents[1]


def config(**settings):
  return afl.get_config(**settings)


@pytest.fixture(scope="module")
def mnist_mlp(data_dir, tmp_path_factory):
  """The acceptance run: FedACnnL, MNIST-MLP, Dirichlet 0.1, 100 clients."""
  out = tmp_path_factory.mktemp("mnist_mlp")
  cfg = config(dataset="mnist", model="mlp", data_dir=str(data_dir))
  return cfg, out, afl.train_and_evaluate(cfg, out)


def test_results_file_has_what_a_researcher_needs(mnist_mlp):
  cfg, out, results = mnist_mlp
  on_disk = json.loads((out / "results.json").read_text())
  assert on_disk == json.loads(json.dumps(results))
  for key in (
      "algorithm",
      "dataset",
      "model",
      "num_clients",
      "seed",
      "accuracy",
      "best_accuracy",
      "last_accuracy",
      "accuracy_per_round",
      "per_client_accuracy",
      "rounds",
      "timing",
      "wall_time_s",
      "compile_time_s",
      "peak_memory_gb",
      "config",
  ):
    assert key in on_disk, key
  assert on_disk["algorithm"] == "fedacnnl" and on_disk["num_clients"] == 100
  assert len(on_disk["per_client_accuracy"]) == 100
  assert [r["round"] for r in on_disk["rounds"]] == [1, 2, 3]
  assert on_disk["accuracy_per_round"][:2] == [None, None]  # no model yet
  assert on_disk["wall_time_s"] > 0 and on_disk["compile_time_s"] > 0
  assert on_disk["config"]["fedacnnl"]["gamma"] == cfg.fedacnnl.gamma
  assert len(on_disk["timing"]["rounds"]) == 3
  counts = np.array(on_disk["per_client_test_samples"])
  per_client = np.array(on_disk["per_client_accuracy"], float)
  assert np.isclose(
      (per_client * counts).sum() / counts.sum(), on_disk["accuracy"]
  )


def test_each_run_reports_its_own_peak_memory(tmp_path):
  """Not the process's running maximum: a run after 1 GB was held and
  freed in the same process reports less than that."""
  held = np.ones(2**27)  # 1 GiB, touched
  before = results_lib.peak_memory_gb()
  del held
  results = afl.train_and_evaluate(
      config(model="lr", num_clients=10), tmp_path, progress=False
  )
  assert before >= 1.0 and results["peak_memory_gb"] < before - 0.5


def test_mnist_mlp_accuracy_floor(mnist_mlp):
  """Paper: 90.76%. Ours over seeds 0-4: 0.8895 .. 0.8934, mean 0.891."""
  assert mnist_mlp[2]["accuracy"] >= 0.885


def test_saved_params_reproduce_the_accuracy(mnist_mlp, data_dir):
  cfg, out, results = mnist_mlp
  params = afl.load_params(out)
  split = data_lib.prepare("mnist", data_dir=data_dir, seed=cfg.seed)
  model = models.get_model("mlp", 10)
  test = np.concatenate(split.test_indices)
  logits = model.apply(params, split.x[test].reshape(len(test), -1))
  accuracy = float((np.asarray(logits).argmax(-1) == split.y[test]).mean())
  assert accuracy == pytest.approx(results["accuracy"], abs=1e-9)


def test_mnist_weights_equal_centralized_float64(mnist_mlp, data_dir):
  """Acceptance: 1e-5 relative to float64 ACnnL on the pooled training data."""
  cfg, out, _ = mnist_mlp
  params = afl.load_params(out)["params"]
  split = data_lib.prepare("mnist", data_dir=data_dir, seed=cfg.seed)
  train = np.concatenate(split.train_indices)
  model = models.get_model("mlp", 10)
  expected = reference.centralized_acnnl(
      model,
      split.x[train].reshape(len(train), -1),
      split.y[train],
      encoding.label_encodings(cfg.seed, model, 10),
      cfg.fedacnnl.gamma,
  )
  for l, stage in enumerate(model.stages):
    got = layers.from_params(stage.layer, params[models.layer_name(l)])
    assert reference.relative_error(got, expected[l]) < 1e-5


def test_mnist_lr_accuracy_floor(data_dir, tmp_path):
  """Paper: 87.11%. Ours (seed 0): 0.8536."""
  results = afl.train_and_evaluate(
      config(dataset="mnist", model="lr", data_dir=str(data_dir)),
      tmp_path,
      progress=False,
  )
  assert results["accuracy"] >= 0.85


def test_existing_results_are_not_overwritten(tmp_path, capsys):
  cfg = config(num_clients=10)
  first = afl.train_and_evaluate(cfg, tmp_path)
  printed = capsys.readouterr().out  # progress without absl's logging set up
  assert "round 3/3" in printed and "test accuracy" in printed
  with pytest.raises(FileExistsError, match="--overwrite"):
    afl.train_and_evaluate(cfg, tmp_path)
  cfg.overwrite = True
  again = afl.train_and_evaluate(cfg, tmp_path, progress=False)
  assert again["accuracy"] == first["accuracy"]
  assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(algorithm="fedsgd"), "--algorithm='fedsgd' is not one of"),
        (dict(model="resnet"), "--model"),
        (dict(gamma=0.0), "--gamma=0.0 must be > 0"),
        (dict(gamma=float("inf")), "--gamma=inf must be finite"),
        (dict(test_fraction=1.0), "--test_fraction"),
        (dict(num_clients=0), "--num_clients"),
        (dict(statistics_dtype="float16"), "--statistics_dtype"),
        (dict(lr=0.1), "--lr does not apply to --algorithm=fedacnnl"),
        (dict(rounds=50), "--rounds does not apply"),
        (dict(eps=10.0), "--eps does not apply"),
        (dict(algorithm="pfedacnnl_wc", num_groups=4), "--num_groups"),
        (dict(min_client_size=5), "--min_client_size=5 is used only by"),
        (dict(dataset="mnist", synthetic_alpha=1.0), "--synthetic_alpha"),
        (dict(width=0.5), "--width=0.5 is used only by --model=dcnn"),
        (dict(algorithm="pfedacnnl", num_groups=200), "--num_groups=200"),
        (dict(algorithm="fedavg", batch_size=0), "--batch_size=0 must be >="),
        (dict(algorithm="pfedme", init="torch"), "--init='torch' is not one"),
        (dict(init="flax"), "--init does not apply to --algorithm=fedacnnl"),
        (dict(algorithm="persafl", local_steps=0), "--local_steps > 0"),
        (dict(foo=1), "unknown setting --foo"),
    ],
)
def test_bad_settings_are_named(settings, message):
  with pytest.raises(ValueError, match=message):
    config(**settings)


def test_a_config_built_by_hand_is_checked(tmp_path):
  cfg = config()
  cfg.fedacnnl.gamma = -1.0
  with pytest.raises(ValueError, match="--gamma"):
    afl.train_and_evaluate(cfg, tmp_path)
  cfg = config()
  cfg.pfedme = config(algorithm="pfedme").pfedme
  with pytest.raises(ValueError, match="config.pfedme holds settings"):
    afl.train_and_evaluate(cfg, tmp_path)
  cfg = config(num_devices=99)
  with pytest.raises(ValueError, match="--num_devices=99"):
    afl.train_and_evaluate(cfg, tmp_path)
  assert not list(tmp_path.iterdir())  # nothing written


def test_paper_defaults_by_dataset():
  assert config(algorithm="pfedme").pfedme.lam == 20.0  # synthetic
  mnist = config(algorithm="pfedme", dataset="mnist")
  assert mnist.pfedme.lam == 15.0 and mnist.pfedme.rounds == 20
  assert config(algorithm="persafl", personalization="me").persafl.lr == 0.005
  assert config(algorithm="persafl").persafl.lr == 0.05  # maml: meta_fedavg
  for name in ("fedavg", "pfedme", "baffle", "meta_fedavg", "persafl"):
    assert config(algorithm=name)[name].init == "pytorch"  # their code's


def test_missing_dataset_names_the_folder(tmp_path):
  with pytest.raises(data_lib.DataError, match=str(tmp_path)):
    afl.train_and_evaluate(
        config(dataset="mnist", data_dir=str(tmp_path), data_source="files"),
        tmp_path / "out",
    )


def run_command(*flags):
  return subprocess.run(
      [sys.executable, "-m", "experiments.run", *flags],
      cwd=_REPO,
      capture_output=True,
      text=True,
  )


def test_command_line(tmp_path):
  """The README's main command, shrunk: flags in, results.json out; a
  config file (here that run's results.json) in, the same config out."""
  out = tmp_path / "run"
  done = run_command(
      "--dataset=synthetic",
      "--num_clients=12",
      "--seed=3",
      f"--output_dir={out}",
  )
  assert done.returncode == 0, done.stderr
  assert "round 3/3" in done.stdout
  results = json.loads((out / "results.json").read_text())
  assert results["num_clients"] == 12 and results["seed"] == 3
  assert 0.3 < results["accuracy"] <= 1.0
  again = run_command(f"--config={out / 'results.json'}", "--dry_run")
  assert again.returncode == 0, again.stderr
  assert json.loads(again.stdout) == results["config"]
  bad = run_command("--model=vgg", f"--output_dir={out}")
  assert bad.returncode == 2 and "--model" in bad.stderr
  for flag, message in (
      ("--lr=0.1", "--lr does not apply"),
      ("--num_clients=0", "--num_clients=0 must be >= 1"),
      ("--seed=-1", "--seed=-1 must be >= 0"),
  ):
    other = run_command(flag, f"--output_dir={tmp_path / 'other'}")
    assert other.returncode == 2, other.stderr
    assert other.stderr.startswith("experiments.run: error: "), other.stderr
    assert message in other.stderr and other.stderr.count("\n") == 1
  assert not (tmp_path / "other").exists()
  assert run_command("--help").returncode == 0


def test_pfedacnnl_run_reports_groups_and_personal_models(data_dir, tmp_path):
  """MNIST-MLP, 100 clients: personalized accuracy (paper 96.23%; ours
  0.9631 at seed 0), the grouping, and each client's own saved model."""
  cfg = config(algorithm="pfedacnnl", dataset="mnist", data_dir=str(data_dir))
  results = afl.train_and_evaluate(cfg, tmp_path, progress=False)
  assert results["accuracy"] >= 0.955
  assert len(results["group_sizes"]) == 10
  assert sum(results["group_sizes"]) == 100
  assert [r["stage"] for r in results["rounds"]] == (
      ["federated"] * 3 + ["personalization"] * 3
  )
  split = data_lib.prepare("mnist", data_dir=data_dir, seed=cfg.seed)
  model = models.get_model("mlp", 10)
  for client in (0, 57):
    params = afl.load_params(tmp_path, client)
    test = split.test_indices[client]
    logits = model.apply(params, split.x[test].reshape(len(test), -1))
    accuracy = float((np.asarray(logits).argmax(-1) == split.y[test]).mean())
    assert accuracy == pytest.approx(results["per_client_accuracy"][client])


def test_table2_writes_the_table_and_resumes(tmp_path):
  """A one-cell-per-column Table II; a second call reuses the saved runs."""
  command = [
      sys.executable,
      "-m",
      "experiments.table2",
      "--settings=synthetic-lr",
      "--columns=fedacnnl,pfedacnnl_wc",
      "--seeds=2",
      "--num_clients=10",
      f"--output_dir={tmp_path}",
  ]
  subprocess.run(command, cwd=_REPO, check=True, capture_output=True)
  table = json.loads((tmp_path / "table2.json").read_text())
  cell = table["synthetic-lr"]["pfedacnnl_wc"]
  assert cell["paper"] == 87.81 and len(cell["seeds"]) == 2
  assert cell["mean"] == pytest.approx(np.mean(cell["seeds"]))
  saved = tmp_path / "synthetic-lr" / "fedacnnl" / "seed_1" / "results.json"
  config = json.loads(saved.read_text())["config"]  # the cell's, nested
  assert config["algorithm"] == "fedacnnl" and config["seed"] == 1
  assert config["data_seed"] == 0 and config["num_clients"] == 10
  assert config["fedacnnl"]["gamma"] == 100
  before = saved.stat().st_mtime_ns
  again = subprocess.run(
      command, cwd=_REPO, check=True, capture_output=True, text=True
  )
  assert saved.stat().st_mtime_ns == before
  assert "synthetic-lr pfedacnnl_wc seed 1:" in again.stdout
  assert json.loads((tmp_path / "table2.json").read_text()) == table
  assert "pFedACnnL-WC" in (tmp_path / "table2.md").read_text()
  # --missing=skip assembles the saved seeds and runs none: seed 2 is left
  # out, and each cell says what it rests on; a run kept as its cell.json
  # alone (as the repository keeps Table II's) counts as saved.
  saved.unlink()
  skipped = [c for c in command if not c.startswith("--seeds")]
  subprocess.run(
      [*skipped, "--seeds=3", "--missing=skip"],
      cwd=_REPO,
      check=True,
      capture_output=True,
  )
  assert not (tmp_path / "synthetic-lr" / "fedacnnl" / "seed_2").exists()
  assert json.loads((tmp_path / "table2.json").read_text()) == table
  assert "(paper 87.81; 2 seeds)" in (tmp_path / "table2.md").read_text()
