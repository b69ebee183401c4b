r"""Training time against a bare X^T X of the same data, in the same process.

  python -m experiments.benchmark_fedacnnl --data_dir=../shared/data
  python -m experiments.benchmark_fedacnnl --algorithm=pfedacnnl \
      --data_dir=../shared/data

Trains `--algorithm` (default FedACnnL; MNIST-MLP, Dirichlet 0.1, 100
clients, gamma 100, eps 2500, K 10) `--repeats` times after one compiling
run, and times `X.T @ X` of the same training matrix (float32, [N, 784]) as
many times, interleaved so that both see the same machine load, on the
same devices as the run (rows split over them, the shares summed: on a
host with a CPU device per core, `afl.host`, both use every core). A
repetition is the algorithm's complete run on the prepared federation
(`afl.runtime.federation`): building it (`afl.runtime.build`), which for the
pFedACnnL variants is the grouping stage (encoding, K-means), then its
rounds (`afl.runtime.run_rounds`: group meta-models and personalization),
without a clock or tests; its time is the rounds' wall time plus the
grouping's (`experiments.common.training_seconds`), without compilation.
Prints the medians and their ratio (targets: FedACnnL <= 3x, stretch 2x;
pFedACnnL <= 8x), and the peak resident memory. `--output` also writes the
numbers as JSON.
"""

import json

from absl import flags
import numpy as np

import afl
from afl import catalog
from afl import data as data_lib
from experiments import common

flags.DEFINE_string("data_dir", None, "Folder with mnist/ (or AFL_DATA_DIR).")
flags.DEFINE_enum(
    "algorithm", "fedacnnl", list(catalog.VARIANTS), "Algorithm to time."
)
flags.DEFINE_enum("dataset", "mnist", data_lib.DATASETS, "Dataset.")
flags.DEFINE_enum("model", "mlp", catalog.MODELS, "Model.")
flags.DEFINE_integer("num_clients", 100, "Clients.")
flags.DEFINE_integer("repeats", 7, "Timed repetitions (medians reported).")
flags.DEFINE_integer("block_size", 0, "0: default block size.")
flags.DEFINE_enum(
    "statistics_dtype",
    "float32",
    ["float32", "float64"],
    "dtype of the clients' products.",
)
flags.DEFINE_string("output", None, "Optional JSON file for the numbers.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  # Here, not at the top: --help and a bad flag answer before JAX loads.
  import jax  # pylint: disable=g-import-not-at-top

  try:
    config = afl.get_config(
        algorithm=FLAGS.algorithm,
        dataset=FLAGS.dataset,
        model=FLAGS.model,
        num_clients=FLAGS.num_clients,
        data_dir=FLAGS.data_dir,
        block_size=FLAGS.block_size,
        statistics_dtype=FLAGS.statistics_dtype,
    )
  except ValueError as error:
    common.fail(error)
  split = afl.runtime.prepare_split(config)
  federation = afl.runtime.federation(config, split)

  def complete_run() -> tuple[dict, dict]:
    """The grouping stage again, then the rounds: (run, summary)."""
    algorithm = afl.runtime.build(config, federation)
    run = afl.runtime.run_rounds(algorithm, federation.key)
    return run, algorithm.summary(run["state"])

  pooled = federation.inputs[np.concatenate(split.train_indices)]
  pooled = pooled.reshape(len(pooled), -1)
  train_rows = len(pooled)
  # The bare product on the run's devices: rows split over the mesh (zero
  # rows pad them evenly and add nothing to X^T X), each device's share
  # summed; on one device, one product.
  devices = federation.mesh.size
  pooled = np.pad(pooled, ((0, -len(pooled) % devices), (0, 0)))
  rows = jax.sharding.NamedSharding(
      federation.mesh, jax.sharding.PartitionSpec("clients")
  )
  pooled = jax.device_put(pooled, rows)
  gram = jax.jit(lambda a: a.T @ a)

  first, summary = complete_run()
  jax.block_until_ready(gram(pooled))
  train_times, gram_times = [], []
  for _ in range(FLAGS.repeats):
    run, summary = complete_run()
    train_times.append(common.training_seconds(dict(run, **summary)))
    gram_times.append(afl.timing.timed(lambda: gram(pooled)))
  train_s, gram_s = np.median(train_times), np.median(gram_times)
  numbers = {
      "algorithm": FLAGS.algorithm,
      "dataset": FLAGS.dataset,
      "model": FLAGS.model,
      "num_clients": FLAGS.num_clients,
      "train_rows": train_rows,
      "features": int(pooled.shape[1]),
      "devices": federation.mesh.size,
      "block_size": summary["block_size"],
      "statistics_dtype": FLAGS.statistics_dtype,
      "train_median_s": float(train_s),
      "xtx_median_s": float(gram_s),
      "ratio": float(train_s / gram_s),
      "compile_s": first["compile_time_s"],
      "peak_memory_gb": afl.results.peak_memory_gb(),
      "train_s": train_times,
      "xtx_s": gram_times,
      "rounds_of_first_run": first["records"],
  }
  print(
      f"{FLAGS.algorithm} {FLAGS.dataset}-{FLAGS.model}, "
      f"{FLAGS.num_clients} clients, {train_rows} x {pooled.shape[1]} "
      f"training data, {federation.mesh.size} device(s), median of "
      f"{FLAGS.repeats}:"
  )
  print(
      f"  training           {train_s:8.4f} s   (compile "
      f"{first['compile_time_s']:.2f} s once)"
  )
  print(f"  bare X.T @ X       {gram_s:8.4f} s")
  print(f"  ratio              {train_s / gram_s:8.2f} x")
  print(f"  peak memory        {numbers['peak_memory_gb']:8.2f} GB")
  if FLAGS.output:
    with open(FLAGS.output, "w", encoding="utf-8") as f:
      json.dump(numbers, f, indent=2)


if __name__ == "__main__":
  common.run(main)
