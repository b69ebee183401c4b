"""Several processes (hosts) as one federation: JAX's distributed runtime.

One code path serves one process with one device, one process with several
devices and several processes: the client mesh spans `jax.devices()` (all
processes' devices), each process fills only its own devices' client blocks
(`federated.distribute`), the `psum` inside the client map's `shard_map`
adds the statistics of all processes (gloo collectives on CPU, NCCL on GPU),
the server solve's result is replicated on every process, and only process 0
writes files. Every process reads the dataset files (the partition needs all
labels) and computes the same partition and block layout, but gathers only
its own clients' samples into device memory; shapes depend on N, C and the
global device count only, so 2 processes x 2 devices lay out the blocks as
1 process x 4 devices does (the tests hold every registered algorithm on 2
processes x 2 devices to 1 process x 4 devices: final weights equal to
1e-5). Host-side decisions that could differ between hosts, pFedACnnL's
K-means grouping (eq. 9), are broadcast from process 0
(`same_on_all_processes`); evaluation counts are summed across processes by
the same client map. The local training of the iterative baselines keeps
every client's samples on every device (`replicate`) and shards the lanes
over the whole mesh. `--num_devices` must stay 0 (all devices) with several
processes.

`initialize()` joins the runtime when the environment asks for it:
  * `AFL_COORDINATOR_ADDRESS`, `AFL_NUM_PROCESSES`, `AFL_PROCESS_ID` (set by
    `launch/local.py`, or by hand on any cluster);
  * otherwise under SLURM with more than one task (`SLURM_NTASKS > 1`), JAX's
    own SLURM detection (see `launch/slurm.sbatch`);
  * otherwise nothing: a single process.
It must run before the first JAX computation (entry points call it first).
"""

import os

from absl import logging
import jax
import numpy as np
from jax.experimental import multihost_utils

COORDINATOR = "AFL_COORDINATOR_ADDRESS"
NUM_PROCESSES = "AFL_NUM_PROCESSES"
PROCESS_ID = "AFL_PROCESS_ID"


def initialize() -> None:
  """Joins the distributed runtime if the environment describes one."""
  if COORDINATOR in os.environ:
    kwargs = dict(
        coordinator_address=os.environ[COORDINATOR],
        num_processes=int(os.environ[NUM_PROCESSES]),
        process_id=int(os.environ[PROCESS_ID]),
    )
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    kwargs = {}  # jax.distributed reads the SLURM variables itself
  else:
    return
  # CPU collectives across processes need gloo (the default has none); GPUs
  # use NCCL whatever this says.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  logging.info(
      "process %d of %d: %d local / %d global devices",
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
  )


def is_main_process() -> bool:
  """True on the process that writes results (process 0)."""
  return jax.process_index() == 0


def same_on_all_processes(value: np.ndarray) -> np.ndarray:
  """Process 0's `value` on every process (a no-op for one process).

  For host-side decisions that must agree everywhere although each process
  computes them (K-means grouping: floating point or library versions could
  differ between hosts).
  """
  if jax.process_count() == 1:
    return np.asarray(value)
  return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(value)))


def replicate(tree, mesh: jax.sharding.Mesh):
  """Host arrays (the same on every process) placed whole on every device
  of `mesh`, which may span processes."""
  everywhere = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def place(leaf):
    leaf = np.asarray(leaf)
    return jax.make_array_from_callback(
        leaf.shape, everywhere, lambda index: leaf[index]
    )

  return jax.tree.map(place, tree)
