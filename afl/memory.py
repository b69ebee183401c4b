"""The memory model of FedACnnL / pFedACnnL, printed before a run.

A layer of design width d (the layer input plus the bias: d = 785 for
MNIST-MLP's first layer, up to 3 x 3 x 2048 + 1 = 18,433 for the DCNN's
last conv layer at full width) has d x d statistics. They are never held
per client: `federated.segment_sum` folds each block's product into the sum
of its segment as soon as it is produced, so a device holds

  S sums + their psum + a running sum + one block's product (float32 and
  float64)  =  (2 S + 3) d^2 x 8 bytes

with S = 1 for FedACnnL and S = K for the group meta-models (eq. 10, 11).
With more sums than edges of the devices (K > 2 D), the server solves each
group as soon as it is complete, as personalization does below: then it
also holds the edge terms, 7 + 4 D (the model counts the larger).
Personalization (eq. 12, 13) solves each client's statistics as soon as they
are complete (`federated.segment_sum`'s finalize) and keeps only its
d x d_y solution: a device holds the running sums, the segments at its two
edges, the edges of all D devices of the mesh gathered and added up, and
one system being solved, about (7 + 4 D) d^2 x 8 bytes, whatever C.
On top come one step's design rows (samples per step
x positions x d, float32, twice for the patches and their cast) and the
client blocks themselves (train and test on the devices, float32, and one
host copy while they are placed). So memory is
O(devices (K + D) d^2 + data), never O(C d^2).
Virtual CPU devices share the host's memory, so there the device terms add
up; on GPUs each device holds its own.

The rest, `RUNTIME`, is a measured constant: the JAX runtime, compiled
code and the dataset as loaded before federation took 0.4-0.5 GB on CPU
for MNIST-MLP (10 to 10,000 clients) and about 0.7 GB for the 1/16-width
DCNN on the CIFAR-10 subset; we count 0.75 GB. The estimate is for one run
in a fresh process: the peak resident memory of a process that ran other
experiments before includes what they left behind.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from afl import layers
from afl import models

GIB = 2**30
RUNTIME = 3 * GIB // 4  # bytes; measured on CPU, see the module docstring


class Estimate(NamedTuple):
  """Expected bytes (see the module docstring).

  Attributes:
    data: client blocks: train and test on the devices (the test blocks
      taken as no more than the train blocks) and one host copy of the
      blocks being placed.
    statistics: the peak over layers and stages of the statistics' term,
      summed over devices.
    widest: the largest design width d.
    copies: float64 d x d per device at that peak.
    peak: data + statistics + RUNTIME.
  """

  data: int
  statistics: int
  widest: int
  copies: int
  peak: int

  def describe(self) -> str:
    return (
        f"expected peak memory {self.peak / GIB:.2f} GB = client blocks "
        f"{self.data / GIB:.2f} GB + statistics {self.statistics / GIB:.2f} "
        f"GB (widest layer d={self.widest}, {self.copies} float64 d x d "
        f"per device) + runtime {RUNTIME / GIB:.2f} GB"
    )


def tree_bytes(tree) -> int:
  """Bytes of a pytree's arrays (or jax.ShapeDtypeStructs)."""
  return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))


def design_shapes(model: models.LayerwiseNet, input_shape) -> list:
  """(positions per sample, design width d incl. bias) of every layer."""
  params = jax.eval_shape(
      lambda: models.init_params(model, jax.random.key(0), input_shape)
  )
  sample = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  shapes = []
  for l, stage in enumerate(model.stages):
    rows = jax.eval_shape(
        lambda p, x, l=l, layer=stage.layer: layers.design_rows(
            layer, model.apply(p, x, upto=l), None
        ),
        params,
        sample,
    )
    shapes.append((rows.shape[1], rows.shape[2] + 1))
  return shapes


def estimate(
    model: models.LayerwiseNet,
    input_shape,
    *,
    num_blocks: int,
    block_size: int,
    num_devices: int,
    num_groups: int,
    personalized: bool = False,
    mesh_size: int | None = None,
    rows_per_step: int = 1024,
) -> Estimate:
  """The memory model for one run.

  Args:
    model: the network.
    input_shape: per-sample input shape.
    num_blocks: client blocks of the training data.
    block_size: samples per block.
    num_devices: devices of the client mesh on this host.
    num_groups: K (1 for FedACnnL).
    personalized: whether clients personalize (pFedACnnL).
    mesh_size: devices of the whole mesh (all processes); None: num_devices.
    rows_per_step: design rows per merged step (`fedacnnl.fedacnnl`).
  """
  features = math.prod(input_shape)
  # Train and test blocks on the devices, one host copy while placing.
  data = 3 * num_blocks * block_size * (features * 4 + 4 + 1)
  statistics = 0
  widest, most = 0, 0
  mesh = mesh_size or num_devices
  counts = [2 * num_groups + 3]  # sums added up
  if personalized or num_groups > 2 * mesh:
    counts.append(7 + 4 * mesh)  # finalized as they go, edges gathered
  for positions, width in design_shapes(model, input_shape):
    samples_per_step = max(1, rows_per_step // positions, block_size)
    rows = 2 * samples_per_step * positions * width * 4
    for copies in counts:
      term = copies * width * width * 8 + rows
      if num_devices * term > statistics:
        statistics, widest, most = num_devices * term, width, copies
  return Estimate(data, statistics, widest, most, data + statistics + RUNTIME)
