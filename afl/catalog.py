"""What a run can name, declared without JAX: the models and the analytic
algorithms with their settings and the paper's defaults (section V-A).

The registry (`afl.registry`) holds the declarations and imports an
algorithm's module (its builder) only when a run builds it, so that an
entry point checks its flags and settings before JAX loads. The
baselines declare theirs in `baselines.catalog`.

  fedacnnl      FedACnnL (Algorithm 1): L rounds, one global model
                (eq. 5), adaptive batch size (eq. 7) on the clock;
  fedacnnl_wa   the same without eq. 7 (every client keeps B_1);
  pfedacnnl     K-means groups (eq. 8, 9), group meta-models (eq. 10, 11),
                analytic personalization (eq. 12, 13);
  pfedacnnl_wc  pFedACnnL with K = 1 (no clustering);
  pfedacnnl_wp  pFedACnnL without the personalization rounds.
"""

import math
from typing import NamedTuple

from afl import registry

MODELS = ("lr", "mlp", "dcnn")
# How the iterative baselines initialize a model (`models.init_params`).
INITS = ("flax", "pytorch")

FIELDS = {
    "gamma": registry.positive(
        float, "Ridge coefficient (eq. 5; the meta-models' too, eq. 11)."
    ),
    "eps": registry.positive(
        float, "pFedACnnL's personalization weight epsilon (eq. 12, 13)."
    ),
    "num_groups": registry.Field(
        int, "pFedACnnL's number of K-means groups K.", minimum=1
    ),
    "statistics_dtype": registry.Field(
        str,
        "dtype of the clients' Gram products (sums and solves are float64 "
        "either way); float64 is exact, float32 faster.",
        choices=("float32", "float64"),
    ),
    "secure_sum": registry.Field(
        bool,
        "Sum the clients' statistics by secure aggregation (SecAgg+, "
        "afl/secure_sum.py): the server sees only masked uploads and sums.",
    ),
    "secure_sum_neighbours": registry.non_negative(
        int,
        "--secure_sum: each client's neighbours k in its group's mask graph; "
        "0: 2 ceil(log2 n) for the largest group's n.",
    ),
    "secure_sum_threshold": registry.non_negative(
        int,
        "--secure_sum: Shamir threshold t (shares needed to unmask a "
        "client); 0: a majority of its neighbours.",
    ),
    "secure_sum_bound": registry.non_negative(
        float,
        "--secure_sum: the largest |x| of the raw inputs (for the fixed-"
        "point scale); 0: the dataset's known range (mnist, cifar10).",
    ),
    "initial_batch_size": registry.Field(
        int,
        "Simulated clock: every client's local batch size B_1 in round 1 "
        "(eq. 7 adapts it afterwards; capped at |D_i|).",
        minimum=1,
    ),
}


# Differential privacy (`afl.privacy`): the analytic algorithms and FedAvg
# (DP-FedAvg) read these; the others refuse them ("does not apply").
PRIVACY_MODES = ("off", "local", "distributed")
PRIVACY_FIELDS = {
    "dp_mode": registry.Field(
        str,
        "Differential privacy: off; local (every upload private by itself); "
        "distributed (noise shared by the clients, only the secure sum is "
        "private). afl/privacy.py.",
        choices=PRIVACY_MODES,
    ),
    "dp_epsilon": registry.Field(
        float,
        "Target epsilon of the whole run (> 0; inf: no noise, the "
        "non-private run).",
        minimum=0,
        open_minimum=True,
        infinite=True,
    ),
    "dp_delta": registry.Field(
        float,
        "Target delta of the whole run, in (0, 1).",
        minimum=0,
        open_minimum=True,
        maximum=1,
        open_maximum=True,
    ),
    "dp_clip": registry.positive(
        float,
        "Norm bound C: of every layer input row (analytic), of every "
        "client's model update (DP-FedAvg).",
    ),
}
registry.declare(PRIVACY_FIELDS)


def privacy_defaults(clip: float) -> dict:
  """The privacy settings' defaults (no privacy) with clip C."""
  return dict(dp_mode="off", dp_epsilon=math.inf, dp_delta=1e-5, dp_clip=clip)


def validate_privacy(hparams, config) -> None:
  """Refuses privacy settings that cannot apply (before any work)."""
  if hparams.dp_mode == "off":
    defaults = registry.get(config.algorithm).defaults(config.dataset, {})
    for name in ("dp_epsilon", "dp_delta", "dp_clip"):
      if hparams[name] != defaults[name]:
        raise ValueError(
            f"--{name}={hparams[name]} needs --dp_mode=local or distributed"
        )
    return
  if hparams.dp_mode == "distributed":
    # The analytic uploads' sum needs --secure_sum; DP-FedAvg's distributed
    # mode is the central one (noise on the sum of the clipped updates,
    # `afl.privacy`), with no secure sum of its own simulated.
    if "secure_sum" in hparams and not hparams.secure_sum:
      raise ValueError(
          "--dp_mode=distributed needs the secure sum (--secure_sum): only "
          "the sum of the clients' noise shares is private"
      )
    for name in ("dropout", "deadline_s", "participation_file"):
      if config[name]:
        raise ValueError(
            f"--dp_mode=distributed does not allow --{name}: a missing "
            "client's noise share would leave the sum under-noised"
        )


class Variant(NamedTuple):
  clustered: bool  # K-means into --num_groups groups (else K = 1)
  personalized: bool  # the personalization rounds (eq. 13)
  adaptive: bool  # eq. 7 on the clock
  description: str


VARIANTS = {
    "fedacnnl": Variant(False, False, True, "FedACnnL (Algorithm 1)"),
    "fedacnnl_wa": Variant(
        False, False, False, "FedACnnL without the adaptive batch size (eq. 7)"
    ),
    "pfedacnnl": Variant(True, True, True, "pFedACnnL (section IV)"),
    "pfedacnnl_wc": Variant(
        False, True, True, "pFedACnnL without clustering (K = 1)"
    ),
    "pfedacnnl_wp": Variant(
        True, False, True, "pFedACnnL without personalization"
    ),
}


def _defaults(variant: Variant):
  def defaults(dataset: str, given: dict) -> dict:
    del dataset, given
    settings = dict(gamma=100.0)
    if variant.personalized:
      settings["eps"] = 2500.0
    if variant.clustered:
      settings["num_groups"] = 10
    return dict(
        settings,
        statistics_dtype="float32",
        initial_batch_size=32,
        **SECURE_SUM_OFF,
        # C below the median row norm of MNIST's layers (about 9, 6, 4 for
        # the MLP's three): measured best of 1, 3, 6 at epsilon 1 and 8
        # (experiments/README.md, "Privacy").
        **privacy_defaults(3.0),
    )

  return defaults


# --secure_sum off, and its options at their defaults.
SECURE_SUM_OFF = dict(
    secure_sum=False,
    secure_sum_neighbours=0,
    secure_sum_threshold=0,
    secure_sum_bound=0.0,
)
# Datasets whose inputs have a known range (`afl.secure_sum.DATA_BOUNDS`).
BOUNDED_DATASETS = ("mnist", "cifar10")


def _validate(hparams, config) -> None:
  if hparams.get("num_groups", 1) > config.num_clients:
    raise ValueError(
        f"--num_groups={hparams.num_groups} exceeds "
        f"--num_clients={config.num_clients}"
    )
  _validate_secure_sum(hparams, config)
  validate_privacy(hparams, config)


def _validate_secure_sum(hparams, config) -> None:
  if not hparams.get("secure_sum"):
    for name, off in SECURE_SUM_OFF.items():
      if hparams.get(name, off) != off:
        raise ValueError(f"--{name} is used only with --secure_sum")
    return
  if config.get("clients_per_round"):
    raise ValueError(
        "--secure_sum draws its neighbour graph once per run over all "
        "clients; --clients_per_round is not supported with it"
    )
  if not hparams.secure_sum_bound and config.dataset not in BOUNDED_DATASETS:
    raise ValueError(
        f"--secure_sum needs a bound on the inputs of --dataset="
        f"{config.dataset}: set --secure_sum_bound"
    )
  neighbours, threshold = (
      hparams.secure_sum_neighbours,
      hparams.secure_sum_threshold,
  )
  if neighbours == 1:
    raise ValueError("--secure_sum_neighbours must be 0 (default) or >= 2")
  if neighbours and threshold > neighbours:
    raise ValueError(
        f"--secure_sum_threshold={threshold} exceeds "
        f"--secure_sum_neighbours={neighbours}"
    )


registry.declare(FIELDS)
for _name, _variant in VARIANTS.items():
  registry.register(
      registry.Entry(
          _name,
          "afl.analytic",
          _defaults(_variant),
          _variant.description,
          _validate,
      )
  )
