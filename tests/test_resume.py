"""Runs that can be trusted: a killed run resumes to the results of an
uninterrupted one, bit for bit; results are written as one unit; a
diverged run says so."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest

import afl
from afl import checkpoints
from afl import results as results_lib
import baselines  # pylint: disable=unused-import  (registers them)

_REPO = pathlib.Path(__file__).resolve().parents[1]
# The command line, SIGKILLed right after it saved its checkpoint of round
# KILL_AFTER (a real kill of a real process, at a known point).
_KILLED = """
import os, runpy, signal, sys
from afl import checkpoints
save = checkpoints.Checkpoints.save
def save_and_die(self, index, state, meta):
  save(self, index, state, meta)
  if index == int(os.environ["KILL_AFTER"]):
    os.kill(os.getpid(), signal.SIGKILL)
checkpoints.Checkpoints.save = save_and_die
sys.argv = ["experiments.run"] + sys.argv[1:]
runpy.run_module("experiments.run", run_name="__main__")
"""
SETTINGS = {
    "fedavg": dict(model="lr", rounds=6, local_steps=2),
    "pfedme": dict(model="lr", rounds=6, local_steps=2),
    "pfedacnnl": dict(model="lr", num_groups=3),
    "fedzo": dict(model="lr", rounds=6, local_steps=2),
    "persafl": dict(model="lr", rounds=6, local_steps=2),
}


def settings(algorithm):
  return dict(
      algorithm=algorithm,
      num_clients=10,
      checkpoint_every=1,
      **SETTINGS[algorithm],
  )


def command(algorithm, output_dir):
  flags = [f"--{k}={v}" for k, v in settings(algorithm).items()]
  return flags + [f"--output_dir={output_dir}"]


def assert_same_results(a: pathlib.Path, b: pathlib.Path):
  """Params bytes and every accuracy equal."""
  assert results_lib.params_path(a).read_bytes() == (
      results_lib.params_path(b).read_bytes()
  )
  first, second = (json.loads((d / "results.json").read_text()) for d in (a, b))
  for key in ("accuracy_per_round", "per_client_accuracy", "last_accuracy"):
    assert first[key] == second[key], key
  assert first["status"] == second["status"] == "completed"


# Killed after round 3 of 6; pFedACnnL-LR after its one meta-model round,
# between the stages (round 2 personalizes).
@pytest.mark.parametrize(
    "algorithm, kill_after", [("fedavg", 3), ("pfedme", 3), ("pfedacnnl", 1)]
)
def test_a_killed_run_resumes_to_the_uninterrupted_results(
    algorithm, kill_after, tmp_path
):
  out = tmp_path / "killed"
  killed = subprocess.run(
      [sys.executable, "-c", _KILLED, *command(algorithm, out)],
      cwd=_REPO,
      env=dict(os.environ, KILL_AFTER=str(kill_after)),
      capture_output=True,
      text=True,
  )
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  assert not (out / "results.json").exists()
  assert checkpoints.Checkpoints(out).latest() == kill_after
  again = subprocess.run(
      [sys.executable, "-m", "experiments.run", *command(algorithm, out)],
      cwd=_REPO,
      capture_output=True,
      text=True,
  )
  assert again.returncode == 0, again.stderr[-2000:]
  assert f"resuming after round {kill_after}" in again.stdout
  assert not (out / checkpoints.DIRECTORY).exists()  # removed when done
  afl.train_and_evaluate(
      afl.get_config(**settings(algorithm)), tmp_path / "whole", progress=False
  )
  assert_same_results(out, tmp_path / "whole")


@pytest.mark.parametrize("algorithm", ["fedzo", "persafl"])
def test_an_interrupted_run_resumes_to_the_uninterrupted_results(
    algorithm, tmp_path, monkeypatch
):
  config = afl.get_config(**settings(algorithm))
  afl.train_and_evaluate(config, tmp_path / "whole", progress=False)
  resumed = interrupt_and_resume(config, tmp_path / "part", 4, monkeypatch)
  assert resumed["resumed_after_round"] == 4
  assert_same_results(tmp_path / "part", tmp_path / "whole")


def interrupt_and_resume(config, output_dir, index, monkeypatch) -> dict:
  """Runs `config` into output_dir, interrupted right after round `index`'s
  checkpoint, then again (resuming); returns the second run's results."""
  save = checkpoints.Checkpoints.save

  def save_and_stop(self, round_index, state, meta):
    save(self, round_index, state, meta)
    if round_index == index:
      raise KeyboardInterrupt

  monkeypatch.setattr(checkpoints.Checkpoints, "save", save_and_stop)
  with pytest.raises(KeyboardInterrupt):
    afl.train_and_evaluate(config, output_dir, progress=False)
  monkeypatch.setattr(checkpoints.Checkpoints, "save", save)
  return afl.train_and_evaluate(config, output_dir, progress=False)


def test_a_run_in_progress_of_other_settings_is_refused(tmp_path, monkeypatch):
  config = afl.get_config(**settings("fedavg"))
  save = checkpoints.Checkpoints.save

  def save_and_stop(self, index, state, meta):
    save(self, index, state, meta)
    raise KeyboardInterrupt

  monkeypatch.setattr(checkpoints.Checkpoints, "save", save_and_stop)
  with pytest.raises(KeyboardInterrupt):
    afl.train_and_evaluate(config, tmp_path, progress=False)
  monkeypatch.setattr(checkpoints.Checkpoints, "save", save)
  other = afl.get_config(**dict(settings("fedavg"), lr=0.01))
  with pytest.raises(ValueError, match=r"fedavg.lr: 0.05 -> 0.01.*--overwrite"):
    afl.train_and_evaluate(other, tmp_path, progress=False)
  other.overwrite = True
  results = afl.train_and_evaluate(other, tmp_path, progress=False)
  assert (
      results["resumed_after_round"] is None
      and results["status"] == "completed"
  )


def test_a_killed_write_leaves_the_old_pair_or_the_new(tmp_path, monkeypatch):
  results_lib.write(tmp_path, {"accuracy": 0.1}, {"w": np.array([1.0])}, [0])
  old = results_lib.params_path(tmp_path)
  write = results_lib._write_durably  # pylint: disable=protected-access

  def params_then_die(path, payload):
    if path.name == results_lib.RESULTS:
      raise KeyboardInterrupt  # killed between the two files
    write(path, payload)

  monkeypatch.setattr(results_lib, "_write_durably", params_then_die)
  with pytest.raises(KeyboardInterrupt):
    results_lib.write(tmp_path, {"accuracy": 0.2}, {"w": np.array([2.0])}, [0])
  assert results_lib.params_path(tmp_path) == old  # the old pair, whole
  assert json.loads((tmp_path / "results.json").read_text())["accuracy"] == 0.1
  assert float(afl.load_params(tmp_path)["w"]) == 1.0
  monkeypatch.setattr(results_lib, "_write_durably", write)
  results_lib.write(tmp_path, {"accuracy": 0.3}, {"w": np.array([3.0])}, [0])
  assert float(afl.load_params(tmp_path)["w"]) == 3.0
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
      ["results.json", results_lib.params_path(tmp_path).name]
  )  # no stray files


def test_a_diverged_run_says_so_and_exits_non_zero(tmp_path):
  flags = command("fedavg", tmp_path) + ["--lr=1e38"]  # overflows
  done = subprocess.run(
      [sys.executable, "-m", "experiments.run", *flags],
      cwd=_REPO,
      capture_output=True,
      text=True,
  )
  assert done.returncode == 1, done.stderr[-2000:]
  assert "diverged at round 1" in done.stderr
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["status"] == "diverged" and results["diverged_round"] == 1


@pytest.mark.parametrize("value", [np.nan, np.inf, 1e20])
def test_bad_numbers_in_one_client_write_nothing(value, tmp_path):
  """A NaN or Inf feature is refused at load, a 1e20 one by the solve's
  guards (float32 products overflow); nothing is written either way."""
  config = afl.get_config(num_clients=10, model="lr")
  split = afl.runtime.prepare_split(config)
  x = split.x.copy()
  x[split.train_indices[3][0], 5] = value
  error = (
      afl.data.DataError
      if np.isnan(value) or np.isinf(value)
      else (afl.solve.NumericalError)
  )
  with pytest.raises(error, match="client 3"):
    afl.train_and_evaluate(config, tmp_path / "out", split._replace(x=x))
  assert not (tmp_path / "out").exists()
  with pytest.raises(ValueError, match="--gamma=inf must be finite"):
    afl.get_config(gamma=float("inf"))
