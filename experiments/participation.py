r"""Partial participation on MNIST-MLP: accuracy against who takes part.

  python -m experiments.participation --data_dir=../shared/data \
      --output_dir=runs/participation

Two panels, 100 Dirichlet(0.1) clients, seed --seed:

  iterative   FedAvg and pFedMe, every client in every round against
              --clients_per_round sampled (seeded, `afl.participation`),
              test accuracy per tested round;
  analytic    FedACnnL and pFedACnnL with every --dropouts probability
              (0: everyone reports), the same clients' test accuracy.

Every run goes through `afl.run_or_reuse` into OUTPUT_DIR/NAME/ (a saved
run of the same whole configuration is read back, so an interrupted study
resumes). It writes OUTPUT_DIR/participation.json (each run's accuracy
curve, its accuracy (the best round's for the iterative methods, the final
model's for the analytic ones) and last accuracy, training time, and the
mean number of
clients that reported per round) and OUTPUT_DIR/participation.png.
"""

import json
import pathlib

from absl import flags
import numpy as np

import afl
import baselines  # pylint: disable=unused-import  (registers the baselines)
from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("output_dir", "runs/participation", "Where runs go.")
flags.DEFINE_string("data_dir", None, "Folder with mnist/.")
flags.DEFINE_integer("seed", 0, "Root seed.")
flags.DEFINE_integer("rounds", 100, "Rounds of FedAvg and pFedMe.")
flags.DEFINE_integer("eval_every", 5, "Rounds between tests (iterative).")
flags.DEFINE_float("clients_per_round", 20, "Sampled clients (iterative).")
flags.DEFINE_list("dropouts", ["0", "0.1", "0.3"], "Dropouts (analytic).")


def runs() -> dict[str, tuple[str, dict]]:
  """name -> (panel, settings for `afl.get_config`)."""
  common_settings = dict(
      dataset="mnist", model="mlp", data_dir=FLAGS.data_dir, seed=FLAGS.seed
  )
  out = {}
  for algorithm in ("fedavg", "pfedme"):
    iterative = dict(
        common_settings,
        algorithm=algorithm,
        rounds=FLAGS.rounds,
        eval_every=FLAGS.eval_every,
    )
    out[f"{algorithm}_all"] = ("iterative", iterative)
    out[f"{algorithm}_sampled"] = (
        "iterative",
        dict(iterative, clients_per_round=FLAGS.clients_per_round),
    )
  for algorithm in ("fedacnnl", "pfedacnnl"):
    for dropout in FLAGS.dropouts:
      out[f"{algorithm}_dropout{dropout}"] = (
          "analytic",
          dict(common_settings, algorithm=algorithm, dropout=float(dropout)),
      )
  return out


def label(settings: dict) -> str:
  name = settings["algorithm"]
  if "clients_per_round" in settings:
    return f"{name}, {settings['clients_per_round']:g} of 100 per round"
  if "dropout" in settings:
    return f"{name}, dropout {settings['dropout']:g}"
  return f"{name}, all 100 clients"


def summary(results: dict) -> dict:
  config = results["config"]
  reported = [r["reported"] for r in results["rounds"] if "reported" in r]
  return {
      "label": label(
          dict(
              {
                  k: config[k]
                  for k in ("clients_per_round", "dropout")
                  if config[k]
              },
              algorithm=results["algorithm"],
          )
      ),
      # The run's accuracy: the best round's (iterative), the final
      # model's (analytic, whose earlier rounds test partial models).
      "accuracy": results["accuracy"],
      "last_accuracy": results["last_accuracy"],
      "accuracy_per_round": results["accuracy_per_round"],
      "wall_time_s": results["wall_time_s"],
      "reported_per_round_mean": (
          float(np.mean(reported)) if reported else results["num_clients"]
      ),
  }


def plot(report: dict, panels: dict, path: pathlib.Path) -> None:
  plt = common.pyplot()
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  for name, entry in report.items():
    curve = entry["accuracy_per_round"]
    if panels[name] == "iterative":
      rounds = [i + 1 for i, a in enumerate(curve) if a is not None]
      left.plot(
          rounds,
          [a for a in curve if a is not None],
          label=entry["label"],
          linestyle="-" if name.endswith("_all") else "--",
      )
  left.set(
      xlabel="round", ylabel="test accuracy", title="Iterative (MNIST-MLP)"
  )
  left.legend(fontsize=8)
  analytic = [n for n in report if panels[n] == "analytic"]
  algorithms = sorted({n.split("_dropout")[0] for n in analytic})
  dropouts = FLAGS.dropouts
  width = 0.8 / len(dropouts)
  for i, dropout in enumerate(dropouts):
    values = [report[f"{a}_dropout{dropout}"]["accuracy"] for a in algorithms]
    bars = right.bar(
        np.arange(len(algorithms)) + i * width,
        values,
        width,
        label=f"dropout {float(dropout):g}",
    )
    right.bar_label(bars, fmt="%.3f", fontsize=7)
  right.set_xticks(np.arange(len(algorithms)) + width * (len(dropouts) - 1) / 2)
  right.set_xticklabels(algorithms)
  right.set(
      ylabel="test accuracy", title="Analytic (MNIST-MLP)", ylim=(0, 1.15)
  )
  right.legend(fontsize=8, loc="upper center", ncol=len(dropouts))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  out = pathlib.Path(FLAGS.output_dir)
  planned = runs()
  configs = {n: afl.get_config(**s) for n, (_, s) in planned.items()}
  report = {}
  for name, config in configs.items():
    print(f"{name} ...", flush=True)
    results = afl.runtime.run_or_reuse(config, out / name)
    report[name] = summary(results)
    print(
        f"{name}: accuracy {report[name]['accuracy']:.4f}, last "
        f"{report[name]['last_accuracy']:.4f}, "
        f"{report[name]['reported_per_round_mean']:.1f} reported per round, "
        f"{report[name]['wall_time_s']:.1f}s",
        flush=True,
    )
  out.mkdir(parents=True, exist_ok=True)
  (out / "participation.json").write_text(json.dumps(report, indent=2))
  plot(
      report, {n: p for n, (p, _) in planned.items()}, out / "participation.png"
  )
  print(f"wrote {out / 'participation.json'} and participation.png")


if __name__ == "__main__":
  common.run(main)
