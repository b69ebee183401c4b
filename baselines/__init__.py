"""Gradient and zeroth-order baselines on the same Flax models and run loop:
FedAvg, FedZO, BAFFLE, pFedMe and pFedZO (algorithms: their local training
and server updates; zeroth_order: the estimators), the nu-step meta-FL
FedAvg (meta_fl) and PersA-FL's asynchronous server (persafl).

Importing the package registers them with `afl.registry` (`catalog`, which
imports no JAX; their modules load when a run builds one), so that
`afl.train_and_evaluate` runs them by name. The modules are also reached
as attributes (`baselines.iterative`), imported on first use, as `afl`'s.
"""

import importlib
import importlib.util

from baselines import catalog  # pylint: disable=unused-import  (registers them)


def __getattr__(name: str):
  """`baselines.iterative` and the other submodules, imported on first use."""
  if importlib.util.find_spec(f"{__name__}.{name}") is None:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  return importlib.import_module(f"{__name__}.{name}")
