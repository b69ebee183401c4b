"""What the baselines are called and the settings they read, declared
without JAX (`afl.registry`; the analytic algorithms' are in
`afl.catalog`): FedAvg, FedZO, BAFFLE, pFedMe, pFedZO, the nu-step
meta-FedAvg (built by `baselines.iterative`) and PersA-FL
(`baselines.persafl`), with the papers' hyperparameters as defaults (DESIGN.md
section 4), by dataset where they differ. `rounds` defaults to the paper's
training-time study: 20 rounds on MNIST and CIFAR-10 (after BAFFLE), 600 on
the synthetic data (after pFedMe).
"""

from afl import catalog
from afl import registry

Field = registry.Field
# pFedMe / pFedZO: which model of the carry (theta, w_i) a client is tested
# with.
MOREAU_TESTED = ("theta", "local")
# meta_fedavg, persafl (maml): through the inner steps or first order.
META_GRADIENTS = ("exact", "first_order")
# persafl's personalizations: MAML or the Moreau envelope.
PERSONALIZATIONS = ("maml", "me")
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
        choices=MOREAU_TESTED,
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
        choices=META_GRADIENTS,
    ),
    "init": Field(
        str,
        "The model's initial params: pytorch (U(+-1/sqrt(fan_in)) kernels "
        "and biases, as the papers' PyTorch code) or flax (lecun_normal, "
        "zero biases).",
        choices=catalog.INITS,
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


# DP-FedAvg (McMahan et al., 2018; `afl.privacy`): FedAvg's privacy
# settings, C bounding each client's model update per round.
PRIVATE = {"fedavg": catalog.privacy_defaults(1.0)}


def paper_defaults(name: str, dataset: str) -> dict:
  """`name`'s settings with the papers' values for `dataset`."""
  settings = dict(PAPER_DEFAULTS[name], rounds=DEFAULT_ROUNDS[dataset])
  if dataset == "synthetic":
    settings.update(SYNTHETIC_DEFAULTS.get(name, {}))
  return dict(settings, **PRIVATE.get(name, {}))


PERSAFL_FIELDS = {
    "personalization": registry.Field(
        str,
        "persafl: MAML (one fine-tuning step) or Moreau envelope (pFedMe's "
        "solver).",
        choices=PERSONALIZATIONS,
    ),
    "max_staleness": registry.non_negative(
        int,
        "persafl: bound on an update's staleness in server versions (rounds "
        "completed by every client); 0: synchronous.",
    ),
    "delay_spread": registry.non_negative(
        float,
        "persafl: sigma of the log-normal noise on each computation's delay.",
    ),
}


def persafl_defaults(dataset: str, given: dict) -> dict:
  """The synchronous counterpart's defaults (maml: meta_fedavg, me:
  pfedme) with PersA-FL's own."""
  personalization = given.get("personalization", "maml")
  counterpart = paper_defaults(
      "meta_fedavg" if personalization == "maml" else "pfedme", dataset
  )
  moreau = paper_defaults("pfedme", dataset)
  return dict(
      rounds=counterpart["rounds"],
      batch_size=counterpart["batch_size"],
      local_steps=counterpart["local_steps"],
      lr=counterpart["lr"],
      personal_lr=counterpart["personal_lr"],
      lam=moreau["lam"],
      inner_steps=moreau["inner_steps"],
      pfedme_beta=1.0,
      meta_grad="exact",
      num_lanes=0,
      init=counterpart["init"],
      personalization=personalization,
      max_staleness=2,
      delay_spread=0.5,
  )


def persafl_validate(hparams, config) -> None:
  del config
  if not hparams.local_steps:
    raise ValueError("persafl needs --local_steps > 0 (R steps per update)")


DESCRIPTIONS = {
    "fedavg": "FedAvg (McMahan et al., 2017)",
    "fedzo": "FedZO: FedAvg with sphere zeroth-order estimates",
    "baffle": "BAFFLE: Stein's-identity estimates, local Adam",
    "pfedme": "pFedMe: Moreau-envelope personalization",
    "pfedzo": "pFedZO: pFedMe with sphere zeroth-order estimates",
    "meta_fedavg": "FedAvg on the nu-step meta-objective (--nu, --meta_grad)",
}

registry.declare(FIELDS)
registry.declare(PERSAFL_FIELDS)
for _name, _description in DESCRIPTIONS.items():
  registry.register(
      registry.Entry(
          _name,
          "baselines.iterative",
          lambda dataset, given, name=_name: paper_defaults(name, dataset),
          _description,
          catalog.validate_privacy if _name in PRIVATE else None,
      )
  )
registry.register(
    registry.Entry(
        "persafl",
        "baselines.persafl",
        persafl_defaults,
        "PersA-FL: asynchronous personalized FL (--personalization, "
        "--max_staleness)",
        persafl_validate,
    )
)
