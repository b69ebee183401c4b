r"""FedACnnL vs FedACnnL-WA on the simulated clock, and the clock's overhead.

  AFL_DATA_DIR=../shared/data python -m experiments.timing_benchmark \
      --output_dir=/tmp/timing_benchmark

For MNIST-MLP and synthetic-MLP (100 clients, the paper's defaults): runs
`fedacnnl` and `fedacnnl_wa` through `afl.train_and_evaluate` (replacing
earlier runs in OUTPUT_DIR), checks that their params files are
byte-identical, and prints the reduction of the idle time (averaged per
client, and the server's) next to the paper's (Fig. 4: 13% on MNIST, 21% on
synthetic). Then measures what the timing model adds to a FedACnnL run: the
median, over --repeats runs of the built algorithm (`afl.runtime.build`,
`afl.runtime.run_rounds` with a clock, without tests), of the seconds spent
in the clock's code (drawing the profiles; the calibration, read from its
disk cache, the in-process caches of it and of the per-layer FLOPs being
cleared before each run; the per-round accounting, `Clock.round`; the
summary) over the rest of the training's wall time; the per-layer FLOPs,
read back from their disk cache by the algorithm's `work` outside
`Clock.round`, are not counted. (Timing whole runs with and without the
clock instead is dominated by the noise of a shared host.) Writes
OUTPUT_DIR/timing_benchmark.json.
"""

import json
import pathlib
import time

from absl import flags
import numpy as np

import afl
from experiments import common

PAPER_IDLE_REDUCTION = {"mnist": 0.13, "synthetic": 0.21}

flags.DEFINE_string("output_dir", None, "Where runs go.", required=True)
flags.DEFINE_list("datasets", ["mnist", "synthetic"], "Datasets (MLP).")
flags.DEFINE_integer("num_clients", 100, "Clients C.")
flags.DEFINE_integer("repeats", 5, "Runs per variant for the overhead.")
flags.DEFINE_string("data_dir", None, "See experiments.run.")
FLAGS = flags.FLAGS


def mlp_config(dataset: str, **settings):
  return afl.get_config(
      dataset=dataset,
      model="mlp",
      num_clients=FLAGS.num_clients,
      data_dir=FLAGS.data_dir,
      **settings,
  )


def compare(dataset: str, out: pathlib.Path) -> dict:
  """Both algorithms on one split: identical weights, idle times."""
  results, split = {}, None  # one split for both
  for algorithm in ("fedacnnl", "fedacnnl_wa"):
    config = mlp_config(dataset, algorithm=algorithm, overwrite=True)
    if split is None:
      split = afl.runtime.prepare_split(config)
    results[algorithm] = afl.train_and_evaluate(
        config, out / f"{dataset}_{algorithm}", split, progress=False
    )["timing"]
  params = [
      afl.results.params_path(out / f"{dataset}_{a}").read_bytes()
      for a in ("fedacnnl", "fedacnnl_wa")
  ]
  adaptive, fixed = results["fedacnnl"], results["fedacnnl_wa"]

  def reduction(get):
    return 1 - get(adaptive) / get(fixed)

  return {
      "identical_weights": params[0] == params[1],
      "client_idle_reduction": reduction(
          lambda t: t["mean_per_client"]["idle_s"]
      ),
      "server_idle_reduction": reduction(lambda t: t["server_idle_s"]),
      "total_time_reduction": reduction(
          lambda t: t["mean_per_client"]["total_s"]
      ),
      "paper_idle_reduction": PAPER_IDLE_REDUCTION[dataset],
      "fedacnnl": adaptive["mean_per_client"],
      "fedacnnl_wa": fixed["mean_per_client"],
  }


def overhead(dataset: str) -> dict:
  """Seconds spent in the clock's code over the rest of a training run."""
  import jax  # pylint: disable=g-import-not-at-top  (not for --help)

  config = mlp_config(dataset)
  federation = afl.runtime.federation(config, afl.runtime.prepare_split(config))
  algorithm = afl.runtime.build(config, federation)

  def timed() -> tuple[float, float]:
    """(seconds in the clock, seconds of the whole training)."""
    afl.clock.calibrate.cache_clear()
    afl.clock.statistics_step_flops.cache_clear()
    start = time.perf_counter()
    profiles = afl.clock.draw_profiles(
        afl.rng.stream(federation.key, "clock"),
        config.num_clients,
        (config.cores_min, config.cores_max),
        (config.bandwidth_gbps_min, config.bandwidth_gbps_max),
        (config.latency_ms_min, config.latency_ms_max),
    )
    timer = afl.clock.Clock(
        profiles,
        afl.clock.CostModel(afl.clock.calibrate()),
        config.fedacnnl.initial_batch_size,
        federation.client_sizes,
        adaptive=algorithm.adaptive_batch_size,
    )
    spent = [time.perf_counter() - start]
    account = timer.round

    def timed_round(*args, **kwargs):
      began = time.perf_counter()
      record = account(*args, **kwargs)
      spent.append(time.perf_counter() - began)
      return record

    timer.round = timed_round
    run = afl.runtime.run_rounds(algorithm, federation.key, clock=timer)
    jax.block_until_ready(run["tested"].params)
    began = time.perf_counter()
    timer.summary()
    spent.append(time.perf_counter() - began)
    return sum(spent), time.perf_counter() - start

  timed()  # compiles training and the profile draw
  runs = [timed() for _ in range(FLAGS.repeats)]
  return {
      "clock_s": [c for c, _ in runs],
      "training_with_clock_s": [t for _, t in runs],
      "ratio": float(np.median([c / (t - c) for c, t in runs])),
  }


def main(argv):
  del argv
  out = pathlib.Path(FLAGS.output_dir)
  report = {}
  for dataset in FLAGS.datasets:
    report[dataset] = compare(dataset, out)
    report[dataset]["overhead"] = overhead(dataset)
    r = report[dataset]
    print(
        f"{dataset}-MLP, {FLAGS.num_clients} clients: identical weights "
        f"{r['identical_weights']}; idle time per client "
        f"{r['fedacnnl_wa']['idle_s']:.4f}s (WA) -> "
        f"{r['fedacnnl']['idle_s']:.4f}s: "
        f"-{100 * r['client_idle_reduction']:.0f}% (paper "
        f"-{100 * r['paper_idle_reduction']:.0f}%); server idle "
        f"-{100 * r['server_idle_reduction']:.0f}%; total time per client "
        f"-{100 * r['total_time_reduction']:.0f}%; clock overhead: "
        f"+{100 * r['overhead']['ratio']:.1f}% of the training wall time",
        flush=True,
    )
  out.mkdir(parents=True, exist_ok=True)
  (out / "timing_benchmark.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
  common.run(main)
