r"""Fig. 6 of the paper: the DCNN on CIFAR-10, accuracy and time per algorithm.

Paper setting (full CIFAR-10 in --data_dir, the full-width DCNN; a GPU or a
cluster, see README "Running on several hosts"):

  python -m experiments.fig6 --data_dir=/data --output_dir=runs/fig6

On the 2-core CPU machine, the real 5,000-image subset with a 1/16-width
DCNN (32-64-128-128 channels):

  python -m experiments.fig6 --data_dir=../shared/data --width=0.0625 \
      --min_client_size=5 --output_dir=runs/fig6_subset

CIFAR-10 train and test pooled, Dirichlet(--dirichlet_beta = 0.1) over
--num_clients = 100 clients, each client's data split 75/25. Every algorithm
of --algorithms runs on the same split; each keeps its run's results.json
under OUTPUT_DIR/ALGORITHM/ (read back when the figure is made again, so an
interrupted figure resumes). Writes OUTPUT_DIR/fig6.json (accuracy,
training time, time per round, peak and expected memory per algorithm),
OUTPUT_DIR/fig6.md and OUTPUT_DIR/fig6.png: accuracy against cumulative
training time (an analytic algorithm's model is complete after its last
round, so it is one point; an iterative one, with an "accuracy" per round
record, is a curve) and the time of every round.

--min_client_size: the paper's protocol gives every client at least 10
samples; 5,000 images cannot give 100 clients 10 each under Dirichlet(0.1)
(no draw in 1,000 attempts does), so the subset needs --min_client_size=5
(at least one test sample per client). The full 60,000 images work with 10.

Every run goes through `afl.run_or_reuse`: a saved run of the same whole
configuration is read back, one of other settings (another --width, say)
stops the figure with the settings that differ. --algorithms may name any
registered algorithm (`afl.registry.names`; the baselines with their paper
defaults, `baselines.iterative`); they and every run's configuration
(`afl.get_config`) are checked before the first run. An algorithm's
training time is its rounds' wall time plus, for pFedACnnL, the grouping
stage before them (`experiments.common.training_seconds`).
"""

import json
import pathlib
import time

from absl import flags
from absl import logging
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import ml_collections

import afl
from afl import analytic
from afl import distributed
from afl import registry
from afl import runtime
import baselines  # pylint: disable=unused-import  (registers the baselines)
from experiments import common

TITLES = dict(
    fedacnnl="FedACnnL",
    fedacnnl_wa="FedACnnL-WA",
    pfedacnnl_wc="pFedACnnL-WC",
    pfedacnnl_wp="pFedACnnL-WP",
    pfedacnnl="pFedACnnL",
    fedavg="FedAvg",
)
ORDER = tuple(TITLES)

flags.DEFINE_list(
    "algorithms",
    [a for a in ORDER if a in analytic.VARIANTS],
    f"Algorithms: those of the figure, {list(ORDER)}, or any other "
    "registered one; FedAvg (for reference) is not run by default: on a CPU "
    "it takes minutes per round on the DCNN.",
)
flags.DEFINE_string("data_dir", None, "Folder with the CIFAR-10 files.")
flags.DEFINE_string("output_dir", "runs/fig6", "Where the figure goes.")
flags.DEFINE_float("width", 1.0, "DCNN width multiplier (1.0: the paper's).")
flags.DEFINE_integer("num_clients", 100, "Clients.")
flags.DEFINE_float("dirichlet_beta", 0.1, "Dirichlet concentration.")
flags.DEFINE_integer(
    "min_client_size",
    10,
    "Least samples per client (5 for the 5,000-image subset).",
)
flags.DEFINE_integer("seed", 0, "Root seed (split, encodings, K-means).")
flags.DEFINE_enum(
    "statistics_dtype",
    "float32",
    ["float32", "float64"],
    "dtype of the clients' products.",
)
FLAGS = flags.FLAGS


def config(algorithm: str) -> ml_collections.ConfigDict:
  """The run's configuration from the flags."""
  settings = dict(
      algorithm=algorithm,
      dataset="cifar10",
      model="dcnn",
      width=FLAGS.width,
      num_clients=FLAGS.num_clients,
      dirichlet_beta=FLAGS.dirichlet_beta,
      min_client_size=FLAGS.min_client_size,
      data_dir=FLAGS.data_dir,
      seed=FLAGS.seed,
  )
  if algorithm in analytic.VARIANTS:
    settings["statistics_dtype"] = FLAGS.statistics_dtype
  return afl.get_config(**settings)


def curve(results: dict) -> tuple[list[float], list[float]]:
  """(cumulative training seconds, accuracy) of the tested rounds; the
  grouping stage (pFedACnnL) comes before the first round."""
  times, accuracies = [], []
  elapsed = results.get("grouping_time_s", 0.0)
  for record in results["rounds"]:
    elapsed += record["seconds"]
    if "accuracy" in record:
      times.append(elapsed)
      accuracies.append(record["accuracy"])
  return times, accuracies


def summary(results: dict) -> dict:
  return {
      "accuracy": results["accuracy"],
      "wall_time_s": common.training_seconds(results),
      "compile_time_s": results["compile_time_s"],
      "round_times_s": [r["seconds"] for r in results["rounds"]],
      "peak_memory_gb": results["peak_memory_gb"],
      "expected_peak_memory_gb": results.get("expected_peak_memory_gb"),
      "curve": curve(results),
  }


def plot(figure: dict, path: pathlib.Path, title: str) -> None:
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  for name, entry in figure.items():
    times, accuracies = entry["curve"]
    left.plot(
        times,
        [100 * a for a in accuracies],
        marker="o",
        label=f"{TITLES.get(name, name)} ({100 * entry['accuracy']:.1f}%)",
    )
    rounds = entry["round_times_s"]
    right.plot(
        range(1, len(rounds) + 1),
        rounds,
        marker=".",
        label=TITLES.get(name, name),
    )
  left.set(xlabel="training time (s)", ylabel="test accuracy (%)")
  left.set_xlim(left=0)
  left.legend(fontsize=8)
  right.set(xlabel="round (layer; personalization follows)")
  right.set(ylabel="time of the round (s)")
  right.set_yscale("log")
  right.legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def markdown(figure: dict) -> str:
  lines = [
      "| algorithm | accuracy (%) | training (s) | compile (s) | peak memory"
      " (GB) | expected (GB) |",
      "| --- | --- | --- | --- | --- | --- |",
  ]
  for name, e in figure.items():
    expected = e["expected_peak_memory_gb"]
    lines.append(
        f"| {TITLES.get(name, name)} | {100 * e['accuracy']:.2f} | "
        f"{e['wall_time_s']:.2f} | {e['compile_time_s']:.2f} | "
        f"{e['peak_memory_gb']:.2f} | "
        f"{'-' if expected is None else f'{expected:.2f}'} |"
    )
  return "\n".join(lines) + "\n"


def run_figure(output_dir: pathlib.Path) -> dict:
  """Checks --algorithms and builds every run's configuration, then runs
  (or reads back) each on one split, printing one line each; returns
  {algorithm: summary}."""
  common.check_names("algorithms", FLAGS.algorithms, registry.names())
  configs = {name: config(name) for name in FLAGS.algorithms}
  for name, run_config in configs.items():  # before any run
    runtime.saved_results(run_config, output_dir / name)
  split = None  # one split for all
  figure = {}
  start = time.perf_counter()
  for name, run_config in configs.items():
    if split is None:
      split = runtime.prepare_split(run_config)
    figure[name] = summary(
        afl.run_or_reuse(run_config, output_dir / name, split)
    )
    print(
        f"[{time.perf_counter() - start:7.1f}s] {name}: "
        f"{100 * figure[name]['accuracy']:.2f}% in "
        f"{figure[name]['wall_time_s']:.2f}s",
        flush=True,
    )
  return figure


def main(argv):
  del argv
  distributed.initialize()
  logging.set_verbosity(logging.INFO)
  output_dir = pathlib.Path(FLAGS.output_dir)
  figure = run_figure(output_dir)
  if not distributed.is_main_process():
    return
  output_dir.mkdir(parents=True, exist_ok=True)
  (output_dir / "fig6.json").write_text(json.dumps(figure, indent=2))
  text = markdown(figure)
  (output_dir / "fig6.md").write_text(text)
  plot(
      figure,
      output_dir / "fig6.png",
      f"CIFAR-10 DCNN (width x{FLAGS.width:g}), {FLAGS.num_clients} clients,"
      f" Dirichlet {FLAGS.dirichlet_beta:g}",
  )
  print(text)


if __name__ == "__main__":
  common.run(main)
