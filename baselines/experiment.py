"""One baseline run end to end: the same data, models, evaluation and results
file as the analytic algorithms (afl.experiment), with rounds of local
training instead of layer solves.

`run_experiment(config, output_dir, split)` is what afl.experiment dispatches
to for `--algorithm` in `ALGORITHMS`. Every `eval_every` rounds it tests the
server model (FedAvg, FedZO, BAFFLE) or each client's personalized model
(pFedMe, pFedZO) on the clients' test splits and measures the same models'
training loss; results.json holds them per round, with the best and the last
accuracy (`accuracy` is the best, the paper's protocol for the iterative
methods: "the best test accuracy within 1,000 training rounds").

Every round is also timed on the shared simulated clock (afl.clock, issue
4): what each client did (`client_work`: its samples and batch size, the
FLOPs of the jitted local step from XLA's cost analysis, a whole model down
and up) goes to `Clock.round`, whose per-client computation / communication / idle times
are in each round's record and, summed, in results.json's `timing`. All
clients take part in every round with fixed batches (no eq. 7), so the
work is the same every round.
"""

import json
import math
import time
from typing import Any, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from afl import clock as clock_lib
from afl import data as data_lib
from afl import evaluation
from afl import experiment as afl_experiment
from afl import federated
from afl import memory
from afl import models
from afl import timing
from baselines import algorithms
from baselines import local as local_lib
from baselines import meta_fl

ALGORITHMS = afl_experiment.BASELINES
PERSONALIZED = ("pfedme", "pfedzo")
# Tested after fine-tuning the server model (baselines.meta_fl).
FINE_TUNED = ("meta_fedavg",)

# Defaults from the papers (DESIGN.md section 4), by algorithm, then by
# dataset where they differ. None in `default_config` means "from here".
PAPER_DEFAULTS = {
    "fedavg": dict(lr=0.05, local_steps=0),
    "fedzo": dict(lr=0.01, local_steps=0),
    # BAFFLE: Adam's lr 0.01 as the authors' MNIST runs (FengHZ/BAFFLE).
    # Their batch is 32; 200 here because a step's cost is drawing its K x d
    # normals (MNIST-MLP: 0.2 s a step on a CPU core at either batch), so an
    # epoch at batch 32 costs 5x more (README, "Baselines").
    "baffle": dict(lr=0.01, local_steps=0, batch_size=200),
    "pfedme": dict(lr=0.005, local_steps=20, personal_lr=0.09, lam=15.0),
    "pfedzo": dict(lr=0.005, local_steps=20, personal_lr=0.09, lam=15.0),
    # personal_lr: the inner (fine-tuning) step size alpha.
    "meta_fedavg": dict(lr=0.05, local_steps=20, personal_lr=0.05),
}
SYNTHETIC_DEFAULTS = {
    "pfedme": dict(personal_lr=0.01, lam=20.0),
    "pfedzo": dict(personal_lr=0.01, lam=20.0),
}
# The paper's training-time study: 20 rounds on MNIST (after BAFFLE), 600 on
# the synthetic data (after pFedMe).
DEFAULT_ROUNDS = {"mnist": 20, "cifar10": 20, "synthetic": 600}


def default_config() -> ml_collections.ConfigDict:
  """afl.experiment's settings plus the baselines' (None: PAPER_DEFAULTS)."""
  config = afl_experiment.default_config()
  config.update(
      dict(
          rounds=0,  # 0: DEFAULT_ROUNDS[dataset]
          batch_size=ml_collections.config_dict.placeholder(int),
          local_steps=ml_collections.config_dict.placeholder(int),
          local_epochs=1,
          lr=ml_collections.config_dict.placeholder(float),
          personal_lr=ml_collections.config_dict.placeholder(float),
          lam=ml_collections.config_dict.placeholder(float),
          inner_steps=5,  # pFedMe's K
          pfedme_beta=1.0,  # pFedMe's server mixing beta
          # pFedMe / pFedZO: test each client's theta (the paper) or its
          # local model w_i (what the authors' code tests; algorithms.moreau)
          pfedme_tested="theta",
          mu=1e-3,  # FedZO / pFedZO smoothing
          directions=20,  # FedZO / pFedZO b2
          sigma=1e-4,  # BAFFLE perturbation scale
          perturbations=100,  # BAFFLE K
          central=False,  # BAFFLE: central instead of forward differences
          eval_every=1,
          num_lanes=0,  # packed lanes for epoch schedules; 0: automatic
          # Generalized meta-FL (baselines.meta_fl) and PersA-FL
          # (baselines.persafl).
          nu=1,  # fine-tuning steps of the meta-objective
          meta_grad="exact",  # or "first_order"
          personalization="maml",  # PersA-FL: "maml" or "me"
          max_staleness=2,  # PersA-FL: server versions (rounds), see persafl
          delay_spread=0.5,  # PersA-FL: sigma of the log-normal delay noise
      )
  )
  return config


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` (missing baseline fields from `default_config`) with
  every None setting filled from the papers' defaults."""
  full = default_config()
  full.update(config.to_dict())
  defaults = dict(PAPER_DEFAULTS[full.algorithm])
  if full.dataset == "synthetic":
    defaults.update(SYNTHETIC_DEFAULTS.get(full.algorithm, {}))
  for name, value in defaults.items():
    if full[name] is None:
      full[name] = value
  for name in ("personal_lr", "lam"):
    if full[name] is None:
      full[name] = PAPER_DEFAULTS["pfedme"][name]
  if full.batch_size is None:
    full.batch_size = 20
  if not full.rounds:
    full.rounds = DEFAULT_ROUNDS[full.dataset]
  return full


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the setting for anything out of range."""
  afl_experiment.validate(config)
  afl_experiment.check_settings(
      config,
      choices={
          "algorithm": ALGORITHMS,
          "meta_grad": meta_fl.META_GRADIENTS,
          "personalization": ("maml", "me"),
          "pfedme_tested": algorithms.MOREAU_TESTED,
      },
      positive=(
          "rounds",
          "batch_size",
          "local_epochs",
          "lr",
          "inner_steps",
          "mu",
          "directions",
          "sigma",
          "perturbations",
          "eval_every",
      ),
      non_negative=(
          "local_steps",
          "num_lanes",
          "personal_lr",
          "lam",
          "nu",
          "max_staleness",
          "delay_spread",
      ),
  )
  if not 0 < config.pfedme_beta <= 1:
    raise ValueError(
        f"--pfedme_beta must be in (0, 1], got {config.pfedme_beta}"
    )


def build(config: ml_collections.ConfigDict, apply_fn) -> algorithms.Baseline:
  """The algorithm of `config` (resolved) on the model's apply function."""
  moreau = (
      config.lr,
      config.personal_lr,
      config.lam,
      config.inner_steps,
      config.pfedme_beta,
  )
  if config.algorithm == "fedavg":
    return algorithms.fedavg(apply_fn, config.lr)
  if config.algorithm == "fedzo":
    return algorithms.fedzo(apply_fn, config.lr, config.mu, config.directions)
  if config.algorithm == "baffle":
    return algorithms.baffle(
        apply_fn, config.lr, config.sigma, config.perturbations, config.central
    )
  if config.algorithm == "pfedme":
    return algorithms.pfedme(apply_fn, *moreau, tested=config.pfedme_tested)
  if config.algorithm == "meta_fedavg":
    return meta_fl.meta_fedavg(
        apply_fn, config.lr, config.personal_lr, config.nu, config.meta_grad
    )
  return algorithms.pfedzo(
      apply_fn,
      *moreau,
      config.mu,
      config.directions,
      tested=config.pfedme_tested,
  )


def step_rows(config: ml_collections.ConfigDict) -> int:
  """Rows of a local step's batch: meta_fedavg's step takes nu + 1 batches
  of b (`baselines.meta_fl`), the others one."""
  if config.algorithm in FINE_TUNED:
    return config.batch_size * (config.nu + 1)
  return config.batch_size


def client_work(
    local: local_lib.LocalTraining,
    params,
    feature_shape: tuple[int, ...],
    schedule: local_lib.Schedule,
    sizes: np.ndarray,
    epochs: int,
) -> clock_lib.ClientWork:
  """What every client does in a round, for the shared clock: its samples
  (E |D_i| for epochs, R b for fixed steps), batch, the jitted step's FLOPs
  (XLA cost analysis) and a whole model up and down."""
  key = jax.random.key(0)
  carry = local.init(params, key)

  def example(batch):
    return (
        carry,
        jax.ShapeDtypeStruct((batch,) + feature_shape, jnp.float32),
        jax.ShapeDtypeStruct((batch,), jnp.int32),
        jax.ShapeDtypeStruct((batch,), jnp.bool_),
        key,
    )

  flops = clock_lib.step_flops(local.step, example)
  steps = np.asarray(schedule.steps, np.int64)
  if schedule.cycle:
    samples = steps * schedule.batch_size
  else:
    samples = np.asarray(sizes, np.int64) * epochs
  model_bytes = np.full(len(steps), memory.tree_bytes(params), np.int64)
  return clock_lib.ClientWork(
      samples,
      np.full(len(steps), schedule.batch_size, np.int64),
      flops.fixed,
      flops.per_sample,
      model_bytes,
      model_bytes,
  )


def _loss_counter(apply_fn, mesh):
  """(params, data, param_index) -> per-client (loss sum, count), jitted."""

  def block_fn(params, x, y, mask):
    loss = algorithms.mean_cross_entropy(apply_fn, params, x, y, mask)
    return loss * mask.sum(), mask.sum()

  @jax.jit
  def count(params, data, param_index):
    return federated.segment_sum(
        block_fn, params, data, param_index, data.client, data.num_clients, mesh
    )

  return count


class Prepared(NamedTuple):
  """A gradient run's data, model and mesh (see `prepare`)."""

  split: data_lib.ClientSplit
  model: models.LayerwiseNet
  x: np.ndarray  # [N, ...] the model's inputs
  mesh: jax.sharding.Mesh
  train_blocks: federated.FederatedData  # for the training loss
  test_blocks: federated.FederatedData
  data: local_lib.ClientData  # the clients' samples for local training


def prepare(
    config: ml_collections.ConfigDict,
    split: data_lib.ClientSplit | None = None,
) -> Prepared:
  """The data of `config` (or `split`) as test and train blocks over the
  mesh and as contiguous client samples, and the model."""
  split = split or afl_experiment.prepare_split(config)
  model = models.get_model(config.model, split.num_classes, config.width)
  x = afl_experiment.model_inputs(model, split.x)
  mesh = federated.client_mesh(
      jax.local_devices()[: config.num_devices or None]
  )
  train_blocks, test_blocks = (
      federated.shard(
          federated.federate(
              x, split.y, indices, config.block_size or None, mesh.size
          ),
          mesh,
      )
      for indices in (split.train_indices, split.test_indices)
  )
  data = local_lib.client_data(x, split.y, split.train_indices)
  return Prepared(split, model, x, mesh, train_blocks, test_blocks, data)


def run_results(
    config: ml_collections.ConfigDict,
    best: tuple[float, int],
    accuracy,
    rounds: list,
    train_sizes: np.ndarray,
    mesh,
    times: dict,
) -> dict:
  """The results.json fields every iterative run shares (the baselines,
  meta-FL and PersA-FL): what was trained, its accuracies (best over the
  tested rounds, last, per client) and the per-round records, the times
  (`times`: wall_time_s, compile_time_s, data_time_s, eval_time_s), memory
  and the config."""
  return {
      "dataset": config.dataset,
      "model": config.model,
      "num_clients": int(len(train_sizes)),
      "seed": config.seed,
      "accuracy": best[0],
      "best_accuracy": best[0],
      "best_round": best[1],
      "last_accuracy": accuracy.overall,
      "accuracy_per_round": [r.get("accuracy") for r in rounds],
      "train_loss_per_round": [r.get("train_loss") for r in rounds],
      "per_client_accuracy": [
          None if np.isnan(a) else float(a) for a in accuracy.per_client
      ],
      "per_client_test_samples": accuracy.count.tolist(),
      "per_client_train_samples": train_sizes.tolist(),
      "rounds": rounds,
      **times,
      "peak_memory_gb": afl_experiment.peak_memory_gb(),
      "num_devices": mesh.size,
      "params_file": "params.msgpack",
      "jax_version": jax.__version__,
      "config": config.to_dict(),
  }


def run_experiment(
    config: ml_collections.ConfigDict,
    output_dir,
    split: data_lib.ClientSplit | None = None,
) -> dict[str, Any]:
  """Trains and evaluates one baseline and writes output_dir/results.json.

  Args:
    config: afl.experiment or `default_config` settings (missing baseline
      fields take their defaults).
    output_dir: where results.json and params.msgpack go.
    split: the prepared data, to share it across runs; None prepares it.
  """
  if config.algorithm == "persafl":
    # Imported here: baselines.persafl builds on this module.
    from baselines import persafl  # pylint: disable=g-import-not-at-top

    return persafl.run_experiment(config, output_dir, split)
  config = resolve(config)
  validate(config)
  start = time.perf_counter()
  output_dir, results_path = afl_experiment.prepare_output(config, output_dir)
  split, model, x, mesh, train_blocks, test_blocks, data = prepare(
      config, split
  )
  sizes = np.asarray(data.size)
  baseline = build(config, model.apply)
  key = jax.random.key(config.seed)
  params = jax.device_put(  # placed as the rounds return it: one compile
      models.init_params(model, jax.random.fold_in(key, 0), x.shape[1:]),
      jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
  )
  schedule = local_lib.make_schedule(
      sizes,
      step_rows(config),
      config.local_steps,
      config.local_epochs,
      num_shards=mesh.size,
      num_lanes=config.num_lanes
      or local_lib.default_num_lanes(
          local_lib.step_bytes(
              baseline.local, params, x.shape[1:], step_rows(config)
          ),
          config.num_clients,
          mesh.size,
      ),
  )
  round_fn = local_lib.round_fn(baseline.local, schedule, sizes, mesh)
  fine_tune, tune_key = None, jax.random.fold_in(key, 2**31 - 1)
  if config.algorithm in FINE_TUNED:
    fine_tune = meta_fl.fine_tuner(
        model.apply,
        config.personal_lr,
        config.nu,
        config.batch_size,
        sizes,
        mesh,
        schedule.num_lanes,
    )
  personalized = config.algorithm in PERSONALIZED
  count_loss = _loss_counter(model.apply, mesh)
  data_time = time.perf_counter() - start
  logging.info(
      "%s on %s-%s: %d clients in %d lanes x %d steps (%.0f%% busy), "
      "batch %d; data ready in %.2fs",
      config.algorithm,
      config.dataset,
      config.model,
      config.num_clients,
      schedule.num_lanes,
      schedule.length,
      100 * schedule.valid.mean(),
      config.batch_size,
      data_time,
  )

  work = client_work(
      baseline.local,
      params,
      x.shape[1:],
      schedule,
      sizes,
      config.local_epochs,
  )
  clock = afl_experiment.make_clock(config, sizes)
  if not personalized and fine_tune is None:
    client_model = np.zeros(config.num_clients, np.int32)
  else:
    client_model = np.arange(config.num_clients, dtype=np.int32)

  def evaluate(tested):
    accuracy = evaluation.evaluate(
        model.apply, tested, test_blocks, mesh, client_model
    )
    loss_sum, count = count_loss(
        tested, train_blocks, jnp.asarray(client_model)[train_blocks.client]
    )
    return accuracy, float(np.sum(loss_sum) / max(np.sum(count), 1))

  rounds, accuracy, best = [], None, (-1.0, 0)
  train_time = eval_time = 0.0
  with timing.CompileClock() as compile_clock:
    for index in range(1, config.rounds + 1):
      round_start = time.perf_counter()
      compile_before = compile_clock.seconds
      out = round_fn(params, data, jax.random.fold_in(key, index))
      params = baseline.server(params, out.upload)
      jax.block_until_ready(params)
      seconds = time.perf_counter() - round_start
      record = {
          "round": index,
          "local_loss": float(out.loss),
          "seconds": seconds - (compile_clock.seconds - compile_before),
          "compile_s": compile_clock.seconds - compile_before,
      }
      record["timing"] = clock.round(work)
      train_time += record["seconds"]
      diverged = not math.isfinite(record["local_loss"])
      last = index == config.rounds or diverged
      if index % config.eval_every == 0 or last:
        eval_start = time.perf_counter()
        if fine_tune is not None:
          tested = fine_tune(params, data, jax.random.fold_in(tune_key, index))
        elif personalized:
          tested = out.personal
        else:
          tested = jax.tree.map(lambda a: a[None], params)
        accuracy, train_loss = evaluate(tested)
        record.update(accuracy=accuracy.overall, train_loss=train_loss)
        eval_time += time.perf_counter() - eval_start
        if accuracy.overall > best[0]:
          best = (accuracy.overall, index)
        logging.info(
            "round %d/%d: test accuracy %.4f, train loss %.4f, local loss "
            "%.4f, %.3fs",
            index,
            config.rounds,
            accuracy.overall,
            train_loss,
            record["local_loss"],
            seconds,
        )
      rounds.append(record)
      if diverged:
        logging.warning("round %d: the local loss diverged; stopping", index)
        break
  compile_time = compile_clock.seconds

  afl_experiment.save_params(
      output_dir / "params.msgpack", tested, client_model
  )
  results = {
      "algorithm": config.algorithm,
      **run_results(
          config,
          best,
          accuracy,
          rounds,
          sizes,
          mesh,
          dict(
              wall_time_s=train_time,
              compile_time_s=compile_time,
              data_time_s=data_time,
              eval_time_s=eval_time,
          ),
      ),
      "client_work": {
          "steps": schedule.steps.tolist(),
          "samples": work.num_samples.tolist(),
          "batch_size": schedule.batch_size,
          "flops_fixed": float(work.flops_fixed),
          "flops_per_sample": float(work.flops_per_sample),
          "upload_bytes": int(work.bytes_up[0]),
          "download_bytes": int(work.bytes_down[0]),
      },
      "schedule": {
          "lanes": schedule.num_lanes,
          "length": schedule.length,
          "busy": float(schedule.valid.mean()),
      },
      "timing": clock.summary(),
  }
  afl_experiment._write_atomically(  # pylint: disable=protected-access
      results_path, json.dumps(results, indent=2).encode("utf-8")
  )
  logging.info(
      "%s: best test accuracy %.4f (round %d), last %.4f; training %.2fs "
      "+ compile %.2fs; wrote %s",
      config.algorithm,
      best[0],
      best[1],
      accuracy.overall,
      train_time,
      compile_time,
      results_path,
  )
  return results
