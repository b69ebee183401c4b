r"""Runs one federated experiment and writes DIR/results.json.

  python -m experiments.run --algorithm=fedacnnl --dataset=mnist --model=mlp \
      --num_clients=100 --dirichlet_beta=0.1 --gamma=100 --seed=0 \
      --data_dir=../shared/data --output_dir=runs/mnist_mlp

  python -m experiments.run --algorithm=pfedme --dataset=mnist --model=mlp \
      --rounds=100 --data_dir=../shared/data --output_dir=runs/pfedme

Flags map one to one onto `baselines.experiment.default_config()` (the
analytic settings of `afl.experiment.default_config()` plus the baselines');
the work is done by `afl.experiment.run_experiment`.
"""

from absl import app
from absl import flags
from absl import logging

from afl import data
from afl import distributed
from afl import experiment
from afl import models
from baselines import experiment as baselines_experiment

_DEFAULTS = baselines_experiment.default_config()

flags.DEFINE_enum(
    "algorithm",
    _DEFAULTS.algorithm,
    experiment.ALGORITHMS,
    "fedacnnl; fedacnnl_wa (without the adaptive batch size, eq. 7); "
    "pfedacnnl; pfedacnnl_wc (no clustering, K = 1); "
    "pfedacnnl_wp (no personalization); baselines: fedavg, fedzo, baffle, "
    "pfedme, pfedzo, meta_fedavg (--nu, --meta_grad), persafl "
    "(--personalization, --max_staleness).",
)
flags.DEFINE_enum("dataset", _DEFAULTS.dataset, data.DATASETS, "Dataset.")
flags.DEFINE_enum(
    "model",
    _DEFAULTS.model,
    models.MODELS,
    "lr: multinomial logistic regression; mlp: [128, 64] ReLU; "
    "dcnn: the paper's conv net (see --width).",
)
flags.DEFINE_float("width", _DEFAULTS.width, "DCNN width multiplier.")
flags.DEFINE_integer("num_clients", _DEFAULTS.num_clients, "Clients C.")
flags.DEFINE_enum(
    "partition",
    _DEFAULTS.partition,
    data.PARTITIONS,
    "Client split: default is dirichlet for mnist/cifar10 and "
    "the generator's power-law clients for synthetic.",
)
flags.DEFINE_float(
    "dirichlet_beta",
    _DEFAULTS.dirichlet_beta,
    "Dirichlet concentration (smaller: more heterogeneous).",
)
flags.DEFINE_integer(
    "min_client_size",
    _DEFAULTS.min_client_size,
    "Least samples per client (dirichlet, power_law).",
)
flags.DEFINE_float(
    "test_fraction",
    _DEFAULTS.test_fraction,
    "Share of each client's samples held out for testing.",
)
flags.DEFINE_float(
    "synthetic_alpha",
    _DEFAULTS.synthetic_alpha,
    "alpha of synthetic(alpha, beta).",
)
flags.DEFINE_float(
    "synthetic_beta",
    _DEFAULTS.synthetic_beta,
    "beta of synthetic(alpha, beta).",
)
flags.DEFINE_string(
    "data_dir",
    None,
    "Folder with mnist/ or cifar10 files; default: "
    "$AFL_DATA_DIR, then ~/.cache/afl/data.",
)
flags.DEFINE_enum(
    "data_source",
    _DEFAULTS.data_source,
    ["auto", "files", "tfds"],
    "Where mnist/cifar10 come from.",
)
flags.DEFINE_float("gamma", _DEFAULTS.gamma, "Ridge coefficient (eq. 5).")
flags.DEFINE_float(
    "eps", _DEFAULTS.eps, "pFedACnnL's personalization weight epsilon (eq. 13)."
)
flags.DEFINE_integer(
    "num_groups",
    _DEFAULTS.num_groups,
    "pFedACnnL's number of K-means groups K.",
)
flags.DEFINE_enum(
    "statistics_dtype",
    _DEFAULTS.statistics_dtype,
    ["float32", "float64"],
    "dtype of the clients' Gram products (sums and solves are "
    "float64 either way); float64 is exact, float32 faster.",
)
flags.DEFINE_integer(
    "seed", _DEFAULTS.seed, "Root seed: data split, label encodings, init."
)
flags.DEFINE_integer(
    "data_seed",
    _DEFAULTS.data_seed,
    "Seed of the data (split, synthetic generator) alone; " "-1: --seed.",
)
flags.DEFINE_integer(
    "block_size",
    _DEFAULTS.block_size,
    "Samples per client block; 0 picks one from N and C.",
)
flags.DEFINE_integer(
    "num_devices",
    _DEFAULTS.num_devices,
    "Local devices to shard clients over; 0: all.",
)
# Baselines (README "Baselines"); unset ones take the papers' defaults.
flags.DEFINE_integer(
    "rounds",
    _DEFAULTS.rounds,
    "Baselines: rounds; 0: 20 (mnist), 600 (synthetic).",
)
flags.DEFINE_integer(
    "batch_size", None, "Local batch size; default 20 (BAFFLE: 200)."
)
flags.DEFINE_integer(
    "local_steps",
    None,
    "Local steps per client and round (pFedMe's R); 0: local epochs.",
)
flags.DEFINE_integer(
    "local_epochs", _DEFAULTS.local_epochs, "Local epochs when local_steps=0."
)
flags.DEFINE_float(
    "lr",
    None,
    "Local learning rate (BAFFLE: Adam's).",
)
flags.DEFINE_float(
    "personal_lr",
    None,
    "pFedMe/pFedZO personal learning rate; meta_fedavg, persafl (maml): the "
    "inner step size alpha.",
)
flags.DEFINE_float("lam", None, "pFedMe/pFedZO Moreau-envelope lambda.")
flags.DEFINE_integer("inner_steps", _DEFAULTS.inner_steps, "pFedMe/pFedZO K.")
flags.DEFINE_float(
    "pfedme_beta",
    _DEFAULTS.pfedme_beta,
    "pFedMe/pFedZO server mixing beta; persafl: the server step beta.",
)
flags.DEFINE_enum(
    "pfedme_tested",
    _DEFAULTS.pfedme_tested,
    ["theta", "local"],
    "pFedMe/pFedZO: test each client's theta (the paper's personalized "
    "model) or its local model w_i (what the authors' code tests).",
)
flags.DEFINE_float("mu", _DEFAULTS.mu, "FedZO/pFedZO smoothing radius.")
flags.DEFINE_integer(
    "directions", _DEFAULTS.directions, "FedZO/pFedZO directions b2."
)
flags.DEFINE_float("sigma", _DEFAULTS.sigma, "BAFFLE perturbation scale.")
flags.DEFINE_integer(
    "perturbations", _DEFAULTS.perturbations, "BAFFLE perturbations K."
)
flags.DEFINE_bool("central", _DEFAULTS.central, "BAFFLE: central differences.")
flags.DEFINE_integer(
    "eval_every", _DEFAULTS.eval_every, "Rounds between tests."
)
flags.DEFINE_integer(
    "num_lanes", _DEFAULTS.num_lanes, "Packed lanes (epoch schedules); 0: auto."
)
# Generalized meta-FL and PersA-FL (README "Meta-FL and PersA-FL").
flags.DEFINE_integer(
    "nu", _DEFAULTS.nu, "meta_fedavg: fine-tuning steps of the meta-objective."
)
flags.DEFINE_enum(
    "meta_grad",
    _DEFAULTS.meta_grad,
    ["exact", "first_order"],
    "meta_fedavg: differentiate through the inner steps, or drop the "
    "second-order terms.",
)
flags.DEFINE_enum(
    "personalization",
    _DEFAULTS.personalization,
    ["maml", "me"],
    "persafl: MAML (one fine-tuning step) or Moreau envelope (pFedMe's solver).",
)
flags.DEFINE_integer(
    "max_staleness",
    _DEFAULTS.max_staleness,
    "persafl: bound on an update's staleness in server versions (rounds "
    "completed by every client); 0: synchronous.",
)
flags.DEFINE_float(
    "delay_spread",
    _DEFAULTS.delay_spread,
    "persafl: sigma of the log-normal noise on each computation's delay.",
)
flags.DEFINE_integer(
    "initial_batch_size",
    _DEFAULTS.initial_batch_size,
    "Simulated clock: every client's local batch size B_1 in round 1 "
    "(eq. 7 adapts it afterwards; capped at |D_i|).",
)
flags.DEFINE_integer(
    "cores_min", _DEFAULTS.cores_min, "Simulated clock: fewest client cores."
)
flags.DEFINE_integer(
    "cores_max", _DEFAULTS.cores_max, "Simulated clock: most client cores."
)
flags.DEFINE_float(
    "bandwidth_gbps_min",
    _DEFAULTS.bandwidth_gbps_min,
    "Simulated clock: client bandwidth range, log-uniform (Gbit/s).",
)
flags.DEFINE_float(
    "bandwidth_gbps_max",
    _DEFAULTS.bandwidth_gbps_max,
    "See --bandwidth_gbps_min.",
)
flags.DEFINE_float(
    "latency_ms_min",
    _DEFAULTS.latency_ms_min,
    "Simulated clock: client latency range, uniform (ms per message).",
)
flags.DEFINE_float(
    "latency_ms_max", _DEFAULTS.latency_ms_max, "See --latency_ms_min."
)
flags.DEFINE_string(
    "output_dir", None, "Where results.json goes.", required=True
)
flags.DEFINE_bool(
    "overwrite", False, "Replace an existing results.json in --output_dir."
)

FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  distributed.initialize()  # several processes when launched so (launch/)
  config = baselines_experiment.default_config()
  for name in config:
    config[name] = FLAGS[name].value
  experiment.run_experiment(config, FLAGS.output_dir)


if __name__ == "__main__":
  app.run(main)
