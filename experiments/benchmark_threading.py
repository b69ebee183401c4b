r"""Round time of each algorithm under each CPU threading option.

  python -m experiments.benchmark_threading --data_dir=../shared/data

How a CPU host is used is settled before JAX starts (XLA_FLAGS, the cores a
process may run on), so each option runs `experiments.run` in its own
process: FedAvg (one local epoch, batch 20), pFedMe (K = 5, R = 20) on
MNIST-MLP and MNIST-LR, FedACnnL and pFedACnnL on MNIST-MLP, 100 Dirichlet
0.1 clients, the papers' settings. The options:

  one_core        the process pinned to one core (`taskset`): the
                  reference a run must never be slower than;
  eigen           one CPU device, XLA's intra-op thread pool over every
                  core (JAX's default);
  one_thread      one CPU device, one thread
                  (--xla_cpu_multi_thread_eigen=false);
  devices         a CPU device per core, each with the intra-op pool;
  devices_one_thread  a CPU device per core, one thread each (the clients
                  are sharded over the devices, so the cores work on
                  different clients at once).

Each (algorithm, option) is run `--repeats` times, the options of one
algorithm alternating within a repeat (they see the same load); a run's
time is its median round (iterative: the rounds' `seconds`, compilation
excluded) or its whole training (analytic: `wall_time_s`). The first run
of each compiles into the persistent cache and is not counted. Prints
each option's median as a ratio to `--reference` and writes the numbers
to OUTPUT_DIR/threading.json.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

from absl import flags
import numpy as np

from experiments import common

_CORES = len(os.sched_getaffinity(0))
OPTIONS = {
    "one_core": ("", True),
    "eigen": ("--xla_force_host_platform_device_count=1", False),
    "one_thread": (
        "--xla_force_host_platform_device_count=1 "
        "--xla_cpu_multi_thread_eigen=false",
        False,
    ),
    "devices": (f"--xla_force_host_platform_device_count={_CORES}", False),
    "devices_one_thread": (
        f"--xla_force_host_platform_device_count={_CORES} "
        "--xla_cpu_multi_thread_eigen=false",
        False,
    ),
}
CASES = {
    "fedavg-mlp": ("fedavg", "mlp", ["--rounds=4"]),
    "pfedme-mlp": ("pfedme", "mlp", ["--rounds=4"]),
    "pfedme-lr": ("pfedme", "lr", ["--rounds=6"]),
    "fedacnnl-mlp": ("fedacnnl", "mlp", []),
    "pfedacnnl-mlp": ("pfedacnnl", "mlp", []),
}

flags.DEFINE_string("data_dir", None, "Folder with mnist/ (or AFL_DATA_DIR).")
flags.DEFINE_string("output_dir", None, "Where threading.json goes.")
flags.DEFINE_list("cases", list(CASES), "Algorithm-model cases to time.")
flags.DEFINE_list("options", list(OPTIONS), "Threading options to time.")
flags.DEFINE_string("reference", "one_core", "The option ratios are to.")
flags.DEFINE_integer("repeats", 3, "Timed runs of each case and option.")
FLAGS = flags.FLAGS


def _environment(option: str) -> dict:
  """The process environment of `option`: its XLA_FLAGS in place of any
  device-count or threading flag the caller's had."""
  xla_flags, _ = OPTIONS[option]
  env = dict(os.environ)
  kept = re.sub(
      r"--xla_(force_host_platform_device_count|cpu_multi_thread_eigen)=\S+",
      "",
      env.get("XLA_FLAGS", ""),
  )
  env["XLA_FLAGS"] = f"{kept} {xla_flags}".strip()
  env["AFL_CPU_DEFAULTS"] = "off"  # the option alone decides
  return env


def _time_run(case: str, option: str, folder: pathlib.Path) -> float:
  """Seconds of one run of `case` under `option` (module docstring)."""
  algorithm, model, extra = CASES[case]
  command = [
      sys.executable,
      "-m",
      "experiments.run",
      f"--algorithm={algorithm}",
      "--dataset=mnist",
      f"--model={model}",
      f"--output_dir={folder}",
      "--overwrite",
      "--eval_every=1000",
      *extra,
  ]
  if FLAGS.data_dir:
    command.append(f"--data_dir={FLAGS.data_dir}")
  if OPTIONS[option][1]:
    command = ["taskset", "-c", str(min(os.sched_getaffinity(0)))] + command
  subprocess.run(
      command,
      env=_environment(option),
      check=True,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
  )
  results = json.loads((folder / "results.json").read_text())
  if results["algorithm"] in ("fedacnnl", "pfedacnnl"):
    return results["wall_time_s"] + results.get("grouping_time_s", 0.0)
  return float(np.median([r["seconds"] for r in results["rounds"]]))


def main(argv):
  del argv
  common.check_names("cases", FLAGS.cases, list(CASES))
  common.check_names("options", FLAGS.options, list(OPTIONS))
  if FLAGS.reference not in FLAGS.options:
    raise ValueError(f"--reference={FLAGS.reference} is not in --options")
  if not FLAGS.output_dir:
    raise ValueError("--output_dir is required")
  output = pathlib.Path(FLAGS.output_dir)
  output.mkdir(parents=True, exist_ok=True)
  times = {case: {o: [] for o in FLAGS.options} for case in FLAGS.cases}
  with tempfile.TemporaryDirectory() as scratch:
    folder = pathlib.Path(scratch) / "run"
    for case in FLAGS.cases:
      for option in FLAGS.options:  # compile into the cache, not counted
        _time_run(case, option, folder)
      for repeat in range(FLAGS.repeats):
        order = FLAGS.options[repeat % len(FLAGS.options) :]
        order += FLAGS.options[: repeat % len(FLAGS.options)]
        for option in order:
          times[case][option].append(_time_run(case, option, folder))
      medians = {o: float(np.median(t)) for o, t in times[case].items()}
      reference = medians[FLAGS.reference]
      print(
          f"{case}: "
          + ", ".join(
              f"{o} {m:.3f}s ({m / reference:.2f}x)" for o, m in medians.items()
          ),
          flush=True,
      )
  (output / "threading.json").write_text(
      json.dumps(
          dict(
              cores=_CORES,
              load_average=os.getloadavg(),
              reference=FLAGS.reference,
              times_s=times,
          ),
          indent=2,
      )
  )


if __name__ == "__main__":
  common.run(main)
