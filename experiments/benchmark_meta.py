r"""Wall time of a meta_fedavg round against a FedAvg round, side by side.

  python -m experiments.benchmark_meta --data_dir=../shared/data

MNIST-MLP, 100 clients, Dirichlet 0.1, batch b = 20, R = --local_steps local
steps per client (the same for every method; cycling through a client's
samples). A FedAvg step is one gradient on b rows; a meta_fedavg step
(`baselines.meta_fl`) takes nu inner gradients and the outer gradient on
(nu + 1) b rows, exact (through the inner steps: Hessian-vector products)
or first order. All rounds run on the same lane driver
(`afl.lanes.round_fn`), are compiled once, then timed `--repeats`
times interleaved (the same machine load) on one round key; prints each
median, its ratio to FedAvg's, the target (nu + 2) x, the ratio of the
steps' FLOPs (XLA cost analysis), which does not depend on the machine, and
the time ratio per training sample processed (a meta step reads nu + 1
batches, FedAvg's one).

What is compared: a round is every client's R local steps from the server
model (the same R, b, lanes and driver for both; DESIGN.md section 4: "a
FedAvg variant: clients take local steps on this meta-objective"); a local
step is one update of the client's model: FedAvg's one gradient on b rows,
meta_fedavg's nu inner gradients on b rows each and one outer gradient.

Why exact differentiation cannot meet (nu + 2) x for nu >= 2 (FLOPs; the
CPU runs are compute-bound, time tracks FLOPs): the meta-gradient
prod_t (I - alpha H(phi^t)) grad f(phi^nu) needs nu + 1 gradients (the nu
inner steps and the outer one, each as costly as FedAvg's step) and nu
Hessian-vector products. For the [128, 64] MLP the first layer holds 92% of
the weights, and a product H v must form its tangent X_t v_W1 (forward) and
X_t^T d(dY_1) (backward): two [b, 784] x [784, 128] products, 8.0 MFLOP at
b = 20, 0.86 of FedAvg's whole step (9.33 MFLOP; one gradient 9.11). So a
step costs at least (nu + 1) 0.977 + 0.86 nu FedAvg steps: 2.81 / 4.65 /
10.2 x for nu = 1 / 2 / 5, above nu + 2 for nu >= 2 whatever the
formulation. JAX's reverse-over-reverse through the `lax.scan`
(`baselines.meta_fl`) costs 3.13 / 5.25 / 11.63 x, 11-14% above that floor;
an explicit backward recursion v <- v - alpha H(phi^t) v with stored
linearizations (`jax.linearize`, forward-over-reverse) has the same FLOPs
(within 1%) and no lower time; recomputing the forward (jvp of
grad at stored phi^t, or `jax.checkpoint` per inner step) adds a gradient per
step and was 1.4-2x slower (README "Meta-FL and PersA-FL").
"""

import json

from absl import flags
import numpy as np

import afl
import baselines
from experiments import common

flags.DEFINE_string("data_dir", None, "Folder with mnist/ (or AFL_DATA_DIR).")
flags.DEFINE_integer("num_clients", 100, "Clients.")
flags.DEFINE_integer("local_steps", 20, "Local steps R per client.")
flags.DEFINE_list("nus", ["1", "2", "5"], "Fine-tuning steps nu to time.")
flags.DEFINE_integer("repeats", 5, "Timed repetitions (medians reported).")
flags.DEFINE_integer(
    "num_lanes", 0, "Lanes; 0: as the baselines' runs size them."
)
flags.DEFINE_string("output", None, "Optional JSON file for the numbers.")
FLAGS = flags.FLAGS


def variant_config(**settings):
  """A variant's configuration: MNIST-MLP, --local_steps, its `settings`."""
  return afl.get_config(
      dataset="mnist",
      model="mlp",
      num_clients=FLAGS.num_clients,
      data_dir=FLAGS.data_dir,
      local_steps=FLAGS.local_steps,
      **settings,
  )


def main(argv):
  del argv
  # Here, not at the top: --help and a bad flag answer before JAX loads.
  import jax  # pylint: disable=g-import-not-at-top

  iterative = baselines.iterative

  variants = {"fedavg": dict(algorithm="fedavg")}
  for nu in map(int, FLAGS.nus):
    for meta_grad in ("exact", "first_order"):
      variants[f"nu={nu} {meta_grad}"] = dict(
          algorithm="meta_fedavg", nu=nu, meta_grad=meta_grad
      )
  try:
    configs = {name: variant_config(**s) for name, s in variants.items()}
  except ValueError as error:
    common.fail(error)
  federation = afl.runtime.federation(configs["fedavg"])
  model, mesh, split = federation.model, federation.mesh, federation.split
  data = afl.lanes.client_data(federation.inputs, split.y, split.train_indices)
  sizes = np.asarray(data.size)
  params = federation.replicated(
      afl.models.init_params(model, jax.random.key(0), federation.input_shape)
  )
  rounds, targets, flops, rows = {}, {}, {}, {}
  key = jax.random.key(1)
  for name, config in configs.items():
    hparams = config[config.algorithm]
    baseline = iterative.make_baseline(config.algorithm, hparams, model.apply)
    local = baseline.local
    schedule = afl.lanes.make_schedule(
        sizes,
        iterative.step_rows(config.algorithm, hparams),
        FLAGS.local_steps,
        num_shards=mesh.size,
        num_lanes=FLAGS.num_lanes
        or afl.lanes.default_num_lanes(
            afl.memory.tree_bytes(local.init(params, None)),
            FLAGS.num_clients,
            mesh.size,
        ),
    )
    rows[name] = schedule.batch_size
    flops[name] = (
        jax.jit(local.step)
        .lower(
            local.init(params, None),
            jax.ShapeDtypeStruct(
                (rows[name],) + federation.input_shape, np.float32
            ),
            jax.ShapeDtypeStruct((rows[name],), np.int32),
            jax.ShapeDtypeStruct((rows[name],), np.bool_),
            key,
        )
        .cost_analysis()["flops"]
    )
    rounds[name] = afl.lanes.round_fn(local, schedule, sizes, mesh)
    targets[name] = hparams.nu + 2 if config.algorithm != "fedavg" else 1
  medians, times, warmup = afl.timing.interleaved_medians(
      {
          name: lambda fn=fn: fn(params, data, key).upload
          for name, fn in rounds.items()
      },
      FLAGS.repeats,
  )
  ratios = {name: m / medians["fedavg"] for name, m in medians.items()}
  flop_ratios = {name: f / flops["fedavg"] for name, f in flops.items()}
  per_sample = {
      name: ratios[name] * rows["fedavg"] / rows[name] for name in ratios
  }
  print(
      f"MNIST-MLP, {FLAGS.num_clients} clients, {FLAGS.local_steps} local "
      f"steps of batch 20 per client, {mesh.size} device(s), median of "
      f"{FLAGS.repeats} (warm-up and compile {warmup:.1f}s):"
  )
  for name, median in medians.items():
    verdict = "ok" if ratios[name] <= targets[name] else "OVER"
    print(
        f"  {name:20s} {median:8.4f} s   {ratios[name]:5.2f} x FedAvg"
        f"   (target <= {targets[name]} x: {verdict}); FLOPs per step "
        f"{flop_ratios[name]:5.2f} x; time per sample "
        f"{per_sample[name]:5.2f} x"
    )
  if FLAGS.output:
    with open(FLAGS.output, "w") as f:
      json.dump(
          dict(
              medians_s=medians,
              times_s=times,
              ratios=ratios,
              flop_ratios=flop_ratios,
              per_sample_ratios=per_sample,
              targets=targets,
              local_steps=FLAGS.local_steps,
              devices=mesh.size,
          ),
          f,
          indent=2,
      )


if __name__ == "__main__":
  common.run(main)
