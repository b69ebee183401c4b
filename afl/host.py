"""How a CPU host runs the computations: a CPU device per core, one thread
each, chosen by measurement (`experiments.benchmark_threading`,
experiments/README.md).

JAX's default on a CPU host is one device whose operations XLA splits over
a pool of threads, one per core. The work here is many small operations
(a client's local step on a batch of 20, a block's statistics), where the
pool gains little or loses: on 2 cores, pFedMe's MNIST-MLP round took 1.5x
the time of a process pinned to one core, FedAvg's as long. Clients are
independent, so the cores are better used on different clients: with a CPU
device per core the runtime shards the clients over the devices
(`afl.federated`'s mesh, `afl.lanes`), and each device runs its share on
one thread (`--xla_cpu_multi_thread_eigen=false`). Measured on 2 cores (FedAvg,
pFedMe, FedACnnL, pFedACnnL; experiments/README.md): 0.56-0.64x the time
of one pinned core, 0.40-0.94x the time of JAX's default. One thread per
device also avoids a deadlock seen when several CPU devices share Eigen's
pool (`tests/conftest.py`).

`apply_defaults` adds both XLA flags to XLA_FLAGS unless they are there
already (a user's, the tests' or a launcher's own choice wins), and only
before JAX has started a backend, which reads XLA_FLAGS once.
AFL_CPU_DEFAULTS=off leaves XLA_FLAGS alone. The device count is the cores
this process may run on, at most MAX_DEVICES: the lanes of the iterative
baselines keep their clients' data on every device, so the memory they take
grows with the count. On an accelerator host the flags only shape the
(unused) CPU platform.

Also: OpenBLAS, which jaxlib's CPU LAPACK kernels (Cholesky) call, is held
to one thread unless OPENBLAS_NUM_THREADS is set already. The solves run
inside XLA computations that map over many systems on XLA's own threads,
and OpenBLAS's spinning threads on top of those oversubscribe the cores (a
785 x 785 Cholesky measured 90x slower on a loaded 2-core host than with
one thread).

This module imports no JAX: `afl` calls it first.
"""

import os
import sys

ENV = "AFL_CPU_DEFAULTS"
MAX_DEVICES = 8
# Values of an AFL_* switch that turn it off.
OFF = ("0", "off", "false", "no", "none")
DEVICE_COUNT = "--xla_force_host_platform_device_count"
MULTI_THREAD = "--xla_cpu_multi_thread_eigen"


def cores() -> int:
  """The cores this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def _backend_started() -> bool:
  bridge = sys.modules.get("jax._src.xla_bridge")
  return bool(bridge is not None and getattr(bridge, "_backends", None))


def apply_defaults(environ=os.environ) -> list[str]:
  """Sets the defaults of the module docstring in `environ`; returns the
  XLA flags it added (none when off, already set, or too late)."""
  environ.setdefault("OPENBLAS_NUM_THREADS", "1")
  if environ.get(ENV, "").strip().lower() in OFF or _backend_started():
    return []
  present = environ.get("XLA_FLAGS", "")
  added = []
  if DEVICE_COUNT not in present:
    added.append(f"{DEVICE_COUNT}={min(cores(), MAX_DEVICES)}")
  if MULTI_THREAD not in present:
    added.append(f"{MULTI_THREAD}=false")
  if added:
    environ["XLA_FLAGS"] = " ".join([present, *added]).strip()
  return added


def set_jax_options(environ=os.environ, **options) -> None:
  """Sets JAX options (jax_enable_x64=True, ...): through `jax.config` if
  JAX is imported, else as the environment variables it reads when it is
  (JAX_ENABLE_X64=1, ...), so that setting them imports no JAX."""
  jax = sys.modules.get("jax")
  for name, value in options.items():
    if jax is not None and hasattr(jax, "config"):
      jax.config.update(name, value)
    else:
      environ[name.upper()] = str(
          int(value) if isinstance(value, bool) else value
      )
