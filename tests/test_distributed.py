"""Several processes: 2 processes x 2 CPU devices == 1 process; the launcher.

The multi-process run spawns real processes through `launch.local` (a
coordinator on a free localhost port, gloo collectives), each filling only
its own devices' client blocks, and compares the saved weights with the same
configuration run in this process.
"""

import json
import os
import pathlib
import sys
import time

import jax
import numpy as np
import pytest

from afl import experiment
from afl import federated
from launch import local
from tests import distributed_worker


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
  out = tmp_path_factory.mktemp("two_processes")
  status = local.run_local(
      [sys.executable, "-m", "tests.distributed_worker", str(out)],
      num_processes=2,
      devices_per_process=2,
      log_dir=out / "logs",
  )
  logs = "\n".join(p.read_text() for p in sorted((out / "logs").glob("*")))
  assert status == 0, logs
  return out, logs


@pytest.mark.parametrize("algorithm", list(distributed_worker.CONFIGS))
def test_two_processes_give_the_weights_of_one(
    two_processes, algorithm, tmp_path
):
  out, logs = two_processes
  assert "process 1 of 2: 2 local / 4 global devices" in logs
  one = experiment.run_experiment(
      distributed_worker.config(algorithm), tmp_path
  )
  saved = out / algorithm
  results = json.loads((saved / "results.json").read_text())
  assert results["num_processes"] == 2 and results["num_devices"] == 4
  assert results["client_group"] == one["client_group"]
  assert results["per_client_test_samples"] == one["per_client_test_samples"]
  assert results["accuracy"] == pytest.approx(one["accuracy"], abs=1e-9)
  models = set()
  for client in range(one["num_clients"]):
    a = experiment.load_params(saved / "params.msgpack", client)
    b = experiment.load_params(tmp_path / "params.msgpack", client)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(x, y, rtol=0, atol=1e-5)
    models.add(float(jax.tree.leaves(a)[0].sum()))
  # pFedACnnL's personalized models differ between clients.
  assert len(models) == (1 if algorithm == "fedacnnl" else one["num_clients"])


def test_distribute_on_one_process_is_shard_of_federate():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(300, 5)).astype(np.float32)
  y = rng.integers(0, 3, 300)
  indices = np.array_split(rng.permutation(300), 7)
  mesh = federated.client_mesh(jax.devices()[:4])
  order = [3, 1, 0, 2, 6, 5, 4]
  want = federated.federate(x, y, indices, 8, num_shards=4, order=order)
  got = federated.distribute(x, y, indices, mesh, 8, order=order)
  for field in ("x", "y", "mask", "client"):
    np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
  assert got.x.sharding == federated.block_sharding(mesh)


def test_child_environment_sets_the_device_count():
  env = local.child_environment(
      {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --other"},
      "localhost:1234",
      3,
      2,
      4,
  )
  assert env["XLA_FLAGS"].split() == [
      "--other",
      "--xla_force_host_platform_device_count=4",
  ]
  assert env["AFL_PROCESS_ID"] == "2" and env["AFL_NUM_PROCESSES"] == "3"


def test_launcher_reports_a_crashed_child_and_stops_the_others(tmp_path):
  # Process 1 fails at once; process 0 would sleep for a minute.
  script = (
      "import os, sys, time\n"
      "i = os.environ['AFL_PROCESS_ID']\n"
      "path = os.path.join(sys.argv[1], 'pid' + i)\n"
      "open(path, 'w').write(str(os.getpid()))\n"
      "print('child', i, 'up', flush=True)\n"
      "sys.exit(3) if i == '1' else time.sleep(60)\n"
  )
  start = time.monotonic()
  status = local.run_local(
      [sys.executable, "-c", script, str(tmp_path)],
      num_processes=2,
      devices_per_process=1,
      log_dir=tmp_path / "logs",
      grace_s=5,
  )
  assert status == 3
  assert time.monotonic() - start < 30
  assert "child 1 up" in (tmp_path / "logs" / "process_1.log").read_text()
  survivor = int((tmp_path / "pid0").read_text())
  with pytest.raises(ProcessLookupError):  # stopped and reaped
    os.kill(survivor, 0)
