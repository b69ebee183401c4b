r"""One baseline round in lanes against a sequential loop over the clients.

  python -m experiments.benchmark_baselines --data_dir=../shared/data
  python -m experiments.benchmark_baselines --algorithm=pfedme \
      --data_dir=../shared/data

MNIST-MLP, 100 clients, Dirichlet 0.1, batch 20. FedAvg: one local epoch
over each client's data; pFedMe: K = 5 inner steps, R = 20 local steps
per client; both in packed lanes (`afl.lanes.make_schedule`). The loop
is `afl.lanes.loop_round`: the same jitted client step called once per
local step, client after client, as most simulators run clients. Each is compiled once, then all are timed `--repeats` times
interleaved (so they see the same machine load) on the same round key;
prints the medians and the loop's median over each (targets: FedAvg >= 2x,
pFedMe >= 4x). `--lanes=2,8,100` times several lane counts side by side. `--output`
also writes the numbers as JSON.
"""

import json

from absl import app
from absl import flags
import jax
import numpy as np

from afl import data as data_lib
from afl import experiment
from afl import timing
from afl import federated
from afl import models
from baselines import experiment as baselines_experiment
from afl import lanes

flags.DEFINE_string("data_dir", None, "Folder with mnist/ (or AFL_DATA_DIR).")
flags.DEFINE_enum(
    "algorithm", "fedavg", baselines_experiment.ALGORITHMS, "Algorithm."
)
flags.DEFINE_enum("dataset", "mnist", data_lib.DATASETS, "Dataset.")
flags.DEFINE_enum("model", "mlp", models.MODELS, "Model.")
flags.DEFINE_integer("num_clients", 100, "Clients.")
flags.DEFINE_integer("repeats", 5, "Timed repetitions (medians reported).")
flags.DEFINE_list(
    "lanes", ["0"], "Lane counts to time side by side; 0: the default."
)
flags.DEFINE_string("output", None, "Optional JSON file for the numbers.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  config = baselines_experiment.default_config()
  config.update(
      algorithm=FLAGS.algorithm,
      dataset=FLAGS.dataset,
      model=FLAGS.model,
      num_clients=FLAGS.num_clients,
      data_dir=FLAGS.data_dir,
  )
  config = baselines_experiment.resolve(config)
  split = experiment.prepare_split(config)
  model = models.get_model(config.model, split.num_classes)
  x = experiment.model_inputs(model, split.x)
  mesh = federated.client_mesh()
  data = lanes.client_data(x, split.y, split.train_indices)
  sizes = np.asarray(data.size)
  baseline = baselines_experiment.build(config, model.apply)
  params = jax.device_put(
      models.init_params(model, jax.random.key(0), x.shape[1:]),
      jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
  )
  default = lanes.default_num_lanes(
      lanes.step_bytes(
          baseline.local,
          params,
          x.shape[1:],
          baselines_experiment.step_rows(config),
      ),
      len(sizes),
      mesh.size,
  )
  schedules = {
      int(count): lanes.make_schedule(
          sizes,
          config.batch_size,
          config.local_steps,
          config.local_epochs,
          num_shards=mesh.size,
          num_lanes=int(count) or default,
      )
      for count in FLAGS.lanes
  }
  rounds = {
      f"{s.num_lanes} lanes x {s.length}": lanes.round_fn(
          baseline.local, s, sizes, mesh
      )
      for s in schedules.values()
  }
  schedule = next(iter(schedules.values()))
  rounds["loop"] = lanes.loop_round(baseline.local, schedule, sizes)
  key = jax.random.key(1)
  medians, times, warmup = timing.interleaved_medians(
      {
          name: lambda fn=fn: fn(params, data, key).upload
          for name, fn in rounds.items()
      },
      FLAGS.repeats,
  )
  speedups = {name: medians["loop"] / m for name, m in medians.items()}
  steps = int(schedule.steps.sum())
  print(
      f"{config.algorithm} {config.dataset}-{config.model}, "
      f"{config.num_clients} clients (sizes {sizes.min()}..{sizes.max()}), "
      f"{steps} client steps of batch {config.batch_size}, {mesh.size} "
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
  app.run(main)
