r"""Accuracy against the privacy budget epsilon (issue 19, afl/privacy.py).

  python -m experiments.privacy --data_dir=../shared/data \
      --output_dir=runs/privacy

FedACnnL and pFedACnnL (sample-level DP of every upload) next to DP-FedAvg
(client-level) on MNIST-LR and MNIST-MLP, 100 Dirichlet(0.1) clients,
delta = --delta, every --epsilons value in both --modes (local: every
upload private by itself; distributed: only the secure sum of the noise
shares is), and each algorithm without privacy (epsilon = inf). The
analytic algorithms use their default --dp_clip (rows) unless
--analytic_clip; DP-FedAvg runs --fedavg_rounds rounds (all clients every
round) with update clip --fedavg_clip. pFedACnnL's private runs use
--private_eps (300) for eq. 13's epsilon: the paper's 2500 balances a
client's G_i of raw rows, and clipping MNIST's rows to 3 (median norm 9.3)
shrinks G_i about (3 / 9.3)^2 = 0.10x, so the prior's weight shrinks
alike (experiments/README.md, "Privacy"). DP-FedAvg's cell is its last
round's accuracy (choosing the best round on the test data is not
private); the analytic algorithms are tested once.

Every run goes through `afl.run_or_reuse` into OUTPUT_DIR/SETTING/NAME/ (a
saved run of the same whole configuration is read back, so an interrupted
study resumes). It writes OUTPUT_DIR/privacy.json (every run's accuracy,
noise multiplier and epsilon spent), privacy.md (the table) and
privacy.png.

Distributed mode runs the analytic algorithms with --secure_sum (each
client's noise share added before its upload is encoded and masked);
DP-FedAvg's distributed mode is the central one (`afl.privacy`).
"""

import json
import math
import pathlib

from absl import flags

import afl
import baselines  # pylint: disable=unused-import  (registers FedAvg)
from experiments import common

FLAGS = flags.FLAGS
SETTINGS = ("mnist-lr", "mnist-mlp")
ALGORITHMS = ("fedacnnl", "pfedacnnl", "fedavg")
TITLES = dict(fedacnnl="FedACnnL", pfedacnnl="pFedACnnL", fedavg="DP-FedAvg")
flags.DEFINE_string("output_dir", "runs/privacy", "Where runs go.")
flags.DEFINE_string("data_dir", None, "Folder with mnist/.")
flags.DEFINE_integer("seed", 0, "Root seed.")
flags.DEFINE_list("settings", list(SETTINGS), "DATASET-MODEL rows.")
flags.DEFINE_list("algorithms", list(ALGORITHMS), "Algorithms.")
flags.DEFINE_list("modes", ["local", "distributed"], "--dp_mode values.")
flags.DEFINE_list("epsilons", ["0.5", "1", "2", "4", "8"], "Finite epsilons.")
flags.DEFINE_float("delta", 1e-5, "--dp_delta.")
flags.DEFINE_float("analytic_clip", None, "--dp_clip of FedACnnL/pFedACnnL.")
flags.DEFINE_float(
    "private_eps",
    300.0,
    "pFedACnnL's --eps (eq. 13) in the private runs (module docstring); "
    "0: its default (2500).",
)
flags.DEFINE_float("fedavg_clip", 1.0, "DP-FedAvg's update clip.")
flags.DEFINE_integer("fedavg_rounds", 20, "DP-FedAvg's rounds.")
flags.DEFINE_integer("eval_every", 5, "DP-FedAvg's rounds between tests.")


def runs() -> dict[str, dict]:
  """SETTING/NAME -> settings for `afl.get_config`."""
  out = {}
  for setting in FLAGS.settings:
    dataset, model = setting.split("-")
    for algorithm in FLAGS.algorithms:
      base = dict(
          algorithm=algorithm,
          dataset=dataset,
          model=model,
          data_dir=FLAGS.data_dir,
          seed=FLAGS.seed,
      )
      clip = FLAGS.analytic_clip
      if algorithm == "fedavg":
        base.update(rounds=FLAGS.fedavg_rounds, eval_every=FLAGS.eval_every)
        clip = FLAGS.fedavg_clip
      out[f"{setting}/{algorithm}_nonprivate"] = base
      for mode in FLAGS.modes:
        for epsilon in FLAGS.epsilons:
          private = dict(
              base,
              dp_mode=mode,
              dp_epsilon=float(epsilon),
              dp_delta=FLAGS.delta,
          )
          if clip is not None:
            private["dp_clip"] = clip
          if algorithm == "pfedacnnl" and FLAGS.private_eps:
            private["eps"] = FLAGS.private_eps
          if mode == "distributed" and algorithm != "fedavg":
            private["secure_sum"] = True  # the analytic sums need it
          out[f"{setting}/{algorithm}_{mode}_eps{epsilon}"] = private
  return out


def summary(results: dict) -> dict:
  section = results["privacy"] or {}
  return {
      "algorithm": results["algorithm"],
      "mode": section.get("mode", "off"),
      "epsilon": section.get("epsilon", math.inf),
      "epsilon_spent": section.get("epsilon_spent", math.inf),
      "noise_multiplier": section.get("noise_multiplier", 0.0),
      "clip": section.get("clip"),
      "releases": section.get("releases"),
      # DP-FedAvg: the last round's (module docstring); analytic: the one.
      "accuracy": results["last_accuracy"],
      "best_accuracy": results["best_accuracy"],
      "wall_time_s": results["wall_time_s"],
  }


def table(report: dict) -> str:
  epsilons = [float(e) for e in FLAGS.epsilons]
  header = ["setting", "algorithm", "mode"] + [f"eps {e:g}" for e in epsilons]
  lines = [
      "| " + " | ".join(header + ["eps inf"]) + " |",
      "|" + "---|" * (len(header) + 1),
  ]
  for setting in FLAGS.settings:
    for algorithm in FLAGS.algorithms:
      plain = report[f"{setting}/{algorithm}_nonprivate"]["accuracy"]
      for mode in FLAGS.modes:
        cells = [
            f"{report[f'{setting}/{algorithm}_{mode}_eps{e}']['accuracy']:.4f}"
            for e in FLAGS.epsilons
        ]
        lines.append(
            f"| {setting} | {TITLES[algorithm]} | {mode} | "
            + " | ".join(cells)
            + f" | {plain:.4f} |"
        )
  return "\n".join(lines) + "\n"


def plot(report: dict, path: pathlib.Path) -> None:
  epsilons = [float(e) for e in FLAGS.epsilons]
  # inf drawn one doubling past the largest finite epsilon.
  where_inf = max(epsilons) * 2
  plt = common.pyplot()
  fig, axes = plt.subplots(
      1, len(FLAGS.settings), figsize=(5.5 * len(FLAGS.settings), 4.6)
  )
  axes = [axes] if len(FLAGS.settings) == 1 else list(axes)
  colors = dict(fedacnnl="C0", pfedacnnl="C1", fedavg="C2")
  for ax, setting in zip(axes, FLAGS.settings):
    for algorithm in FLAGS.algorithms:
      plain = report[f"{setting}/{algorithm}_nonprivate"]["accuracy"]
      for mode in FLAGS.modes:
        values = [
            report[f"{setting}/{algorithm}_{mode}_eps{e}"]["accuracy"]
            for e in FLAGS.epsilons
        ]
        ax.plot(
            epsilons + [where_inf],
            values + [plain],
            marker="o",
            color=colors[algorithm],
            linestyle="-" if mode == "local" else "--",
            label=f"{TITLES[algorithm]}, {mode}",
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(epsilons + [where_inf])
    ax.set_xticklabels([f"{e:g}" for e in epsilons] + ["inf"])
    ax.set(
        xlabel="epsilon (delta = %g)" % FLAGS.delta,
        ylabel="test accuracy",
        title=setting.upper(),
        ylim=(0, 1),
    )
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
  fig.tight_layout(rect=(0, 0.13, 1, 1))
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  common.check_names("settings", FLAGS.settings, SETTINGS)
  common.check_names("algorithms", FLAGS.algorithms, ALGORITHMS)
  common.check_names("modes", FLAGS.modes, ("local", "distributed"))
  out = pathlib.Path(FLAGS.output_dir)
  configs = {name: afl.get_config(**s) for name, s in runs().items()}
  report = {}
  for name, config in configs.items():
    results = afl.runtime.run_or_reuse(config, out / name)
    report[name] = summary(results)
    print(
        f"{name}: accuracy {report[name]['accuracy']:.4f}, z "
        f"{report[name]['noise_multiplier']:.3f}, epsilon spent "
        f"{report[name]['epsilon_spent']:.3f}, "
        f"{report[name]['wall_time_s']:.1f}s",
        flush=True,
    )
  out.mkdir(parents=True, exist_ok=True)
  (out / "privacy.json").write_text(json.dumps(report, indent=2))
  (out / "privacy.md").write_text(table(report))
  plot(report, out / "privacy.png")
  print(table(report))
  print(f"wrote {out / 'privacy.json'}, privacy.md and privacy.png")


if __name__ == "__main__":
  common.run(main)
