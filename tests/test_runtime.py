"""The one runtime: the registry, every algorithm through the one loop on 1
and 2 processes, run-or-reuse, and an import graph without cycles."""

import ast
import json
import os
import pathlib
import sys

import jax
import numpy as np
import pytest

import afl
from afl import checkpoints
from afl import registry
import baselines  # pylint: disable=unused-import  (registers the baselines)
from launch import local
from tests import distributed_worker

_REPO = pathlib.Path(__file__).resolve().parents[1]
_PACKAGES = ("afl", "baselines", "experiments", "launch")


def test_every_algorithm_is_registered_with_its_settings():
  assert set(registry.names()) == set(distributed_worker.SETTINGS)
  assert registry.settings_of("fedacnnl") == (
      "gamma",
      "statistics_dtype",
      "initial_batch_size",
      "secure_sum",
      "secure_sum_neighbours",
      "secure_sum_threshold",
      "secure_sum_bound",
      "dp_mode",
      "dp_epsilon",
      "dp_delta",
      "dp_clip",
  )
  for name in registry.names():
    config = afl.get_config(algorithm=name)
    assert set(config[name]) == set(registry.settings_of(name)), name


def _imports(path: pathlib.Path):
  """(module-level imports, imports inside functions) of project modules."""
  tree = ast.parse(path.read_text())
  top, nested = set(), set()

  def names(node):
    if isinstance(node, ast.Import):
      return [a.name for a in node.names]
    if node.module is None:
      return []
    modules = [node.module]
    modules += [f"{node.module}.{a.name}" for a in node.names]
    return modules

  for node in ast.walk(tree):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      found = {n for n in names(node) if n.split(".")[0] in _PACKAGES}
      top |= found
  for function in ast.walk(tree):
    if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
      for node in ast.walk(function):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
          nested |= {n for n in names(node) if n.split(".")[0] in _PACKAGES}
  return top - nested, nested


def import_graph() -> dict[str, set[str]]:
  """module -> the project modules it imports (`from a import b` counts as
  a.b when that is a module, else a)."""
  paths = {}
  for package in _PACKAGES:
    for path in (_REPO / package).rglob("*.py"):
      parts = path.relative_to(_REPO).with_suffix("").parts
      name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
      paths[name] = path
  graph = {}
  for name, path in paths.items():
    top, nested = _imports(path)
    assert not nested, f"{name} imports {sorted(nested)} inside a function"
    graph[name] = {m for m in top if m in paths}
    graph[name] -= {m.rsplit(".", 1)[0] for m in graph[name] if "." in m}
  return graph


def test_the_import_graph_has_no_cycle_and_layers():
  graph = import_graph()
  for name, imported in graph.items():
    if name.startswith("afl"):
      assert not {m for m in imported if not m.startswith("afl")}, name
    if name.startswith("baselines"):
      assert not {m for m in imported if m.split(".")[0] in ("experiments",)}
  state = {}

  def visit(node, path):
    state[node] = "open"
    for nxt in graph[node]:
      assert state.get(nxt) != "open", " -> ".join(path + [node, nxt])
      if nxt not in state:
        visit(nxt, path + [node])
    state[node] = "done"

  for node in graph:
    if node not in state:
      visit(node, [])


def test_the_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
  """The import-graph test can fail: a cycle planted in a copy is found."""
  for package in _PACKAGES:
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
  (tmp_path / "afl" / "a.py").write_text("from afl import b\n")
  (tmp_path / "afl" / "b.py").write_text("from afl import a\n")
  monkeypatch.setattr(sys.modules[__name__], "_REPO", tmp_path)
  with pytest.raises(
      AssertionError, match="afl.a -> afl.b -> afl.a|afl.b -> afl.a -> afl.b"
  ):
    test_the_import_graph_has_no_cycle_and_layers()
  (tmp_path / "afl" / "b.py").write_text("def f():\n  from afl import a\n")
  with pytest.raises(AssertionError, match="inside a function"):
    import_graph()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
  """Every registered algorithm, 2 processes x 2 CPU devices."""
  out = tmp_path_factory.mktemp("two_processes")
  status = local.run_local(
      [sys.executable, "-m", "tests.distributed_worker", str(out)],
      num_processes=2,
      devices_per_process=2,
      log_dir=out / "logs",
  )
  logs = "\n".join(p.read_text() for p in sorted((out / "logs").glob("*")))
  assert status == 0, logs[-5000:]
  return out


@pytest.mark.parametrize("algorithm", list(distributed_worker.SETTINGS))
def test_two_processes_give_the_weights_of_one(
    two_processes, algorithm, tmp_path
):
  """The same run on 1 process x 4 devices: the same final weights (1e-5)
  and results (process 1 may not write: it fails if it does)."""
  saved = two_processes / algorithm
  one = afl.train_and_evaluate(
      distributed_worker.config(algorithm, num_devices=4),
      tmp_path,
      progress=False,
  )
  results = json.loads((saved / "results.json").read_text())
  assert results["num_processes"] == 2 and results["num_devices"] == 4
  assert results["per_client_test_samples"] == one["per_client_test_samples"]
  assert results["accuracy"] == pytest.approx(one["accuracy"], abs=1e-9)
  assert len(results["rounds"]) == len(one["rounds"])
  for client in range(one["num_clients"]):
    a = afl.load_params(saved, client)
    b = afl.load_params(tmp_path, client)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_two_processes_checkpoint_and_resume(tmp_path):
  """Both processes save every round and stop after round 1's checkpoint;
  the rerun resumes there and ends as the uninterrupted run."""

  def launch(**env):
    os.environ.update(env)
    try:
      return local.run_local(
          [
              sys.executable,
              "-m",
              "tests.distributed_worker",
              str(tmp_path),
              "pfedme",
          ],
          num_processes=2,
          devices_per_process=2,
          log_dir=tmp_path / "logs",
      )
    finally:
      for name in env:
        del os.environ[name]

  assert launch(CHECKPOINT_EVERY="1", STOP_AFTER="1") == 3
  assert checkpoints.Checkpoints(tmp_path / "pfedme").latest() == 1
  assert launch(CHECKPOINT_EVERY="1") == 0
  results = json.loads((tmp_path / "pfedme" / "results.json").read_text())
  assert results["resumed_after_round"] == 1
  whole = afl.train_and_evaluate(
      distributed_worker.config("pfedme", num_devices=4),
      tmp_path / "one",
      progress=False,
  )
  assert results["accuracy_per_round"] == pytest.approx(
      whole["accuracy_per_round"], abs=1e-9
  )


def test_run_or_reuse_reuses_only_the_same_configuration(tmp_path):
  config = afl.get_config(num_clients=10, model="lr")
  first = afl.run_or_reuse(config, tmp_path)
  mtime = (tmp_path / "results.json").stat().st_mtime_ns
  assert afl.run_or_reuse(config, tmp_path) == json.loads(json.dumps(first))
  assert (tmp_path / "results.json").stat().st_mtime_ns == mtime
  other = afl.get_config(num_clients=10, model="lr", gamma=10.0)
  with pytest.raises(ValueError, match=r"fedacnnl.gamma: 100.0 -> 10.0"):
    afl.run_or_reuse(other, tmp_path)
