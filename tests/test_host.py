"""The CPU host defaults (`afl.host`): a device per core, one thread each,
unless the environment already says otherwise."""

import os
import subprocess
import sys

import pytest

from afl import host

DEVICES = "--xla_force_host_platform_device_count"
THREAD = "--xla_cpu_multi_thread_eigen"


@pytest.fixture(autouse=True)
def no_backend_yet(monkeypatch):
  """As in a process where JAX has not started (this one has)."""
  monkeypatch.setattr(host, "_backend_started", lambda: False)


def test_defaults_add_a_device_per_core_and_one_thread():
  environ = {}
  added = host.apply_defaults(environ)
  devices = min(host.cores(), host.MAX_DEVICES)
  assert added == [f"{DEVICES}={devices}", f"{THREAD}=false"]
  assert environ["XLA_FLAGS"] == " ".join(added)
  assert environ["OPENBLAS_NUM_THREADS"] == "1"


def test_flags_already_set_win_and_off_adds_nothing():
  environ = {"XLA_FLAGS": f"--xla_dump_to=/tmp/x {DEVICES}=3"}
  assert host.apply_defaults(environ) == [f"{THREAD}=false"]
  assert (
      environ["XLA_FLAGS"] == f"--xla_dump_to=/tmp/x {DEVICES}=3 {THREAD}=false"
  )
  environ = {"XLA_FLAGS": f"{THREAD}=true", "OPENBLAS_NUM_THREADS": "4"}
  assert host.apply_defaults(environ) == [f"{DEVICES}={min(host.cores(), 8)}"]
  assert environ["OPENBLAS_NUM_THREADS"] == "4"
  environ = {"AFL_CPU_DEFAULTS": "off"}
  assert host.apply_defaults(environ) == []
  assert "XLA_FLAGS" not in environ


def test_nothing_is_added_once_a_backend_has_started(monkeypatch):
  monkeypatch.setattr(host, "_backend_started", lambda: True)
  environ = {}
  assert host.apply_defaults(environ) == []
  assert "XLA_FLAGS" not in environ


def _device_count(**env) -> int:
  environ = {
      k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", host.ENV)
  }
  code = "import afl, jax; print(jax.device_count())"
  out = subprocess.run(
      [sys.executable, "-c", code],
      env=dict(environ, JAX_PLATFORMS="cpu", **env),
      capture_output=True,
      text=True,
      check=True,
  )
  return int(out.stdout.split()[-1])


def test_importing_afl_gives_a_device_per_core():
  assert _device_count() == min(host.cores(), host.MAX_DEVICES)
  assert _device_count(AFL_CPU_DEFAULTS="off") == 1
