"""The synchronous iterative baselines as registered algorithms: FedAvg,
FedZO, BAFFLE, pFedMe, pFedZO and the nu-step meta-FedAvg.

Each is a `baselines.algorithms.Baseline` (a client's local training and
the server's update) turned into an `afl.algorithm.Algorithm`: a round runs
every client's local training in packed lanes over the devices
(`afl.lanes.round_fn`) from the server model and applies the server update
to the clients' sample-weighted mean upload.

With partial participation (`afl.participation`) only the round's sampled
clients train (packed into the same lanes; a dropped or late client's work
is done, and its personal model kept, as on a real device), the server
applies its update to the sample-weighted mean upload of the clients that
reported (FedAvg: the mean of their models; pFedMe, pFedZO: (1 - beta) w +
beta times it), and keeps its model when none did. A client that sits a
round out keeps its personal model of the last round it trained in (the
server model before its first). The state is the server model
and the clients' personal models of the last round (pFedMe, pFedZO). Tested
are the server model (FedAvg, FedZO, BAFFLE), each client's personal model
(pFedMe, pFedZO: theta_i or w_i, `--pfedme_tested`), or the server model
fine-tuned by every client with nu steps (meta-FedAvg, `meta_fl.fine_tuner`).

Every round is timed on the shared simulated clock (`afl.clock`): what each
client does (`client_work`: its samples and batch size, the FLOPs of the
jitted local step from XLA's cost analysis, a whole model down and up) is
the same every round, with fixed batches (no eq. 7).

The settings and the papers' hyperparameters, their defaults, are declared
in `baselines.catalog`. The server model starts as in the papers' PyTorch
code (`init="pytorch"`, `models.pytorch_uniform`; "flax": Flax's defaults,
with which pFedMe diverges on per-pixel standardized MNIST).
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from afl import algorithm as algorithm_lib
from afl import clock as clock_lib
from afl import lanes
from afl import memory
from afl import models
from afl import privacy
from afl import rng
from baselines import algorithms
from baselines import catalog
from baselines import meta_fl


def make_baseline(name: str, hparams, apply_fn) -> algorithms.Baseline:
  """The `Baseline` of algorithm `name` with its settings."""
  if name == "fedavg":
    return algorithms.fedavg(apply_fn, hparams.lr)
  if name == "fedzo":
    return algorithms.fedzo(
        apply_fn, hparams.lr, hparams.mu, hparams.directions
    )
  if name == "baffle":
    return algorithms.baffle(
        apply_fn,
        hparams.lr,
        hparams.sigma,
        hparams.perturbations,
        hparams.central,
    )
  if name == "meta_fedavg":
    return meta_fl.meta_fedavg(
        apply_fn, hparams.lr, hparams.personal_lr, hparams.nu, hparams.meta_grad
    )
  moreau = (
      hparams.lr,
      hparams.personal_lr,
      hparams.lam,
      hparams.inner_steps,
      hparams.pfedme_beta,
  )
  if name == "pfedme":
    return algorithms.pfedme(apply_fn, *moreau, tested=hparams.pfedme_tested)
  return algorithms.pfedzo(
      apply_fn,
      *moreau,
      hparams.mu,
      hparams.directions,
      tested=hparams.pfedme_tested,
  )


def step_rows(name: str, hparams) -> int:
  """Rows of a local step's batch: meta_fedavg's step takes nu + 1 batches
  of b (`baselines.meta_fl`), the others one."""
  if name == "meta_fedavg":
    return hparams.batch_size * (hparams.nu + 1)
  return hparams.batch_size


def client_work(
    local: lanes.LocalTraining,
    params,
    feature_shape: tuple[int, ...],
    schedule: lanes.Schedule,
    sizes: np.ndarray,
    epochs: int,
) -> clock_lib.ClientWork:
  """What every client does in a round, for the shared clock: its samples
  (E |D_i| for epochs, R b for fixed steps), batch, the jitted step's FLOPs
  (XLA cost analysis) and a whole model up and down. `params` may be
  shapes (`jax.ShapeDtypeStruct`s)."""
  key = jax.random.key(0)
  carry = jax.eval_shape(local.init, params, key)

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


class State(NamedTuple):
  """The server model and, for pFedMe / pFedZO, the clients' personal
  models [C, ...] of the last round (None before the first)."""

  params: Any
  personal: Any


def _build(name: str) -> Callable:
  def build(hparams, fed: algorithm_lib.Federation) -> algorithm_lib.Algorithm:
    model, mesh, sizes = fed.model, fed.mesh, fed.client_sizes
    baseline = make_baseline(name, hparams, model.apply)
    # DP-FedAvg: one Gaussian release (the sum of the clipped updates, L2
    # sensitivity C) per round, the clients weighted equally.
    private = None
    if name in catalog.PRIVATE:
      private = privacy.from_settings(hparams, hparams.rounds)
    dp = private is not None and private.enabled
    weights = sizes
    if dp:
      baseline = algorithms.clipped_updates(baseline, private.clip)
      weights = np.ones_like(sizes)
    noise_key = rng.stream(fed.key, "privacy")
    shapes = jax.eval_shape(
        lambda: models.init_params(model, jax.random.key(0), fed.input_shape)
    )
    rows = step_rows(name, hparams)
    schedule = lanes.make_schedule(
        sizes,
        rows,
        hparams.local_steps,
        hparams.local_epochs,
        num_shards=mesh.size,
        num_lanes=hparams.num_lanes
        or lanes.default_num_lanes(
            lanes.step_bytes(baseline.local, shapes, fed.input_shape, rows),
            fed.num_clients,
            mesh.size,
        ),
    )
    round_fn = lanes.round_fn(baseline.local, schedule, weights, mesh)
    data = lanes.client_data(
        fed.inputs, fed.split.y, fed.split.train_indices, mesh
    )
    fine_tune = None
    if name == "meta_fedavg":
      fine_tune = meta_fl.fine_tuner(
          model.apply,
          hparams.personal_lr,
          hparams.nu,
          hparams.batch_size,
          sizes,
          mesh,
          schedule.num_lanes,
      )
    work = client_work(
        baseline.local,
        shapes,
        fed.input_shape,
        schedule,
        sizes,
        hparams.local_epochs,
    )
    everyone = np.arange(fed.num_clients)

    def init(key):
      params = models.init_params(
          model, key, fed.input_shape, init=hparams.init
      )
      return State(fed.replicated(params), None)

    def round_(state: State, index: int, key, who=None):
      metrics = {}
      if who is None:
        out = round_fn(state.params, data, key)
        counted = (schedule.steps > 0) & (weights > 0)
      else:  # the sampled clients train, the reported ones count
        round_schedule = lanes.make_schedule(
            np.where(who.sampled, sizes, 0),
            rows,
            hparams.local_steps,
            hparams.local_epochs,
            num_shards=mesh.size,
            num_lanes=schedule.num_lanes,
        )
        round_weights = np.where(who.reported, weights, 0)
        out = round_fn(
            state.params,
            data,
            key,
            lanes.pad_schedule(round_schedule),
            round_weights,
            state.personal,
        )
        counted = (round_schedule.steps > 0) & (round_weights > 0)
      upload = out.upload
      if dp:  # the mean of n clipped updates, with the noise of their sum
        n = int(counted.sum())
        std = private.noise_multiplier * private.clip
        metrics["dp_noise_std"] = std
        upload = privacy.tree_noise(
            jax.random.fold_in(noise_key, index),
            upload,
            privacy.sum_std(std, [n], private.mode)[0] / max(n, 1),
        )
      params = state.params
      if who is None or who.reported.any():
        params = baseline.server(state.params, upload)
      metrics["local_loss"] = float(out.loss)
      return State(params, out.personal), metrics

    def tested(state: State, key):
      if fine_tune is not None:
        return algorithm_lib.Tested(
            fine_tune(state.params, data, key), everyone
        )
      if state.personal is not None:
        return algorithm_lib.Tested(state.personal, everyone)
      return algorithm_lib.Tested(
          jax.tree.map(lambda a: a[None], state.params),
          np.zeros(fed.num_clients, np.int32),
      )

    summary = {
        "privacy": private and private.summary(),
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
    }
    return algorithm_lib.Algorithm(
        init=init,
        round=round_,
        num_rounds=hparams.rounds,
        models=tested,
        work=lambda index, batch_size: work,
        summary=lambda state: summary,
    )

  return build


# The builders by name (`afl.registry`, declared in `baselines.catalog`).
BUILDERS = {name: _build(name) for name in catalog.DESCRIPTIONS}
