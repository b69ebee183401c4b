"""One process of the multi-process tests (tests/test_runtime.py).

  python -m tests.distributed_worker OUTPUT_DIR [ALGORITHM ...]

joins the distributed runtime from the environment set by `launch.local`
and runs every registered algorithm's (or the named ones') `config` through the one run
loop into OUTPUT_DIR/p<process index>/<algorithm>/: only process 0 may
write, so OUTPUT_DIR/p1 must stay empty.
"""

import os
import sys

import jax

import afl
from afl import checkpoints
from afl import distributed
from afl import registry
from afl import results
import baselines  # pylint: disable=unused-import  (registers the baselines)

# Tiny and exact: float64 analytic statistics (1 and 2 processes then agree
# to rounding), two short rounds of every iterative algorithm. FedACnnL's MLP
# carries the layers' inputs across processes; the other analytic variants
# take the one-layer model (their rounds are compiled per layer).
_ANALYTIC = dict(statistics_dtype="float64", model="lr")
_ITERATIVE = dict(rounds=2, local_steps=2, model="lr")
SETTINGS = {
    "fedacnnl": dict(_ANALYTIC, model="mlp"),
    "fedacnnl_wa": _ANALYTIC,
    # Partial participation across processes: the same draws, dropouts
    # and lanes on every process.
    "pfedacnnl": dict(_ANALYTIC, num_groups=3, dropout=0.3),
    "pfedacnnl_wc": _ANALYTIC,
    "pfedacnnl_wp": dict(_ANALYTIC, num_groups=3),
    "fedavg": _ITERATIVE,
    "fedzo": _ITERATIVE,
    "baffle": dict(_ITERATIVE, perturbations=20),
    "pfedme": dict(_ITERATIVE, clients_per_round=6, dropout=0.3),
    "pfedzo": _ITERATIVE,
    "meta_fedavg": _ITERATIVE,
    "persafl": _ITERATIVE,
}


def config(algorithm: str, **settings):
  return afl.get_config(
      **dict(
          dict(algorithm=algorithm, num_clients=12, overwrite=True),
          **SETTINGS[algorithm],
          **settings,
      )
  )


def _forbid_writing(path, payload):
  raise AssertionError(f"process {jax.process_index()} wrote {path}")


def _stop_after(index: int):
  save = checkpoints.Checkpoints.save

  def save_and_stop(self, round_index, state, meta):
    save(self, round_index, state, meta)
    if round_index == index:
      sys.exit(3)

  return save_and_stop


def main(output_dir: str, algorithms) -> None:
  distributed.initialize()
  if jax.process_index():
    results._write_durably = _forbid_writing  # pylint: disable=protected-access
  settings = {}
  if "CHECKPOINT_EVERY" in os.environ:  # and resume from a checkpoint there
    settings = dict(
        checkpoint_every=int(os.environ["CHECKPOINT_EVERY"]), overwrite=False
    )
  if "STOP_AFTER" in os.environ:
    checkpoints.Checkpoints.save = _stop_after(int(os.environ["STOP_AFTER"]))
  for algorithm in algorithms or registry.names():
    afl.train_and_evaluate(
        config(algorithm, **settings),
        f"{output_dir}/{algorithm}",
        progress=False,
    )


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2:])
