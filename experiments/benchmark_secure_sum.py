r"""The cost of `--secure_sum`: FedACnnL with and without it, in one process.

  python -m experiments.benchmark_secure_sum --data_dir=../shared/data

Trains FedACnnL (MNIST-MLP, Dirichlet 0.1, 100 clients, gamma 100) plain
and with `--secure_sum` (`afl.secure_sum`; default neighbours and
threshold, `--dropout` optional), alternately, `--repeats` times each after
one compiling run of each, so that both see the same machine load. A
repetition is the complete run on the prepared federation (the build,
which for the secure sum includes the key agreement and the shares of the
private keys, then the rounds), without a clock or tests: the build's
time plus the rounds' wall time (without compilation). Prints the medians,
their ratio, where the secure run's time goes (per round: the host's
protocol work, the clients' statistics, encoding and masking with the
server's sums, the unmasking) and what a client uploads; `--output`
writes the numbers as JSON.
"""

import json
import time

from absl import flags
import numpy as np

import afl
from afl import catalog
from afl import data as data_lib
from experiments import common

flags.DEFINE_string("data_dir", None, "Folder with mnist/ (or AFL_DATA_DIR).")
flags.DEFINE_enum("dataset", "mnist", data_lib.DATASETS, "Dataset.")
flags.DEFINE_enum("model", "mlp", catalog.MODELS, "Model.")
flags.DEFINE_integer("num_clients", 100, "Clients.")
flags.DEFINE_integer("repeats", 5, "Timed repetitions of each (medians).")
flags.DEFINE_float("dropout", 0.0, "--dropout of both runs.")
flags.DEFINE_enum(
    "statistics_dtype",
    "float32",
    ["float32", "float64"],
    "dtype of the clients' products (both runs).",
)
flags.DEFINE_string("output", None, "Optional JSON file for the numbers.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  # Here, not at the top: --help and a bad flag answer before JAX loads.
  import jax  # pylint: disable=g-import-not-at-top

  configs = {
      name: afl.get_config(
          algorithm="fedacnnl",
          dataset=FLAGS.dataset,
          model=FLAGS.model,
          num_clients=FLAGS.num_clients,
          data_dir=FLAGS.data_dir,
          dropout=FLAGS.dropout,
          statistics_dtype=FLAGS.statistics_dtype,
          secure_sum=name == "secure",
      )
      for name in ("plain", "secure")
  }
  split = afl.runtime.prepare_split(configs["plain"])
  federation = afl.runtime.federation(configs["plain"], split)

  def complete_run(name) -> tuple[float, dict]:
    """(seconds, the run's results) of one complete run."""
    config = configs[name]
    start = time.perf_counter()
    algorithm = afl.runtime.build(config, federation)
    build_s = time.perf_counter() - start
    plan = afl.runtime.participation_plan(config, federation, algorithm)
    run = afl.runtime.run_rounds(algorithm, federation.key, plan=plan)
    results = dict(run, **algorithm.summary(run["state"]))
    return build_s + results["wall_time_s"], results

  first = {name: complete_run(name)[1] for name in configs}
  times = {name: [] for name in configs}
  last = {}
  for _ in range(FLAGS.repeats):
    for name in configs:
      seconds, last[name] = complete_run(name)
      times[name].append(seconds)
  medians = {name: float(np.median(t)) for name, t in times.items()}
  section = last["secure"]["secure_sum"]
  rounds = last["secure"]["records"]
  # Plain FedACnnL's upload of a layer: the same statistics in float64
  # (the gram's upper triangle): as many bytes as the masked ring elements.
  statistics_bytes = section["upload_bytes_per_client"]["statistics"]
  protocol_bytes = sum(
      v
      for k, v in section["upload_bytes_per_client"].items()
      if k != "statistics"
  )
  phases = {
      phase: sum(r[f"secure_sum_{phase}_s"] for r in rounds)
      for phase in ("protocol", "upload", "unmask")
  }
  # The same model to the quantization: the largest weight difference of
  # every layer, relative to the layer's largest weight.
  difference = [
      float(np.abs(p - s).max() / np.abs(p).max())
      for p, s in zip(
          jax.tree.leaves(last["plain"]["tested"].params),
          jax.tree.leaves(last["secure"]["tested"].params),
      )
  ]
  numbers = {
      "dataset": FLAGS.dataset,
      "model": FLAGS.model,
      "num_clients": FLAGS.num_clients,
      "dropout": FLAGS.dropout,
      "statistics_dtype": FLAGS.statistics_dtype,
      "devices": federation.mesh.size,
      "plain_median_s": medians["plain"],
      "secure_median_s": medians["secure"],
      "ratio": medians["secure"] / medians["plain"],
      "plain_s": times["plain"],
      "secure_s": times["secure"],
      "compile_s": {n: first[n]["compile_time_s"] for n in configs},
      "secure_setup_s": section["setup_s"],
      "secure_phases_s": phases,
      "neighbours": section["neighbours"],
      "threshold": section["threshold"],
      "upload_bytes_per_client": section["upload_bytes_per_client"],
      "plain_upload_bytes_per_client": statistics_bytes,
      "recovered_clients": section["recovered_clients"],
      "weights_relative_difference": difference,
      "rounds": [
          {k: v for k, v in r.items() if k.startswith("secure_sum_")}
          for r in rounds
      ],
  }
  print(
      f"FedACnnL {FLAGS.dataset}-{FLAGS.model}, {FLAGS.num_clients} "
      f"clients, dropout {FLAGS.dropout}, {FLAGS.statistics_dtype} "
      f"products, {federation.mesh.size} "
      f"device(s), median of {FLAGS.repeats} alternating runs:"
  )
  print(f"  plain              {medians['plain']:8.3f} s")
  print(f"  --secure_sum       {medians['secure']:8.3f} s")
  print(f"  ratio              {numbers['ratio']:8.2f} x")
  print(
      f"  secure run's last: setup {section['setup_s']:.3f} s, "
      + ", ".join(f"{k} {v:.3f} s" for k, v in phases.items())
  )
  print(
      f"  upload per client  {statistics_bytes / 1e6:.3f} MB statistics "
      f"(plain: the same) + {protocol_bytes} B keys and shares "
      f"(k = {section['neighbours']}, t = {section['threshold']})"
  )
  print(f"  recovered clients  {section['recovered_clients']}")
  print(
      "  weights vs plain   max |difference| / max |weight| per leaf "
      + " ".join(f"{d:.1e}" for d in difference)
  )
  if FLAGS.output:
    with open(FLAGS.output, "w", encoding="utf-8") as f:
      json.dump(numbers, f, indent=2)


if __name__ == "__main__":
  common.run(main)
