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
OUTPUT_DIR/fig6.md and OUTPUT_DIR/fig6.png: as the paper's Fig. 6, test
accuracy per round (an analytic model is complete from round L = 5 on:
FedACnnL's and pFedACnnL-WP's at round 5, pFedACnnL's and pFedACnnL-WC's
meta-models at round 5 and their personalized models after each
personalization round 6..10; the methods without personalization rounds
carry their final accuracy forward over rounds 6..10, as the paper does
for its rounds 5..9, counted from 0) and the time of every round without
compilation.

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
stage before them (`experiments.common.training_seconds`). An analytic
run is timed warm: a first, unsaved run of it compiles (`timed_run`), so
every round time is the round's work alone; the compile time reported is
that first run's.
"""

import json
import pathlib
import tempfile
import time

from absl import flags
from absl import logging
import ml_collections

import afl
from afl import catalog
from afl import registry
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
# Distinct markers, hollow ones drawn larger: FedACnnL and FedACnnL-WA
# reach the same accuracy, and pFedACnnL's round L is pFedACnnL-WP's model,
# so their points coincide.
MARKERS = dict(
    fedacnnl=dict(marker="o", markersize=11, markerfacecolor="none"),
    fedacnnl_wa=dict(marker="x", markersize=7),
    pfedacnnl_wc=dict(marker="s", markersize=6),
    pfedacnnl_wp=dict(marker="D", markersize=11, markerfacecolor="none"),
    pfedacnnl=dict(marker="^", markersize=7),
)

flags.DEFINE_list(
    "algorithms",
    [a for a in ORDER if a in catalog.VARIANTS],
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
  if algorithm in catalog.VARIANTS:
    settings["statistics_dtype"] = FLAGS.statistics_dtype
  return afl.get_config(**settings)


def summary(results: dict) -> dict:
  """What the figure and fig6.json keep of a run: the final accuracy, the
  training and compile times, each round's time without compilation, the
  accuracy of each round (None where no model was tested: an analytic
  run has a complete model from round L on) and the memory."""
  return {
      "accuracy": results["accuracy"],
      "wall_time_s": common.training_seconds(results),
      "compile_time_s": results["compile_time_s"],
      "round_times_s": [r["seconds"] for r in results["rounds"]],
      "accuracy_per_round": results["accuracy_per_round"],
      "analytic": results["algorithm"] in catalog.VARIANTS,
      "peak_memory_gb": results["peak_memory_gb"],
      "expected_peak_memory_gb": results.get("expected_peak_memory_gb"),
  }


def plot(figure: dict, path: pathlib.Path, title: str) -> None:
  """Left: test accuracy per round, as the paper's Fig. 6: a method that
  ends before the last round (no personalization rounds) has its final
  accuracy carried forward (dashed), an iterative reference (FedAvg) is
  its best accuracy as a dotted line. Right: each round's time without
  compilation (the run's compile time is in fig6.md)."""
  plt = common.pyplot()
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top

  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
  last_round = max(
      (len(e["accuracy_per_round"]) for e in figure.values() if e["analytic"]),
      default=1,
  )
  for name, entry in figure.items():
    label = (
        f"{TITLES.get(name, name)} ({100 * entry['accuracy']:.2f}%, "
        f"{entry['wall_time_s']:.1f}s)"
    )
    per_round = entry["accuracy_per_round"]
    if not entry["analytic"]:
      left.axhline(
          100 * entry["accuracy"],
          linestyle=":",
          color="gray",
          label=f"{label}, best of {len(per_round)} rounds",
      )
      continue
    tested = [(r, 100 * a) for r, a in enumerate(per_round, 1) if a is not None]
    style = MARKERS.get(name, dict(marker="o"))
    (line,) = left.plot(*zip(*tested), label=label, **style)
    if len(per_round) < last_round:
      left.plot(
          [len(per_round), last_round],
          [tested[-1][1]] * 2,
          linestyle="--",
          color=line.get_color(),
      )
    rounds = entry["round_times_s"]
    right.plot(
        range(1, len(rounds) + 1),
        rounds,
        color=line.get_color(),
        **style,
        label=TITLES.get(name, name),
    )
  left.set(xlabel="round", ylabel="test accuracy (%)")
  left.set_xlim(0.5, last_round + 0.5)
  left.legend(fontsize=8, loc="upper left")  # rounds 1..L-1 have no model
  left.set_title(
      "accuracy (dashed: final accuracy carried forward)", fontsize=9
  )
  right.set(xlabel="round (layers, then personalization)")
  right.set(ylabel="time of the round (s, without compilation)")
  right.set_yscale("log")
  for which in (
      right.yaxis.set_major_formatter,
      right.yaxis.set_minor_formatter,
  ):
    which(ticker.FormatStrFormatter("%g"))
  right.legend(fontsize=8)
  for axis in (left, right):
    axis.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def markdown(figure: dict) -> str:
  lines = [
      "| algorithm | accuracy (%) | tested rounds: accuracy (%) | training"
      " (s) | compile (s) | peak memory (GB) | expected (GB) |",
      "| --- | --- | --- | --- | --- | --- | --- |",
  ]
  for name, e in figure.items():
    expected = e["expected_peak_memory_gb"]
    per_round = ", ".join(
        f"{r}: {100 * a:.2f}"
        for r, a in enumerate(e["accuracy_per_round"], 1)
        if a is not None and e["analytic"]
    )
    lines.append(
        f"| {TITLES.get(name, name)} | {100 * e['accuracy']:.2f} | "
        f"{per_round or '-'} | {e['wall_time_s']:.2f} | "
        f"{e['compile_time_s']:.2f} | {e['peak_memory_gb']:.2f} | "
        f"{'-' if expected is None else f'{expected:.2f}'} |"
    )
  return "\n".join(lines) + "\n"


WARMUP = "warmup.json"


def timed_run(
    run_config: ml_collections.ConfigDict, folder: pathlib.Path, split
) -> dict:
  """The run's results, its rounds timed with nothing left to compile: an
  analytic run compiles in most of its rounds, and a round that compiles
  runs part of its work while later functions compile, so its time without
  compilation comes out too small (the first DCNN round by 8x); a first,
  unsaved run in the same process compiles everything, and the run that
  is saved is timed warm. The first run's compile time is kept in
  FOLDER/warmup.json and reported as the run's."""
  saved = afl.runtime.saved_results(run_config, folder)
  if saved is None and run_config.algorithm in catalog.VARIANTS:
    warm = run_config.copy_and_resolve_references()
    warm.checkpoint_every = 10**9  # none: a throwaway run
    with tempfile.TemporaryDirectory() as scratch:
      first = afl.train_and_evaluate(warm, scratch, split, progress=False)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / WARMUP).write_text(
        json.dumps({"compile_time_s": first["compile_time_s"]})
    )
  results = saved or afl.run_or_reuse(run_config, folder, split)
  if (folder / WARMUP).exists():
    results = dict(results, **json.loads((folder / WARMUP).read_text()))
  return results


def run_figure(output_dir: pathlib.Path) -> dict:
  """Checks --algorithms and builds every run's configuration, then runs
  (`timed_run`, or reads back) each on one split, printing one line each;
  returns {algorithm: summary}."""
  common.check_names("algorithms", FLAGS.algorithms, registry.names())
  configs = {name: config(name) for name in FLAGS.algorithms}
  for name, run_config in configs.items():  # before any run
    afl.runtime.saved_results(run_config, output_dir / name)
  split = None  # one split for all
  figure = {}
  start = time.perf_counter()
  for name, run_config in configs.items():
    if split is None:
      split = afl.runtime.prepare_split(run_config)
    figure[name] = summary(timed_run(run_config, output_dir / name, split))
    print(
        f"[{time.perf_counter() - start:7.1f}s] {name}: "
        f"{100 * figure[name]['accuracy']:.2f}% in "
        f"{figure[name]['wall_time_s']:.2f}s",
        flush=True,
    )
  return figure


def main(argv):
  del argv
  afl.distributed.initialize()
  logging.set_verbosity(logging.INFO)
  output_dir = pathlib.Path(FLAGS.output_dir)
  figure = run_figure(output_dir)
  if not afl.distributed.is_main_process():
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
