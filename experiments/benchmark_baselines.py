r"""One baseline round in lanes against a sequential loop over the clients.

  python -m experiments.benchmark_baselines --data_dir=../shared/data
  python -m experiments.benchmark_baselines --algorithm=pfedme \
      --data_dir=../shared/data

MNIST-MLP, 100 clients, Dirichlet 0.1, batch 20, the algorithm's paper
settings (`afl.get_config`, `baselines.iterative`). FedAvg: one local epoch
over each client's data; pFedMe: K = 5 inner steps, R = 20 local steps per
client; both in packed lanes (`afl.lanes.make_schedule`). The loop is
`afl.lanes.loop_round`: the same jitted client step called once per local
step, client after client, as most simulators run clients, on one device
(the lanes shard over all of them, `afl.host`). Each is compiled
once, then all are timed `--repeats` times interleaved (so they see the same
machine load) on the same round key; prints the medians and the loop's
median over each (targets: FedAvg >= 2x, pFedMe >= 4x). `--lanes=2,8,100`
times several lane counts side by side. `--output` also writes the numbers
as JSON.
"""

import json

from absl import flags
import numpy as np

import afl
import baselines
from afl import catalog
from afl import data as data_lib
from baselines import catalog as baselines_catalog
from experiments import common

flags.DEFINE_string("data_dir", None, "Folder with mnist/ (or AFL_DATA_DIR).")
flags.DEFINE_enum(
    "algorithm", "fedavg", list(baselines_catalog.PAPER_DEFAULTS), "Algorithm."
)
flags.DEFINE_enum("dataset", "mnist", data_lib.DATASETS, "Dataset.")
flags.DEFINE_enum("model", "mlp", catalog.MODELS, "Model.")
flags.DEFINE_integer("num_clients", 100, "Clients.")
flags.DEFINE_integer("repeats", 5, "Timed repetitions (medians reported).")
flags.DEFINE_list(
    "lanes", ["0"], "Lane counts to time side by side; 0: the default."
)
flags.DEFINE_string("output", None, "Optional JSON file for the numbers.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  # Here, not at the top: --help and a bad flag answer before JAX loads.
  import jax  # pylint: disable=g-import-not-at-top

  iterative = baselines.iterative

  try:
    config = afl.get_config(
        algorithm=FLAGS.algorithm,
        dataset=FLAGS.dataset,
        model=FLAGS.model,
        num_clients=FLAGS.num_clients,
        data_dir=FLAGS.data_dir,
    )
  except ValueError as error:
    common.fail(error)
  hparams = config[config.algorithm]
  federation = afl.runtime.federation(config)
  model, mesh = federation.model, federation.mesh
  split = federation.split
  data = afl.lanes.client_data(federation.inputs, split.y, split.train_indices)
  sizes = np.asarray(data.size)
  baseline = iterative.make_baseline(config.algorithm, hparams, model.apply)
  params = federation.replicated(
      afl.models.init_params(model, jax.random.key(0), federation.input_shape)
  )
  default = afl.lanes.default_num_lanes(
      afl.lanes.step_bytes(
          baseline.local,
          params,
          federation.input_shape,
          iterative.step_rows(config.algorithm, hparams),
      ),
      len(sizes),
      mesh.size,
  )
  schedules = {
      int(count): afl.lanes.make_schedule(
          sizes,
          hparams.batch_size,
          hparams.local_steps,
          hparams.local_epochs,
          num_shards=mesh.size,
          num_lanes=int(count) or default,
      )
      for count in FLAGS.lanes
  }
  rounds = {
      f"{s.num_lanes} lanes x {s.length}": afl.lanes.round_fn(
          baseline.local, s, sizes, mesh
      )
      for s in schedules.values()
  }
  schedule = next(iter(schedules.values()))
  rounds["loop"] = afl.lanes.loop_round(baseline.local, schedule, sizes)
  # The loop runs on the data's one device (the lanes shard over them all).
  on_one = jax.device_put(params, data.x.sharding)
  key = jax.random.key(1)
  medians, times, warmup = afl.timing.interleaved_medians(
      {
          name: lambda fn=fn, p=on_one if name == "loop" else params: fn(
              p, data, key
          ).upload
          for name, fn in rounds.items()
      },
      FLAGS.repeats,
  )
  speedups = {name: medians["loop"] / m for name, m in medians.items()}
  steps = int(schedule.steps.sum())
  print(
      f"{config.algorithm} {config.dataset}-{config.model}, "
      f"{config.num_clients} clients (sizes {sizes.min()}..{sizes.max()}), "
      f"{steps} client steps of batch {hparams.batch_size}, {mesh.size} "
      f"device(s), median of {FLAGS.repeats} (warm-up and compile "
      f"{warmup:.1f}s):"
  )
  for name, median in medians.items():
    print(f"  {name:24s} {median:8.4f} s   speed-up {speedups[name]:5.2f} x")
  if FLAGS.output:
    with open(FLAGS.output, "w") as f:
      json.dump(
          dict(
              algorithm=config.algorithm,
              medians_s=medians,
              times_s=times,
              speedups=speedups,
              client_steps=steps,
              devices=mesh.size,
          ),
          f,
          indent=2,
      )


if __name__ == "__main__":
  common.run(main)
