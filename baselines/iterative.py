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

The papers' hyperparameters are the registered defaults (DESIGN.md section
4), by dataset where they differ; `rounds` defaults to the paper's
training-time study: 20 rounds on MNIST and CIFAR-10 (after BAFFLE), 600 on
the synthetic data (after pFedMe). The server model starts as in the papers'
PyTorch code (`init="pytorch"`, `models.pytorch_uniform`; "flax": Flax's
defaults, with which pFedMe diverges on per-pixel standardized MNIST).
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
from afl import registry
from baselines import algorithms
from baselines import meta_fl

Field = registry.Field
FIELDS = {
    "rounds": Field(int, "Rounds of training.", minimum=1),
    "batch_size": Field(int, "Local batch size.", minimum=1),
    "local_steps": registry.non_negative(
        int, "Local steps per client and round (pFedMe's R); 0: local epochs."
    ),
    "local_epochs": Field(int, "Local epochs when local_steps=0.", minimum=1),
    "lr": registry.positive(float, "Local learning rate (BAFFLE: Adam's)."),
    "personal_lr": registry.non_negative(
        float,
        "pFedMe/pFedZO personal learning rate; meta_fedavg, persafl (maml): "
        "the inner step size alpha.",
    ),
    "lam": registry.non_negative(
        float, "pFedMe/pFedZO Moreau-envelope lambda."
    ),
    "inner_steps": Field(int, "pFedMe/pFedZO K.", minimum=1),
    "pfedme_beta": Field(
        float,
        "pFedMe/pFedZO server mixing beta in (0, 1]; persafl: the server "
        "step beta.",
        minimum=0,
        open_minimum=True,
        maximum=1,
    ),
    "pfedme_tested": Field(
        str,
        "pFedMe/pFedZO: test each client's theta (the paper's personalized "
        "model) or its local model w_i (what the authors' code tests).",
        choices=algorithms.MOREAU_TESTED,
    ),
    "mu": registry.positive(float, "FedZO/pFedZO smoothing radius."),
    "directions": Field(int, "FedZO/pFedZO directions b2.", minimum=1),
    "sigma": registry.positive(float, "BAFFLE perturbation scale."),
    "perturbations": Field(int, "BAFFLE perturbations K.", minimum=1),
    "central": Field(bool, "BAFFLE: central differences."),
    "num_lanes": registry.non_negative(
        int, "Packed lanes of local training; 0: automatic."
    ),
    "nu": registry.non_negative(
        int, "meta_fedavg: fine-tuning steps of the meta-objective."
    ),
    "meta_grad": Field(
        str,
        "meta_fedavg, persafl (maml): differentiate through the inner steps, "
        "or drop the second-order terms.",
        choices=meta_fl.META_GRADIENTS,
    ),
    "init": Field(
        str,
        "The model's initial params: pytorch (U(+-1/sqrt(fan_in)) kernels "
        "and biases, as the papers' PyTorch code) or flax (lecun_normal, "
        "zero biases).",
        choices=models.INITS,
    ),
}
# The papers' training-time study: 20 rounds on MNIST (after BAFFLE), 600 on
# the synthetic data (after pFedMe); 20 on the user's own data.
DEFAULT_ROUNDS = {"mnist": 20, "cifar10": 20, "synthetic": 600, "npz": 20}
# init: the papers' reference code is PyTorch (`models.pytorch_uniform`).
_TRAINING = dict(batch_size=20, local_epochs=1, num_lanes=0, init="pytorch")
_MOREAU = dict(
    lr=0.005,
    local_steps=20,
    personal_lr=0.09,
    lam=15.0,
    inner_steps=5,
    pfedme_beta=1.0,
    pfedme_tested="theta",
)
_SPHERE = dict(mu=1e-3, directions=20)
# By algorithm: its settings with their defaults (DESIGN.md section 4).
PAPER_DEFAULTS = {
    "fedavg": dict(_TRAINING, lr=0.05, local_steps=0),
    "fedzo": dict(_TRAINING, lr=0.01, local_steps=0, **_SPHERE),
    # BAFFLE: Adam's lr 0.01 as the authors' MNIST runs (FengHZ/BAFFLE).
    # Their batch is 32; 200 here because a step's cost is drawing its K x d
    # normals (MNIST-MLP: 0.2 s a step on a CPU core at either batch), so an
    # epoch at batch 32 costs 5x more (experiments/README.md, "Baselines").
    "baffle": dict(
        _TRAINING,
        lr=0.01,
        local_steps=0,
        batch_size=200,
        sigma=1e-4,
        perturbations=100,
        central=False,
    ),
    "pfedme": dict(_TRAINING, **_MOREAU),
    "pfedzo": dict(_TRAINING, **_MOREAU, **_SPHERE),
    # personal_lr: the inner (fine-tuning) step size alpha.
    "meta_fedavg": dict(
        _TRAINING,
        lr=0.05,
        local_steps=20,
        personal_lr=0.05,
        nu=1,
        meta_grad="exact",
    ),
}
# pFedMe's synthetic settings (its authors' code).
SYNTHETIC_DEFAULTS = {
    "pfedme": dict(personal_lr=0.01, lam=20.0),
    "pfedzo": dict(personal_lr=0.01, lam=20.0),
}


def paper_defaults(name: str, dataset: str) -> dict:
  """`name`'s settings with the papers' values for `dataset`."""
  settings = dict(PAPER_DEFAULTS[name], rounds=DEFAULT_ROUNDS[dataset])
  if dataset == "synthetic":
    settings.update(SYNTHETIC_DEFAULTS.get(name, {}))
  return settings


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
    round_fn = lanes.round_fn(baseline.local, schedule, sizes, mesh)
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
      del index
      if who is None:
        out = round_fn(state.params, data, key)
      else:  # the sampled clients train, the reported ones count
        out = round_fn(
            state.params,
            data,
            key,
            lanes.pad_schedule(
                lanes.make_schedule(
                    np.where(who.sampled, sizes, 0),
                    rows,
                    hparams.local_steps,
                    hparams.local_epochs,
                    num_shards=mesh.size,
                    num_lanes=schedule.num_lanes,
                )
            ),
            np.where(who.reported, sizes, 0),
            state.personal,
        )
      params = state.params
      if who is None or who.reported.any():
        params = baseline.server(state.params, out.upload)
      return State(params, out.personal), {"local_loss": float(out.loss)}

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


DESCRIPTIONS = {
    "fedavg": "FedAvg (McMahan et al., 2017)",
    "fedzo": "FedZO: FedAvg with sphere zeroth-order estimates",
    "baffle": "BAFFLE: Stein's-identity estimates, local Adam",
    "pfedme": "pFedMe: Moreau-envelope personalization",
    "pfedzo": "pFedZO: pFedMe with sphere zeroth-order estimates",
    "meta_fedavg": "FedAvg on the nu-step meta-objective (--nu, --meta_grad)",
}

registry.declare(FIELDS)
for _name, _description in DESCRIPTIONS.items():
  registry.register(
      registry.Entry(
          _name,
          _build(_name),
          lambda dataset, given, name=_name: paper_defaults(name, dataset),
          _description,
      )
  )
