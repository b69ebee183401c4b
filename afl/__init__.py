"""Analytic (gradient-free) personalized federated learning in JAX.

FedACnnL and pFedACnnL (Gu et al., "Analytic Personalized Federated
Meta-Learning") on Flax models, with the data pipeline, the run loop and
the evaluation they share with the gradient and zeroth-order baselines
(`baselines`, registered by `import baselines`).

  config = afl.get_config(algorithm="pfedacnnl", dataset="mnist", ...)
  results = afl.train_and_evaluate(config, "runs/pfedacnnl")
  params = afl.load_params("runs/pfedacnnl", client=3)

Importing `afl` enables float64 in JAX (`jax_enable_x64`): client statistics
are accumulated and solved in float64 (see `afl.statistics`). Models, data and
forward passes stay float32; code that creates arrays should give dtypes.

It turns on JAX's persistent compilation cache in a per-user folder
(`afl.compilation_cache`; AFL_COMPILATION_CACHE=off disables it), so a
second run of the same command compiles almost nothing.

It hides JAX's log line that a machine without a TPU has no libtpu.so.

It also limits OpenBLAS, which jaxlib's CPU LAPACK kernels (Cholesky) call,
to one thread unless OPENBLAS_NUM_THREADS is set already: the solves run
inside XLA computations that map over many systems on XLA's own threads,
and OpenBLAS's spinning threads on top of those oversubscribe the cores (a
785 x 785 Cholesky measured 90x slower on a loaded 2-core host than with
one thread). This takes effect when `afl` is imported before
jax loads its LAPACK kernels (as the entry points do).
"""

import logging
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _not_the_tpu_probe(record: logging.LogRecord) -> bool:
  """JAX logs, on every machine without a TPU, that its TPU plugin has no
  libtpu.so: not news. Other backends' failures still show."""
  message = record.getMessage()
  return not ("backend 'tpu'" in message and "libtpu" in message)


logging.getLogger("jax._src.xla_bridge").addFilter(_not_the_tpu_probe)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update("jax_enable_x64", True)

# JAX's persistent compilation cache in ~/.cache/afl/jax unless
# AFL_COMPILATION_CACHE says otherwise (`afl.compilation_cache`).
from afl import compilation_cache  # pylint: disable=g-import-not-at-top,wrong-import-position

compilation_cache.enable()

# The public API; importing `afl.analytic` registers the analytic algorithms.
from afl import analytic  # pylint: disable=g-import-not-at-top,wrong-import-position
from afl.config import get_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from afl.results import load_params  # pylint: disable=g-import-not-at-top,wrong-import-position
from afl.runtime import run_or_reuse  # pylint: disable=g-import-not-at-top,wrong-import-position
from afl.runtime import train_and_evaluate  # pylint: disable=g-import-not-at-top,wrong-import-position
