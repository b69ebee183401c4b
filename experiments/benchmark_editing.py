r"""Unlearning and late joining against retraining (`afl.editing`).

  python -m experiments.benchmark_editing --data_dir=../shared/data \
      --output_dir=runs/benchmark_editing

Trains FedACnnL and pFedACnnL on MNIST-MLP (100 Dirichlet(0.1) clients, the
paper's settings), then, in one process and alternating, R times each:
unlearns 1 client and 10 clients (for pFedACnnL all of one group, so one
group is touched) and retrains the same federation from scratch with the
same grouping (`edit(..., retrain=True)`). Times are medians without
compilation: `time` the edit's algorithmic part (layer 1's update and the
re-solve rounds; for the retraining its rounds), `call` the whole call
(data layout, set-up, test). Then the 10 largest clients are removed:
accuracy before, unlearned, retrained with the same grouping, and a fresh
run without them (a new K-means for pFedACnnL), and the largest relative
weight difference between unlearned and retrained. Writes
OUTPUT_DIR/benchmark_editing.json (`--statistics_dtype=float64`: exact
products, `afl.editing`'s float64 bound).
"""

import json
import os
import pathlib
import statistics
import time

from absl import flags
import numpy as np

import afl
from afl.data import files
from experiments import common

flags.DEFINE_string("data_dir", None, "Holds mnist/.")
flags.DEFINE_string("output_dir", "runs/benchmark_editing", "Where runs go.")
flags.DEFINE_integer("repeats", 3, "Alternating repetitions of each case.")
flags.DEFINE_integer("num_clients", 100, "Clients.")
flags.DEFINE_list("algorithms", ["fedacnnl", "pfedacnnl"], "Which to run.")
flags.DEFINE_enum(
    "statistics_dtype", "float32", ["float32", "float64"], "Gram products."
)
FLAGS = flags.FLAGS


def _relative_difference(a, b) -> float:
  import jax  # pylint: disable=g-import-not-at-top  (not for --help)

  return max(
      float(np.abs(x - y).max() / np.abs(y).max())
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def _timed(call):
  began = time.perf_counter()
  edited = call()
  return edited, time.perf_counter() - began


def _leaving(source) -> dict:
  """1 and 10 leaving clients: for a clustered run of one group (the
  largest; 10 of it, or all if fewer)."""
  groups = source.server.client_group
  biggest = np.flatnonzero(groups == np.argmax(source.server.group_sizes))
  return {"1": biggest[:1].tolist(), "10": biggest[:10].tolist()}


def benchmark(name: str, out: pathlib.Path) -> dict:
  config = afl.get_config(
      algorithm=name,
      dataset="mnist",
      model="mlp",
      num_clients=FLAGS.num_clients,
      data_dir=FLAGS.data_dir,
      statistics_dtype=FLAGS.statistics_dtype,
  )
  run_dir = out / name
  trained = afl.runtime.run_or_reuse(config, run_dir)
  source = afl.editing.load(run_dir)
  cases = _leaving(source)
  times = {f"{kind}_{n}": [] for n in cases for kind in ("unlearn", "retrain")}
  calls = {key: [] for key in times}
  for _ in range(FLAGS.repeats + 1):  # the first compiles: not counted
    for n, leaving in cases.items():
      for kind in ("unlearn", "retrain"):
        edited, seconds = _timed(
            lambda: afl.editing.edit(
                source, leaving, retrain=kind == "retrain", progress=False
            )
        )
        times[f"{kind}_{n}"].append(edited.results["edit"]["time_s"])
        calls[f"{kind}_{n}"].append(
            seconds - edited.results["edit"]["compile_s"]
        )
  median = {k: statistics.median(v[1:]) for k, v in times.items()}
  median_call = {k: statistics.median(v[1:]) for k, v in calls.items()}

  sizes = np.asarray(trained["per_client_train_samples"])
  largest = np.argsort(-sizes, kind="stable")[:10].tolist()
  unlearned = afl.editing.unlearn(source, largest, progress=False)
  retrained = afl.editing.edit(source, largest, retrain=True, progress=False)
  stay = np.setdiff1d(np.arange(len(sizes)), largest)
  split_file = out / f"{name}_without_largest.npz"
  files.save_split(
      split_file,
      [source.split.train_indices[c] for c in stay],
      [source.split.test_indices[c] for c in stay],
  )
  fresh_config = afl.get_config(
      algorithm=name,
      dataset="mnist",
      model="mlp",
      split_file=str(split_file),
      data_dir=FLAGS.data_dir,
      statistics_dtype=FLAGS.statistics_dtype,
  )
  fresh = afl.runtime.run_or_reuse(fresh_config, out / f"{name}_fresh")
  return {
      "touched_groups": {
          n: afl.editing.unlearn(source, c, progress=False).results["edit"][
              "touched_groups"
          ]
          for n, c in cases.items()
      },
      "median_time_s": median,
      "median_call_s": median_call,
      "ratio_to_retrain": {
          n: median[f"unlearn_{n}"] / median[f"retrain_{n}"] for n in cases
      },
      "call_ratio_to_retrain": {
          n: median_call[f"unlearn_{n}"] / median_call[f"retrain_{n}"]
          for n in cases
      },
      "largest_removed": largest,
      "accuracy_before": trained["accuracy"],
      "accuracy_unlearned": unlearned.results["accuracy"],
      "accuracy_retrained_same_groups": retrained.results["accuracy"],
      "accuracy_fresh_run": fresh["accuracy"],
      "max_relative_weight_difference": _relative_difference(
          unlearned.params, retrained.params
      ),
      "server_state_bytes": trained["files"]["server_state.npz"],
  }


def main(argv):
  del argv
  common.check_names("algorithms", FLAGS.algorithms, ("fedacnnl", "pfedacnnl"))
  out = pathlib.Path(FLAGS.output_dir)
  out.mkdir(parents=True, exist_ok=True)
  report = {
      "load_average_before": os.getloadavg(),
      "statistics_dtype": FLAGS.statistics_dtype,
  }
  for name in FLAGS.algorithms:
    report[name] = benchmark(name, out)
    print(name, json.dumps(report[name], indent=1), flush=True)
  report["load_average_after"] = os.getloadavg()
  (out / "benchmark_editing.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
  common.run(main)
