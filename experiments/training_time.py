r"""The training-time study of the paper (Figs. 4 and 5), one command.

  python -m experiments.training_time --data_dir=../shared/data \
      --output_dir=runs/training_time

Runs FedACnnL, FedACnnL-WA, FedAvg, FedZO and BAFFLE, and the personalized
systems meta-FedAvg (nu = 1, exact: Per-FedAvg) and PersA-FL (MAML and
Moreau envelope, staleness bound 2), on MNIST-MLP (Dirichlet 0.1, 20 rounds
for the iterative methods, as the paper after BAFFLE) and on
synthetic(0.5, 0.5)-MLP (600 rounds, after pFedMe), 100 clients, one seed,
each through `afl.run_or_reuse` (its results.json under
OUTPUT_DIR/SETTING/ALGORITHM/: a saved run of the same whole configuration is
read back, so an interrupted study resumes, and one of other settings stops
the study with the settings that differ). The settings, the algorithms and
every run's configuration (`afl.get_config`) are checked before the first
run. Every run is timed on the one simulated clock (afl.clock: the same
client device profiles from the seed, the cost model calibrated on this
host).
PersA-FL's server is asynchronous: its "round" is C applied updates, and
its idle time is the clients' waiting for the staleness bound (no round
barrier), its computation and communication those of its applied updates.

Writes OUTPUT_DIR/training_time.json (per setting and algorithm: test
accuracy per round, the per-client averaged total training time split into
computation / idle / communication, how much less FedACnnL's total is
(`fedacnnl_time_reduction`), the real wall time of the simulation,
`experiments.common.training_seconds`) and two figures like the paper's:
fig4_time.png (stacked bars of the average client's computation, idle and
communication time, per setting) and fig5_accuracy.png (test accuracy
against round).
"""

import json
import pathlib
import time

from absl import flags
from absl import logging
import numpy as np

import afl
from afl import catalog
import baselines  # pylint: disable=unused-import  (registers the baselines)
from experiments import common

SETTINGS = {"mnist-mlp": 20, "synthetic-mlp": 600}  # rounds of the paper
# name -> (title, its settings for `afl.get_config`).
ALGORITHMS = {
    "fedacnnl": ("FedACnnL", dict(algorithm="fedacnnl")),
    "fedacnnl_wa": ("FedACnnL-WA", dict(algorithm="fedacnnl_wa")),
    "fedavg": ("FedAvg", dict(algorithm="fedavg")),
    "fedzo": ("FedZO", dict(algorithm="fedzo")),
    "baffle": ("BAFFLE", dict(algorithm="baffle")),
    "meta_fedavg": ("Per-FedAvg", dict(algorithm="meta_fedavg", nu=1)),
    "persafl_maml": (
        "PersA-FL MAML",
        dict(algorithm="persafl", personalization="maml"),
    ),
    # lr 0.05 as in experiments.personalized: pFedMe's 0.005 loses accuracy.
    "persafl_me": (
        "PersA-FL ME",
        dict(algorithm="persafl", personalization="me", lr=0.05),
    ),
}
SPLIT = ("computation_s", "idle_s", "communication_s")


def define_flags():
  """The command line's flags (defined only when run as a program, so that
  the study can be imported next to other entry points)."""
  flags.DEFINE_string("data_dir", None, "Folder with mnist/ (or AFL_DATA_DIR).")
  flags.DEFINE_string("output_dir", "runs/training_time", "Where results go.")
  flags.DEFINE_list("settings", list(SETTINGS), "DATASET-MODEL settings.")
  flags.DEFINE_list("algorithms", list(ALGORITHMS), "Names of ALGORITHMS.")
  flags.DEFINE_integer(
      "rounds", 0, "Rounds of the iterative methods; 0: paper's."
  )
  flags.DEFINE_integer("num_clients", 100, "Clients.")
  flags.DEFINE_integer("seed", 0, "Seed.")


FLAGS = flags.FLAGS


def summary(results: dict) -> dict:
  """What the figures need from one results.json."""
  return {
      # The analytic model is tested once, after its last layer-round.
      "iterative": results["algorithm"] not in catalog.VARIANTS,
      "accuracy_per_round": results["accuracy_per_round"],
      "best_accuracy": results["best_accuracy"],
      "last_accuracy": results["last_accuracy"],
      "time_per_client_s": results["timing"]["mean_per_client"],
      "makespan_s": results["timing"]["makespan_s"],
      "wall_time_s": common.training_seconds(results),
      "compile_time_s": results["compile_time_s"],
  }


def _accuracy_panel(axis, setting: str, runs: dict) -> None:
  """Fig. 5's panel: an iterative method's tested rounds as a curve; an
  analytic one's model, complete after its L layer-rounds, as a marker
  there and a dashed line carried on to the last round of the panel."""
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top

  longest = max(len(v["accuracy_per_round"]) for v in runs.values())
  # Analytic methods of equal accuracy (FedACnnL and -WA: the same weights)
  # overlap: each its own marker, larger first, so all stay visible.
  markers = iter(zip("osD^v", (10, 7, 5, 4, 3)))
  for algorithm, values in runs.items():
    accuracy = np.array(
        [np.nan if a is None else 100 * a for a in values["accuracy_per_round"]]
    )
    rounds = np.arange(1, len(accuracy) + 1)
    title = ALGORITHMS[algorithm][0]
    if values["iterative"]:
      keep = ~np.isnan(accuracy)
      axis.plot(rounds[keep], accuracy[keep], label=title)
    else:
      marker, size = next(markers)
      (line,) = axis.plot(
          [len(accuracy)],
          [accuracy[-1]],
          marker=marker,
          markersize=size,
          linestyle="",
          label=title,
      )
      axis.hlines(
          accuracy[-1],
          len(accuracy),
          max(longest, len(accuracy) + 1),
          colors=line.get_color(),
          linestyles="--",
      )
  axis.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  axis.set(title=setting, xlabel="training round", ylabel="test accuracy (%)")
  axis.grid(alpha=0.3)
  axis.legend(fontsize=8, loc="lower right")


def _time_panel(axis, setting: str, runs: dict) -> None:
  """Fig. 4's panel: computation, idle and communication seconds per
  client, stacked, each bar's total written above it (the analytic bars
  are too small to see beside the zeroth-order ones); a part too small to
  see is given in the labels."""
  names = list(runs)
  bottom = np.zeros(len(names))
  totals = np.array(
      [sum(runs[n]["time_per_client_s"][p] for p in SPLIT) for n in names]
  )
  for part in SPLIT:
    values = np.array([runs[n]["time_per_client_s"][part] for n in names])
    label = part[:-2]
    if (values < 0.01 * totals).all() and values.any():
      label += f" (< 1%: at most {values.max():.2g} s)"
    axis.bar(
        [ALGORITHMS[n][0] for n in names], values, bottom=bottom, label=label
    )
    bottom += values
  for position, total in enumerate(totals):  # the small bars' too
    axis.annotate(
        f"{total:.2g} s",
        (position, total),
        ha="center",
        va="bottom",
        fontsize=8,
    )
  axis.set(title=setting, ylabel="average training time per client (s)")
  axis.set_ylim(top=1.3 * totals.max())  # room for the legend above bars
  axis.tick_params(axis="x", labelrotation=30, labelsize=9)
  for label in axis.get_xticklabels():
    label.set_horizontalalignment("right")
  axis.legend(fontsize=8, loc="upper left", framealpha=0.9)


def plot(study: dict, output_dir: pathlib.Path) -> None:
  plt = common.pyplot()
  settings = list(study)
  for panel, name in (
      (_accuracy_panel, "fig5_accuracy.png"),
      (_time_panel, "fig4_time.png"),
  ):
    figure, axes = plt.subplots(
        1, len(settings), figsize=(6 * len(settings), 4.5), squeeze=False
    )
    for axis, setting in zip(axes[0], settings):
      panel(axis, setting, study[setting])
    figure.tight_layout()
    figure.savefig(output_dir / name, dpi=120)
    plt.close(figure)


def study(output_dir, settings, algorithms, rounds: int = 0, **config) -> dict:
  """Runs (or reads back) every algorithm in every DATASET-MODEL setting,
  writes training_time.json and the two figures.

  Args:
    output_dir: where the runs and the summaries go.
    settings: DATASET-MODEL names (SETTINGS gives the paper's rounds; others
      need `rounds`).
    algorithms: names of ALGORITHMS.
    rounds: rounds of the iterative methods; 0: SETTINGS'.
    **config: common settings of every run (num_clients, seed, data_dir,
      ...; `afl.config.COMMON`).

  Returns:
    {setting: {algorithm: summary(...)}}.

  Raises:
    ValueError: an unknown algorithm or setting, a setting without rounds,
      a run's configuration refused by `afl.get_config`, or a saved run of
      other settings (`runtime.saved_results`); all before any run.
  """
  output_dir = pathlib.Path(output_dir)
  common.check_names("algorithms", algorithms, tuple(ALGORITHMS))
  configs = {}
  for setting in settings:
    if not rounds and setting not in SETTINGS:
      raise ValueError(
          f"setting {setting!r} has no paper rounds (those of "
          f"{', '.join(SETTINGS)}); give the rounds"
      )
    dataset, model = setting.split("-")
    for algorithm in algorithms:
      run_settings = dict(config, dataset=dataset, model=model)
      run_settings.update(ALGORITHMS[algorithm][1])
      if run_settings["algorithm"] not in catalog.VARIANTS:
        run_settings["rounds"] = rounds or SETTINGS[setting]
      configs[setting, algorithm] = afl.get_config(**run_settings)
  for (setting, algorithm), run_config in configs.items():  # before any run
    afl.runtime.saved_results(run_config, output_dir / setting / algorithm)
  results, start = {}, time.perf_counter()
  for setting in settings:
    split = None  # the same data for the algorithms of a setting
    results[setting] = {}
    for algorithm in algorithms:
      run_config = configs[setting, algorithm]
      if split is None:
        split = afl.runtime.prepare_split(run_config)
      values = summary(
          afl.run_or_reuse(run_config, output_dir / setting / algorithm, split)
      )
      results[setting][algorithm] = values
      print(
          f"[{time.perf_counter() - start:7.1f}s] {setting} {algorithm}: "
          f"best {100 * values['best_accuracy']:.2f}, simulated total per "
          f"client {values['time_per_client_s']['total_s']:.4f}s, wall "
          f"{values['wall_time_s']:.1f}s",
          flush=True,
      )
    if "fedacnnl" in results[setting]:
      # The paper's claim: FedACnnL's total time is >= 88% / 98% / 99% less
      # than FedAvg's / FedZO's / BAFFLE's.
      ours = results[setting]["fedacnnl"]["time_per_client_s"]["total_s"]
      for algorithm, values in results[setting].items():
        reduction = 1 - ours / values["time_per_client_s"]["total_s"]
        values["fedacnnl_time_reduction"] = reduction
        print(f"  FedACnnL's time vs {algorithm}: {100 * reduction:.2f}% less")
  output_dir.mkdir(parents=True, exist_ok=True)
  (output_dir / "training_time.json").write_text(json.dumps(results, indent=2))
  plot(results, output_dir)
  return results


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  common.check_names("settings", FLAGS.settings, tuple(SETTINGS))
  study(
      FLAGS.output_dir,
      FLAGS.settings,
      FLAGS.algorithms,
      FLAGS.rounds,
      num_clients=FLAGS.num_clients,
      seed=FLAGS.seed,
      data_dir=FLAGS.data_dir,
  )
  print(
      f"wrote {FLAGS.output_dir}/training_time.json, fig4_time.png, "
      "fig5_accuracy.png"
  )


if __name__ == "__main__":
  define_flags()
  common.run(main)
