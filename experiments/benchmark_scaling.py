r"""How FedACnnL's time scales with the number of clients and of devices.

  python -m experiments.benchmark_scaling --data_dir=../shared/data

Trains FedACnnL on MNIST-MLP over the same 70,000 samples split among
10, 100, 1,000 and 10,000 clients (`--client_counts`; iid by default, since
a Dirichlet split cannot give 10,000 clients 10 samples each), on one CPU
device, and with `--device_clients` clients on 1, 2, 4 and 8 CPU devices
(`--device_counts`). The client counts are timed in one process, their
repetitions interleaved so that all see the same machine load; each device
count needs its own process (the CPU device count must be set in XLA_FLAGS
before JAX is imported); each client count's peak resident memory is
measured in a process of its own. A cell is the federation and the built
algorithm (`afl.runtime.federation`, `afl.runtime.build`), then `--repeats`
timed trainings (`afl.runtime.run_rounds`, without a clock or tests; the
rounds' wall time plus the grouping stage's,
`experiments.common.training_seconds`) after one compiling run; the tables
show their median, its ratio to the reference cell (`--reference_clients`
on 1 device; 1 device for the device sweep), the compile time, the number
of client blocks, the peak memory and the memory model's expectation
(`afl/memory.py`). Timings on a shared machine are noisy: compare ratios
from one invocation. `--output` writes all numbers as JSON.

Memory (FedACnnL, `afl/memory.py`): the client blocks, ceil(N / B) + C
rounded up, of B x 784 float32 each, plus per device (2 + 3) float64 d x d
sums of the widest layer (785 x 785): the statistics take the same few tens
of MB whatever C; 10,000 clients cost more only through their blocks'
padding (B = 8 for about 5 samples per client).
"""

import json
import os
import re
import subprocess
import sys
import time

from absl import flags
from absl import logging
import numpy as np

import afl
from experiments import common

flags.DEFINE_string("data_dir", None, "Folder with mnist/ (or AFL_DATA_DIR).")
flags.DEFINE_list(
    "client_counts", ["10", "100", "1000", "10000"], "Client counts C."
)
flags.DEFINE_list("device_counts", ["1", "2", "4", "8"], "CPU device counts.")
flags.DEFINE_integer(
    "device_clients", 100, "Clients of the device-count sweep."
)
flags.DEFINE_integer(
    "reference_clients",
    100,
    "Clients of the reference cell (one of --client_counts).",
)
flags.DEFINE_enum(
    "partition", "iid", ["iid", "dirichlet", "power_law"], "Client split."
)
flags.DEFINE_integer(
    "min_client_size", 1, "Least samples per client (dirichlet, power_law)."
)
flags.DEFINE_integer("repeats", 3, "Timed trainings per cell (median).")
flags.DEFINE_string("output", None, "Optional JSON file for the numbers.")
# Internal: the parent runs cells in child processes with these.
flags.DEFINE_list("cell_clients", [], "Run these client counts here.")
FLAGS = flags.FLAGS


def run_cells(client_counts: list[int]) -> list[dict]:
  """Cells in this process: setup and one compiling run each, then
  `--repeats` rounds of timed trainings, interleaved across the cells so
  that all see the same machine load."""
  cells = {}
  for num_clients in client_counts:
    settings = dict(
        dataset="mnist",
        model="mlp",
        num_clients=num_clients,
        partition=FLAGS.partition,
        data_dir=FLAGS.data_dir,
    )
    if FLAGS.partition != "iid":  # the iid split has no least size
      settings["min_client_size"] = FLAGS.min_client_size
    config = afl.get_config(**settings)
    start = time.perf_counter()
    federation = afl.runtime.federation(
        config, afl.runtime.prepare_split(config)
    )
    algorithm = afl.runtime.build(config, federation)
    setup_s = time.perf_counter() - start
    first = afl.runtime.run_rounds(algorithm, federation.key)
    cells[num_clients] = (federation, algorithm, setup_s, first, [])

  def train_s(algorithm, run) -> float:
    return common.training_seconds(dict(run, **algorithm.summary(run["state"])))

  for _ in range(FLAGS.repeats):
    for federation, algorithm, _, _, times in cells.values():
      times.append(
          train_s(algorithm, afl.runtime.run_rounds(algorithm, federation.key))
      )
  rows = []
  for num_clients, cell in cells.items():
    federation, algorithm, setup_s, first, times = cell
    summary = algorithm.summary(first["state"])
    data = federation.blocks("train", algorithm.layout)
    rows.append(
        {
            "clients": num_clients,
            "devices": federation.mesh.size,
            "blocks": data.num_blocks,
            "block_size": data.block_size,
            "train_median_s": float(
                np.median(times or [train_s(algorithm, first)])
            ),
            "train_s": times,
            "compile_s": first["compile_time_s"],
            "setup_s": setup_s,
            "peak_memory_gb": afl.results.peak_memory_gb(),
            "expected_peak_memory_gb": summary["expected_peak_memory_gb"],
        }
    )
  return rows


def spawn(client_counts: list[int], num_devices: int, repeats: int) -> list:
  """`run_cells` in a child process with `num_devices` CPU devices."""
  flags_env = re.sub(
      r"--xla_force_host_platform_device_count=\S+",
      "",
      os.environ.get("XLA_FLAGS", ""),
  )
  env = {
      **os.environ,
      "XLA_FLAGS": (
          f"{flags_env} --xla_force_host_platform_device_count={num_devices}"
      ).strip(),
  }
  command = [
      sys.executable,
      "-m",
      "experiments.benchmark_scaling",
      f"--cell_clients={','.join(map(str, client_counts))}",
      f"--partition={FLAGS.partition}",
      f"--min_client_size={FLAGS.min_client_size}",
      f"--repeats={repeats}",
  ]
  if FLAGS.data_dir:
    command.append(f"--data_dir={FLAGS.data_dir}")
  logging.info("cells: %s clients on %d device(s)", client_counts, num_devices)
  done = subprocess.run(
      command, env=env, capture_output=True, text=True, check=False
  )
  if done.returncode:
    raise RuntimeError(
        f"cells {client_counts} on {num_devices} devices failed:\n"
        f"{done.stderr[-3000:]}"
    )
  return json.loads(done.stdout.strip().splitlines()[-1])


def table(cells: list[dict], reference: dict) -> str:
  lines = [
      f"{'clients':>8} {'devices':>7} {'blocks':>7} {'B':>4} "
      f"{'train s':>8} {'ratio':>6} {'compile s':>9} {'peak GB':>7} "
      f"{'model GB':>8}"
  ]
  for cell in cells:
    lines.append(
        f"{cell['clients']:8d} {cell['devices']:7d} {cell['blocks']:7d} "
        f"{cell['block_size']:4d} {cell['train_median_s']:8.3f} "
        f"{cell['train_median_s'] / reference['train_median_s']:6.2f} "
        f"{cell['compile_s']:9.2f} {cell['peak_memory_gb']:7.2f} "
        f"{cell['expected_peak_memory_gb']:8.2f}"
    )
  return "\n".join(lines)


def main(argv):
  del argv
  if FLAGS.cell_clients:
    print(json.dumps(run_cells([int(c) for c in FLAGS.cell_clients])))
    return
  logging.set_verbosity(logging.INFO)
  client_counts = [int(c) for c in FLAGS.client_counts]
  device_counts = [int(d) for d in FLAGS.device_counts]
  # Times: all client counts in one process, interleaved.
  by_clients = spawn(client_counts, 1, FLAGS.repeats)
  # Peak memory: each client count alone in its own process.
  for cell in by_clients:
    alone = spawn([cell["clients"]], 1, 0)[0]
    cell["peak_memory_gb"] = alone["peak_memory_gb"]
  by_devices = [
      spawn([FLAGS.device_clients], devices, FLAGS.repeats)[0]
      for devices in device_counts
  ]
  reference = next(
      c for c in by_clients if c["clients"] == FLAGS.reference_clients
  )
  print(
      f"FedACnnL MNIST-MLP ({FLAGS.partition} split), median of "
      f"{FLAGS.repeats}; ratio = time / time of {FLAGS.reference_clients} "
      "clients on 1 device (client counts timed interleaved in one process;"
      " peak memory of each alone)"
  )
  print("clients, 1 device:")
  print(table(by_clients, reference))
  print(f"devices, {FLAGS.device_clients} clients (ratio to 1 device):")
  print(table(by_devices, by_devices[0]))
  if FLAGS.output:
    with open(FLAGS.output, "w", encoding="utf-8") as f:
      json.dump(
          {"by_clients": by_clients, "by_devices": by_devices}, f, indent=2
      )


if __name__ == "__main__":
  common.run(main)
