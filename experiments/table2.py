r"""Reproduces Table II of the paper: overall test accuracy, mean +- std of seeds.

  python -m experiments.table2 --data_dir=../shared/data --output_dir=runs/table2

Runs every column on {MNIST, synthetic(0.5, 0.5)} x {DNN (the [128, 64] MLP),
LR}, 100 clients, seeds 0..4, and writes OUTPUT_DIR/table2.md (ours next to
the paper's numbers) and OUTPUT_DIR/table2.json (every seed's accuracy). Each
run keeps its own results.json under OUTPUT_DIR/SETTING/COLUMN/seed_S/ and
goes through `afl.run_or_reuse`: a saved run of the same whole configuration
is read back instead of repeated, so an interrupted table resumes where it
stopped, and a saved run of other settings (another --num_clients, say)
stops the table with the settings that differ. The columns and settings are
checked, and every cell's configuration is built (`afl.get_config`), before
the first run.

The data (client split, synthetic generator) is fixed by --data_seed (0) and
the seeds vary the rest (label encodings, K-means, initialization): the
paper's standard deviations of 0.00 for the deterministic LR columns imply
one fixed dataset. --data_seed=-1 draws new data for every seed instead.

Each run's folder also gets `cell.json`: what the table needs of the run
(its accuracies per round, times, configuration) without the rest of
results.json (a 1,000-round pFedMe run's is 11 MB, mostly its simulated
clock per client and round). --missing=skip assembles the table from the
runs saved in OUTPUT_DIR (results.json, else cell.json) without starting
any: a cell rests on the seeds saved so far (each cell says how many
seeds, and for pFedMe / pFedZO how many rounds), a cell with none is "-".
The runs behind the table in experiments/README.md are kept in the
repository (experiments/results/table2/, cell.json only):

  python -m experiments.table2 --output_dir=experiments/results/table2 \
      --missing=skip

prints it in seconds, and the same command without --missing=skip (with
--data_dir) continues the missing runs, each resuming from its checkpoint.

The columns are the paper's (`COLUMNS`). pFedMe and pFedZO run through the
same `afl.run_or_reuse` as the analytic columns for --rounds rounds (1,000,
as the paper) with the papers' hyperparameters (`baselines.iterative`);
their cell is the best test accuracy over the rounds, as the paper's, and
table2.json also holds the last round's (`last_mean`, `last_std`).
"""

import json
import pathlib
import time

from absl import flags
from absl import logging
import ml_collections
import numpy as np

import afl
from afl import catalog
from afl import config as config_lib
import baselines  # pylint: disable=unused-import  (registers pFedMe, pFedZO)
from experiments import common

# Table II of the paper (percent).
PAPER = {
    "mnist-mlp": dict(
        fedacnnl=90.76,
        pfedacnnl_wc=96.85,
        pfedacnnl_wp=93.66,
        pfedme=96.92,
        pfedzo=96.17,
        pfedacnnl=96.23,
    ),
    "synthetic-mlp": dict(
        fedacnnl=86.09,
        pfedacnnl_wc=88.63,
        pfedacnnl_wp=89.22,
        pfedme=88.58,
        pfedzo=89.05,
        pfedacnnl=90.00,
    ),
    "mnist-lr": dict(
        fedacnnl=87.11,
        pfedacnnl_wc=96.24,
        pfedacnnl_wp=91.79,
        pfedme=93.22,
        pfedzo=93.09,
        pfedacnnl=95.81,
    ),
    "synthetic-lr": dict(
        fedacnnl=81.80,
        pfedacnnl_wc=87.81,
        pfedacnnl_wp=88.33,
        pfedme=83.13,
        pfedzo=72.14,
        pfedacnnl=88.96,
    ),
}
COLUMNS = (
    "fedacnnl",
    "pfedacnnl_wc",
    "pfedacnnl_wp",
    "pfedme",
    "pfedzo",
    "pfedacnnl",
)
TITLES = dict(
    fedacnnl="FedACnnL",
    pfedacnnl_wc="pFedACnnL-WC",
    pfedacnnl_wp="pFedACnnL-WP",
    pfedme="pFedMe",
    pfedzo="pFedZO",
    pfedacnnl="pFedACnnL",
)

flags.DEFINE_string("data_dir", None, "Folder with mnist/ (or AFL_DATA_DIR).")
flags.DEFINE_string("output_dir", "runs/table2", "Where the table goes.")
flags.DEFINE_list("settings", list(PAPER), "Rows: DATASET-MODEL.")
flags.DEFINE_list("columns", list(COLUMNS), "Columns (algorithms) to run.")
flags.DEFINE_integer("seeds", 5, "Seeds 0..seeds-1 per cell.")
flags.DEFINE_integer("num_clients", 100, "Clients.")
flags.DEFINE_integer(
    "rounds", 1000, "Rounds of the iterative columns (pFedMe, pFedZO)."
)
flags.DEFINE_integer(
    "eval_every", 1, "Rounds between tests of the iterative columns."
)
flags.DEFINE_integer(
    "data_seed",
    0,
    "Seed of the data, the same for every seed; -1: each "
    "seed draws its own data.",
)
flags.DEFINE_enum(
    "pfedme_tested",
    "local",
    ["theta", "local"],
    "What the pFedMe / pFedZO columns test: each client's theta (the "
    "paper's personalized model) or its w_i, which is what the authors' code "
    "tests and so what their published numbers measure (README).",
)
flags.DEFINE_enum(
    "missing",
    "run",
    ["run", "skip"],
    "A cell's seed with no saved run: run it, or leave it out of the table "
    "(assemble the saved runs only, in seconds).",
)
FLAGS = flags.FLAGS


def cell_config(
    setting: str, column: str, seed: int
) -> ml_collections.ConfigDict:
  """The configuration of one (setting, column, seed) run from the flags."""
  dataset, model = setting.split("-")
  settings = dict(
      algorithm=column,
      dataset=dataset,
      model=model,
      seed=seed,
      data_seed=FLAGS.data_seed,
      num_clients=FLAGS.num_clients,
      data_dir=FLAGS.data_dir,
  )
  if column not in catalog.VARIANTS:  # pFedMe, pFedZO
    settings.update(
        rounds=FLAGS.rounds,
        eval_every=FLAGS.eval_every,
        pfedme_tested=FLAGS.pfedme_tested,
    )
  return afl.get_config(**settings)


CELL = "cell.json"
# What cell.json keeps of a run's results.json.
CELL_FIELDS = (
    "algorithm",
    "dataset",
    "seed",
    "status",
    "accuracy",
    "best_accuracy",
    "best_round",
    "last_accuracy",
    "accuracy_per_round",
    "wall_time_s",
    "eval_time_s",
    "compile_time_s",
    "num_devices",
    "jax_version",
    "config",
)


def cell_record(results: dict) -> dict:
  """cell.json of a run: `CELL_FIELDS` of its results and its rounds."""
  return dict(
      {name: results.get(name) for name in CELL_FIELDS},
      num_rounds=len(results["rounds"]),
  )


def saved_cell(
    config: ml_collections.ConfigDict, folder: pathlib.Path
) -> dict | None:
  """The cell record of the run of `config` saved in `folder`: from its
  results.json (writing cell.json beside it if missing), else from
  cell.json alone; None if neither is there. A saved run of other
  settings is a ValueError naming them (`runtime.saved_results`)."""
  results = afl.runtime.saved_results(config, folder)
  if results is not None:
    record = cell_record(results)
    if not (folder / CELL).exists():
      (folder / CELL).write_text(json.dumps(record, indent=1))
    return record
  if not (folder / CELL).exists():
    return None
  record = json.loads((folder / CELL).read_text())
  differ = config_lib.differences(record["config"], config.to_dict())
  if differ:
    raise ValueError(
        f"{folder / CELL} holds a run of other settings ({'; '.join(differ)})"
        ": remove it or choose another output folder"
    )
  return record


def summarize(runs: dict) -> dict:
  """{setting: {column: [cell record of each saved seed]}} -> per cell the mean
  and standard deviation over its seeds (ddof=0) in percent, the seeds'
  values, and the last round's mean and std; for pFedMe / pFedZO the
  rounds the cell rests on. Cells without a run are left out."""
  table = {}
  for setting, columns in runs.items():
    table[setting] = {}
    for column, results in columns.items():
      if not results:
        continue
      values = 100 * np.asarray([r["accuracy"] for r in results])
      last = 100 * np.asarray([r["last_accuracy"] for r in results])
      paper = PAPER[setting].get(column)
      table[setting][column] = {
          "mean": float(values.mean()),
          "std": float(values.std()),
          "seeds": values.tolist(),
          "paper": paper,
          "delta": None if paper is None else float(values.mean() - paper),
          "last_mean": float(last.mean()),
          "last_std": float(last.std()),
          "rounds": (
              None
              if column in catalog.VARIANTS
              else min(r["num_rounds"] for r in results)
          ),
      }
  return table


def _cell(cell: dict | None) -> str:
  """A cell of the markdown table: mean +- std (paper), seeds and rounds."""
  if cell is None:
    return "-"
  rests_on = f"{len(cell['seeds'])} seed{'s' * (len(cell['seeds']) > 1)}"
  if cell["rounds"] is not None:
    rests_on += f" x {cell['rounds']} rounds"
  return (
      f"{cell['mean']:.2f} +- {cell['std']:.2f} (paper {cell['paper']:.2f};"
      f" {rests_on})"
  )


def markdown(table: dict, columns) -> str:
  head = "| setting | " + " | ".join(TITLES[c] for c in columns) + " |"
  lines = [head, "|" + " --- |" * (len(columns) + 1)]
  for setting, cells in table.items():
    row = [_cell(cells.get(c)) for c in columns]
    lines.append(f"| {setting} | " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"


def run_table(output_dir: pathlib.Path) -> dict:
  """Checks the flags and builds every cell's configuration, then runs (or
  reads back; with --missing=skip only reads back) the cells, printing one
  line each; returns `summarize`'s table."""
  common.check_names("settings", FLAGS.settings, tuple(PAPER))
  common.check_names("columns", FLAGS.columns, COLUMNS)
  seeds = range(FLAGS.seeds)
  configs = {
      (setting, column, seed): cell_config(setting, column, seed)
      for setting in FLAGS.settings
      for seed in seeds
      for column in FLAGS.columns
  }
  folders = {
      key: output_dir / key[0] / key[1] / f"seed_{key[2]}" for key in configs
  }
  saved = {  # read (and checked) before any run
      key: saved_cell(config, folders[key]) for key, config in configs.items()
  }
  runs = {s: {c: [] for c in FLAGS.columns} for s in FLAGS.settings}
  start = time.perf_counter()
  for setting in FLAGS.settings:
    for seed in seeds:
      split = None  # the same data for the columns of a seed
      for column in FLAGS.columns:
        key = setting, column, seed
        results = saved[key]
        if results is None and FLAGS.missing == "run":
          if split is None:
            split = afl.runtime.prepare_split(configs[key])
          afl.run_or_reuse(configs[key], folders[key], split)
          results = saved_cell(configs[key], folders[key])
        if results is None:
          continue
        runs[setting][column].append(results)
        print(
            f"[{time.perf_counter() - start:7.1f}s] {setting} {column} "
            f"seed {seed}: {100 * results['accuracy']:.2f}",
            flush=True,
        )
  return summarize(runs)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # the runs' own logs are per round
  output_dir = pathlib.Path(FLAGS.output_dir)
  table = run_table(output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  (output_dir / "table2.json").write_text(json.dumps(table, indent=2))
  text = markdown(table, FLAGS.columns)
  (output_dir / "table2.md").write_text(text)
  print(text)


if __name__ == "__main__":
  common.run(main)
