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

It sets how a CPU host runs the computations before JAX starts
(`afl.host`): a CPU device per core (the clients are sharded over them),
one thread each, OpenBLAS on one thread; AFL_CPU_DEFAULTS=off, or XLA_FLAGS
naming those flags, keeps JAX's own choice. This takes effect when `afl` is
imported before JAX has started a backend (as the entry points do).

Importing `afl` does not itself import JAX (the settings above go to JAX
through its environment when JAX is not loaded yet), and the API below is
imported on first use: an entry point parses and checks its flags, the
settings and the algorithms' declarations (`afl.catalog`) in a fraction of
a second, before JAX loads.
"""

import importlib
import importlib.util
import logging

from afl import host

host.apply_defaults()


def _not_the_tpu_probe(record: logging.LogRecord) -> bool:
  """JAX logs, on every machine without a TPU, that its TPU plugin has no
  libtpu.so: not news. Other backends' failures still show."""
  message = record.getMessage()
  return not ("backend 'tpu'" in message and "libtpu" in message)


logging.getLogger("jax._src.xla_bridge").addFilter(_not_the_tpu_probe)

host.set_jax_options(jax_enable_x64=True)

# JAX's persistent compilation cache in ~/.cache/afl/jax unless
# AFL_COMPILATION_CACHE says otherwise (`afl.compilation_cache`).
from afl import compilation_cache  # pylint: disable=g-import-not-at-top,wrong-import-position

compilation_cache.enable()

# The public API, imported when first used (PEP 562), so that an entry point
# can parse and check its flags before JAX loads (a second or more).
_API = {
    "get_config": "afl.config",
    "train_and_evaluate": "afl.runtime",
    "run_or_reuse": "afl.runtime",
    "load_params": "afl.results",
}


def __getattr__(name: str):
  """`afl.get_config` and the rest of the API above, and `afl.runtime` and
  the other submodules, imported on first use."""
  if name in _API:
    return getattr(importlib.import_module(_API[name]), name)
  if importlib.util.find_spec(f"{__name__}.{name}") is None:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  return importlib.import_module(f"{__name__}.{name}")
