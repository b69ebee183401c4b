"""Several processes: the client blocks each process fills, and the
launcher (the runs on 2 processes against 1 are in test_runtime.py)."""

import os
import sys
import time

import jax
import numpy as np
import pytest

from afl import federated
from launch import local


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
