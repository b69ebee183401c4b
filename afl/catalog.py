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
    "initial_batch_size": registry.Field(
        int,
        "Simulated clock: every client's local batch size B_1 in round 1 "
        "(eq. 7 adapts it afterwards; capped at |D_i|).",
        minimum=1,
    ),
}


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
    return dict(settings, statistics_dtype="float32", initial_batch_size=32)

  return defaults


def _validate(hparams, config) -> None:
  if hparams.get("num_groups", 1) > config.num_clients:
    raise ValueError(
        f"--num_groups={hparams.num_groups} exceeds "
        f"--num_clients={config.num_clients}"
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
