"""Test configuration: 8 virtual CPU devices and the shared data directory.

Without the data folder the tests that read real MNIST or CIFAR-10 are
skipped, each saying what to set (AFL_DATA_DIR); the rest run. CI sets
AFL_REQUIRE_DATA, which turns the skips into failures.

XLA_FLAGS must be set before jax is imported anywhere, so it is set here, at
collection time, for the whole test session. Several virtual CPU devices in
one process share one thread pool; with multi-threaded Eigen products a
device can wait inside a product for threads that are all parked at another
device's collective (a deadlock seen with float64 products), so Eigen runs
single-threaded per device here.

Many tests compile the same programs, in this process and in the
subprocesses they start (a killed run and its rerun, 2 processes against
1): XLA's persistent compilation cache, in a folder that the pytest-xdist
workers and their children share (the environment passes it on), compiles
each once per session. Only compilation is cached; the executables are the
ones a fresh compile gives. The cache is bounded, which makes JAX lock it.
"""

import os
import pathlib
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
    " --xla_cpu_multi_thread_eigen=false"
).strip()

os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"afl-tests-xla-{os.getuid()}"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# A size bound turns on JAX's file lock around every read and write of the
# cache; without it a worker can read an entry another process is still
# writing (JAX's checksum then rejects it and compiles again). The bound is
# far above what the suite stores.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 * 2**30))

import gc  # pylint: disable=g-import-not-at-top

import jax  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

_REPO = pathlib.Path(__file__).resolve().parents[1]
# Set (by .ci/run): a missing data folder fails the data tests instead of
# skipping them with what to set.
REQUIRE_DATA = "AFL_REQUIRE_DATA"


@pytest.fixture(autouse=True, scope="module")
def release_executables():
  """Drops JAX's compiled executables after each test module. Every loaded
  XLA:CPU executable keeps several memory mappings per kernel, and a worker
  that ran a few large modules reached Linux's limit of 65,530 mappings per
  process (41,862 after test_editing and test_pfedacnnl alone): the next
  executable then failed to load and the worker aborted."""
  yield
  jax.clear_caches()
  gc.collect()


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
  """The directory holding `mnist/` and `cifar10-subset/` (CI: ../shared/data)."""
  path = pathlib.Path(
      os.environ.get("AFL_DATA_DIR", _REPO.parent / "shared" / "data")
  ).resolve()  # absolute: tests link to it from temporary folders
  if not (path / "mnist").is_dir():
    message = (
        f"test data directory {path} has no mnist/ folder; set AFL_DATA_DIR "
        "to the folder that holds mnist/ and cifar10-subset/ (in CI: "
        "../shared/data)"
    )
    if os.environ.get(REQUIRE_DATA):  # CI: the data tests must run
      raise FileNotFoundError(message)
    pytest.skip(message)
  return path
