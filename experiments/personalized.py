r"""Personalized-FL comparison: meta-FL and PersA-FL next to pFedMe, pFedACnnL
and FedAvg's global model, against simulated training time.

  python -m experiments.personalized --data_dir=../shared/data \
      --output_dir=runs/personalized --datasets=mnist,synthetic --seeds=5

Runs every method of `METHODS` on each dataset with the [128, 64] MLP, 100
clients, seeds 0..S-1 (fixed data: --data_seed), each through
`afl.run_or_reuse` into OUTPUT_DIR/DATASET/METHOD/seed_S/ (a saved run of
the same whole configuration is read back, so an interrupted study resumes;
one saved with other settings, e.g. another --rounds, stops the study with
the settings that differ instead of being mixed in or overwritten). The
datasets, the methods and every run's configuration (`afl.get_config`) are
checked before the first run. It writes

  OUTPUT_DIR/personalized.md    best and last test accuracy, mean +- std
                                (ddof 0) over seeds, and the seed-mean
                                simulated time of the run;
  OUTPUT_DIR/personalized.json  every seed's numbers and curves;
  OUTPUT_DIR/DATASET.png        seed-mean accuracy against simulated time.

Accuracy is each client's personalized model on its own test split (FedAvg:
the global model). Simulated time is the shared clock's (`afl.clock`, the
same device profiles for a seed): the synchronous methods' rounds as the
clock times them (results.json `rounds[].timing.last_arrival_s`), PersA-FL's
asynchronous events (`time_per_round_s`), pFedACnnL one point at its
makespan.
"""

import json
import pathlib

from absl import flags
from absl import logging
import ml_collections
import numpy as np

import afl
from afl import catalog
import baselines  # pylint: disable=unused-import  (registers the baselines)
from experiments import common

# name -> (label, its settings for `afl.get_config`).
METHODS = {
    "fedavg": ("FedAvg (global)", dict(algorithm="fedavg")),
    "pfedme": ("pFedMe", dict(algorithm="pfedme")),
    # pFedMe's local lr 0.005 (its 800-round setting) loses personalized
    # accuracy over the first rounds here; 0.05 learns (README).
    "pfedme_lr05": ("pFedMe, lr 0.05", dict(algorithm="pfedme", lr=0.05)),
    "pfedacnnl": ("pFedACnnL", dict(algorithm="pfedacnnl")),
    "meta_nu1": (
        "meta-FedAvg nu=1 (Per-FedAvg)",
        dict(algorithm="meta_fedavg", nu=1),
    ),
    "meta_nu2": ("meta-FedAvg nu=2", dict(algorithm="meta_fedavg", nu=2)),
    "meta_nu5": ("meta-FedAvg nu=5", dict(algorithm="meta_fedavg", nu=5)),
    "persafl_maml": (
        "PersA-FL MAML",
        dict(algorithm="persafl", personalization="maml"),
    ),
    "persafl_me": (
        "PersA-FL ME, lr 0.05",
        dict(algorithm="persafl", personalization="me", lr=0.05),
    ),
    "persafl_me_lr005": (
        "PersA-FL ME, pFedMe's lr 0.005",
        dict(algorithm="persafl", personalization="me"),
    ),
    "persafl_maml_sync": (
        "PersA-FL MAML, staleness 0 (synchronous)",
        dict(algorithm="persafl", personalization="maml", max_staleness=0),
    ),
    "persafl_me_sync": (
        "PersA-FL ME, lr 0.05, staleness 0 (synchronous)",
        dict(
            algorithm="persafl", personalization="me", lr=0.05, max_staleness=0
        ),
    ),
}


def define_flags():
  """The command line's flags (defined only when run as a program, so that
  the study can be imported next to other entry points)."""
  flags.DEFINE_string("output_dir", None, "Where the runs go.", required=True)
  flags.DEFINE_string("data_dir", None, "Folder with mnist/.")
  flags.DEFINE_list("datasets", ["mnist", "synthetic"], "Datasets (MLP model).")
  flags.DEFINE_list("methods", list(METHODS), "Methods of METHODS.")
  flags.DEFINE_integer("seeds", 5, "Seeds 0..S-1.")
  flags.DEFINE_integer("data_seed", 0, "Seed of the data; -1: each seed's.")
  flags.DEFINE_integer("num_clients", 100, "Clients.")
  flags.DEFINE_integer(
      "rounds",
      0,
      "Rounds of the iterative methods; 0: 20 (mnist), 100 (synthetic).",
  )
  flags.DEFINE_integer("eval_every", 1, "Rounds between tests.")


FLAGS = flags.FLAGS

# Rounds of the iterative methods when --rounds is 0.
DEFAULT_ROUNDS = {"mnist": 20, "cifar10": 20, "synthetic": 100}


def curve(results: dict) -> tuple[list[float], list]:
  """(simulated seconds, test accuracy) at the end of each recorded round:
  PersA-FL's `time_per_round_s`, the synchronous rounds' last arrival on
  the shared clock, pFedACnnL's makespan and accuracy (one point)."""
  if results["algorithm"] in catalog.VARIANTS:
    return [results["timing"]["makespan_s"]], [results["accuracy"]]
  if "time_per_round_s" in results:
    times = results["time_per_round_s"]
  else:
    times = [r["timing"]["last_arrival_s"] for r in results["rounds"]]
  return times, results["accuracy_per_round"]


def method_config(
    dataset: str, method: str, seed: int, rounds: int, **settings
) -> ml_collections.ConfigDict:
  """The run of `method` on `dataset` for `seed`: `settings` (num_clients,
  model, ...), then the method's own; `rounds` if it trains in rounds."""
  config = dict(settings, dataset=dataset, seed=seed)
  config.update(METHODS[method][1])
  if config["algorithm"] not in catalog.VARIANTS:
    config["rounds"] = rounds
  return afl.get_config(**config)


def summarize(runs: list[dict]) -> dict:
  """Mean and (population, ddof 0) standard deviation over the seeds of the
  best and the last test accuracy (%) and the final simulated time."""
  best = [100 * r["accuracy"] for r in runs]
  last = [100 * r["last_accuracy"] for r in runs]
  curves = [curve(r) for r in runs]
  return {
      "seeds": len(runs),
      "best_mean": float(np.mean(best)),
      "best_std": float(np.std(best)),
      "last_mean": float(np.mean(last)),
      "last_std": float(np.std(last)),
      "simulated_s_mean": float(np.mean([t[-1] for t, _ in curves])),
      "best": best,
      "last": last,
      "curves": [{"time_s": t, "accuracy": a} for t, a in curves],
  }


def plot(title: str, table: dict, path: pathlib.Path) -> None:
  """Seed-mean test accuracy against simulated time, one line per method."""
  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for row in table.values():
    curves = row["curves"]
    length = min(len(c["time_s"]) for c in curves)
    times = np.mean([c["time_s"][:length] for c in curves], 0)
    accuracy = np.array(
        [
            [np.nan if a is None else a for a in c["accuracy"][:length]]
            for c in curves
        ],
        np.float64,
    )
    mean = 100 * np.nanmean(accuracy, 0)
    tested = np.isfinite(mean)  # rounds between tests have no accuracy
    style = "o" if tested.sum() == 1 else ".-"
    ax.plot(times[tested], mean[tested], style, label=row["label"])
  ax.set_xscale("log")
  ax.set_xlabel("simulated training time (s, shared clock)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def markdown(title: str, table: dict) -> list[str]:
  lines = [
      f"### {title}",
      "",
      "| method | best accuracy (%) | last accuracy (%) | simulated time (s) |",
      "|---|---|---|---|",
  ]
  for row in table.values():
    lines.append(
        f"| {row['label']} | {row['best_mean']:.2f} +- {row['best_std']:.2f}"
        f" | {row['last_mean']:.2f} +- {row['last_std']:.2f} |"
        f" {row['simulated_s_mean']:.4g} |"
    )
  return lines + [""]


def study(
    output_dir,
    datasets,
    methods,
    seeds: int,
    rounds: int = 0,
    **settings,
) -> dict:
  """Runs (or reads back) every method on every dataset for seeds
  0..seeds-1 and writes the table, JSON and figures (module docstring).

  Args:
    output_dir: where the runs and the summaries go.
    datasets: names, of DEFAULT_ROUNDS.
    methods: keys of METHODS.
    seeds: S.
    rounds: rounds of the iterative methods; 0: DEFAULT_ROUNDS.
    **settings: common settings of every run (num_clients, data_seed,
      data_dir, eval_every, ...; `afl.config.COMMON`; model: "mlp" unless
      given).

  Returns:
    {dataset: {method: summarize(...) with its label}}.

  Raises:
    ValueError: an unknown dataset or method, a run's configuration refused
      by `afl.get_config`, or a saved run of other settings
      (`runtime.saved_results`); all before any run.
  """
  output_dir = pathlib.Path(output_dir)
  common.check_names("datasets", datasets, tuple(DEFAULT_ROUNDS))
  common.check_names("methods", methods, tuple(METHODS))
  settings.setdefault("model", "mlp")
  configs = {
      (dataset, method, seed): method_config(
          dataset,
          method,
          seed,
          rounds or DEFAULT_ROUNDS[dataset],
          **settings,
      )
      for dataset in datasets
      for method in methods
      for seed in range(seeds)
  }
  for (dataset, method, seed), config in configs.items():  # before any run
    afl.runtime.saved_results(
        config, output_dir / dataset / method / f"seed_{seed}"
    )
  tables, lines = {}, []
  for dataset in datasets:
    table = {}
    for method in methods:
      runs = [
          afl.run_or_reuse(
              configs[dataset, method, seed],
              output_dir / dataset / method / f"seed_{seed}",
              progress=True,  # a run's rounds, one line each
          )
          for seed in range(seeds)
      ]
      table[method] = dict(label=METHODS[method][0], **summarize(runs))
    tables[dataset] = table
    title = (
        f"{dataset}-{settings['model'].upper()}, "
        f"{runs[0]['num_clients']} clients, {seeds} seed(s)"
    )
    plot(title, table, output_dir / f"{dataset}.png")
    lines += markdown(title, table)
  (output_dir / "personalized.md").write_text("\n".join(lines))
  (output_dir / "personalized.json").write_text(json.dumps(tables, indent=1))
  return tables


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  study(
      FLAGS.output_dir,
      FLAGS.datasets,
      FLAGS.methods,
      FLAGS.seeds,
      rounds=FLAGS.rounds,
      num_clients=FLAGS.num_clients,
      data_seed=FLAGS.data_seed,
      data_dir=FLAGS.data_dir,
      eval_every=FLAGS.eval_every,
  )
  print((pathlib.Path(FLAGS.output_dir) / "personalized.md").read_text())


if __name__ == "__main__":
  define_flags()
  common.run(main)
