"""The configuration of a run: common settings plus the algorithm's own.

A run's config is one `ml_collections.ConfigDict`:

  config.algorithm, config.dataset, config.num_clients, ...   (`COMMON`)
  config[config.algorithm]   the algorithm's settings, e.g. config.pfedme.lr

Every setting is declared once, as a `registry.Field`: the common ones here,
the algorithms' by the modules that register them. `get_config` builds a
complete config from flat settings (what the command line gives:
`get_config(algorithm="pfedme", lr=0.01)`) with the registered defaults (the
papers' hyperparameters, by dataset); `experiments/run.py` generates its
flags from the same declarations. A setting that the chosen algorithm does
not read is refused, naming it, as is a data setting that the chosen data
does not use (`--min_client_size` with the synthetic generator's own
clients). `validate` checks a config built by hand the same way.
"""

import json
import pathlib
import runpy
from typing import Any

import ml_collections

from afl import catalog
from afl import registry
from afl.data import files
from afl.data import pipeline

Field = registry.Field

COMMON = {
    "algorithm": Field(
        str, "Algorithm (see --help's list).", default="fedacnnl"
    ),
    "dataset": Field(
        str, "Dataset.", choices=pipeline.DATASETS, default="synthetic"
    ),
    "model": Field(
        str,
        "lr: multinomial logistic regression; mlp: [128, 64] ReLU; dcnn: the "
        "paper's conv net (see --width).",
        choices=catalog.MODELS,
        default="mlp",
    ),
    "width": registry.positive(float, "DCNN width multiplier.", default=1.0),
    "num_clients": Field(int, "Clients C.", minimum=1, default=100),
    "partition": Field(
        str,
        "Client split: default is dirichlet for mnist/cifar10/npz and the "
        "generator's power-law clients for synthetic (--split_file: given).",
        choices=pipeline.PARTITIONS,
        default="default",
    ),
    "dirichlet_beta": registry.positive(
        float,
        "Dirichlet concentration (smaller: more heterogeneous).",
        default=0.1,
    ),
    "min_client_size": Field(
        int,
        "Least samples per client (dirichlet, power_law).",
        minimum=1,
        default=10,
    ),
    "test_fraction": Field(
        float,
        "Share of each client's samples held out for testing, in (0, 1).",
        minimum=0,
        open_minimum=True,
        maximum=1,
        open_maximum=True,
        default=0.25,
    ),
    "synthetic_alpha": registry.non_negative(
        float,
        "alpha of synthetic(alpha, beta).",
        default=0.5,
    ),
    "synthetic_beta": registry.non_negative(
        float,
        "beta of synthetic(alpha, beta).",
        default=0.5,
    ),
    "data_dir": Field(
        str,
        "Folder with mnist/ or the cifar10 files; default: $AFL_DATA_DIR, "
        "then ~/.cache/afl/data.",
        default=None,
    ),
    "data_file": Field(
        str,
        "--dataset=npz: an .npz with x [N, ...] (float or uint8) and y [N] "
        "integer labels (afl/data/files.py).",
        default=None,
    ),
    "split_file": Field(
        str,
        "An .npz of the clients' train_indices, train_offsets, test_indices, "
        "test_offsets into the pooled data (a run's split.npz); replaces "
        "--partition, sets --num_clients.",
        default=None,
    ),
    "data_source": Field(
        str,
        "Where mnist/cifar10 come from.",
        choices=("auto", "files", "tfds"),
        default="auto",
    ),
    "seed": registry.non_negative(
        int,
        "Root seed: data split, label encodings, K-means, every key.",
        default=0,
    ),
    "data_seed": Field(
        int,
        "Seed of the data (split, synthetic generator) alone; -1: --seed.",
        minimum=-1,
        default=-1,
    ),
    "block_size": registry.non_negative(
        int,
        "Samples per client block; 0 picks one from N and C.",
        default=0,
    ),
    "num_devices": registry.non_negative(
        int,
        "Local devices to shard clients over; 0: all.",
        default=0,
    ),
    "eval_every": Field(
        int,
        "Rounds between tests (the last round is always tested; the analytic "
        "algorithms have a model to test only after their last round).",
        minimum=1,
        default=1,
    ),
    "cores_min": Field(
        int, "Simulated clock: fewest client cores.", minimum=1, default=1
    ),
    "cores_max": Field(
        int, "Simulated clock: most client cores.", minimum=1, default=4
    ),
    "bandwidth_gbps_min": registry.positive(
        float,
        "Simulated clock: client bandwidth range, log-uniform (Gbit/s).",
        default=100.0,
    ),
    "bandwidth_gbps_max": registry.positive(
        float, "See --bandwidth_gbps_min.", default=100.0
    ),
    "latency_ms_min": registry.non_negative(
        float,
        "Simulated clock: client latency range, uniform (ms/message).",
        default=0.002,
    ),
    "latency_ms_max": registry.non_negative(
        float, "See --latency_ms_min.", default=0.002
    ),
    "clients_per_round": registry.non_negative(
        float,
        "Clients sampled per round (seeded): a whole number m, or a fraction "
        "in (0, 1) of --num_clients; 0: every client (afl/participation.py).",
        default=0.0,
    ),
    "dropout": Field(
        float,
        "Probability that a sampled client's upload never arrives (seeded per "
        "round and client).",
        minimum=0,
        maximum=1,
        open_maximum=True,
        default=0.0,
    ),
    "deadline_s": registry.non_negative(
        float,
        "Simulated clock: the server closes a round this many seconds after "
        "opening it and drops later uploads; 0: it waits for all.",
        default=0.0,
    ),
    "participation_file": Field(
        str,
        "A [rounds, clients] matrix (.npy or text) of 0 (sits out), 1 "
        "(reports), 2 (drops out) replacing --clients_per_round/--dropout.",
        default=None,
    ),
    "checkpoint_every": registry.non_negative(
        int,
        "Rounds between checkpoints of a run in progress (a rerun resumes "
        "from the last); 0: every --checkpoint_seconds.",
        default=0,
    ),
    "checkpoint_seconds": registry.positive(
        float,
        "With --checkpoint_every=0: seconds between checkpoints.",
        default=60.0,
    ),
    "overwrite": Field(
        bool,
        "Replace an existing results.json (or a run in progress) in the "
        "output folder.",
        default=False,
    ),
}

DEFAULTS = {name: field.default for name, field in COMMON.items()}
# Settings that do not change what a run computes: a saved run is reused
# (`runtime.run_or_reuse`) whatever they were.
NOT_RESULTS = (
    "overwrite",
    "data_dir",
    "checkpoint_every",
    "checkpoint_seconds",
)


def _partition(config) -> str:
  """The partition the data pipeline uses for `config`."""
  if config.partition != "default":
    return config.partition
  return "generator" if config.dataset == "synthetic" else "dirichlet"


# Data settings that only some data use: setting -> (does config use it,
# what to say when not).
_DATA_USES = {
    "width": (lambda c: c.model == "dcnn", "--model=dcnn"),
    "dirichlet_beta": (
        lambda c: _partition(c) == "dirichlet",
        "the dirichlet partition",
    ),
    "min_client_size": (
        lambda c: _partition(c) in ("dirichlet", "power_law"),
        "the dirichlet and power_law partitions (the synthetic generator "
        "draws its own client sizes)",
    ),
    "synthetic_alpha": (lambda c: c.dataset == "synthetic", "synthetic data"),
    "synthetic_beta": (lambda c: c.dataset == "synthetic", "synthetic data"),
    "data_source": (
        lambda c: c.dataset in ("mnist", "cifar10"),
        "mnist and cifar10",
    ),
    "data_file": (lambda c: c.dataset == "npz", "--dataset=npz"),
}
# Settings that a --split_file replaces.
SPLIT_REPLACES = (
    "partition",
    "dirichlet_beta",
    "min_client_size",
    "test_fraction",
)


def get_config(**settings) -> ml_collections.ConfigDict:
  """A complete config from flat settings (as the command line gives them).

  Settings not given take their defaults: the common ones `DEFAULTS`, the
  algorithm's its registered defaults for the dataset. Raises ValueError for
  an unknown setting, or one the algorithm or the data do not use.
  """
  fields = dict(registry.fields(), **COMMON)
  settings = {
      k: fields[k].coerce(v) if k in fields else v for k, v in settings.items()
  }
  common = {k: settings.pop(k) for k in list(settings) if k in COMMON}
  if common.get("split_file") and "num_clients" not in common:
    common["num_clients"] = files.num_clients_of(common["split_file"])
  config = ml_collections.ConfigDict(dict(DEFAULTS, **common))
  entry = registry.get(config.algorithm)
  own = registry.settings_of(entry.name)
  for name in settings:
    if name in own:
      continue
    if name in registry.fields():
      raise ValueError(
          f"--{name} does not apply to --algorithm={entry.name} (its "
          f"settings: {', '.join(own) or 'none'})"
      )
    raise ValueError(
        f"unknown setting --{name} (the baselines' settings are declared by "
        "`import baselines`)"
    )
  hparams = dict(entry.defaults(config.dataset, settings), **settings)
  config[entry.name] = ml_collections.ConfigDict(hparams)
  validate(config)
  return config


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first setting out of its range, unknown,
  or set for what the run does not use."""
  entry = registry.get(config.get("algorithm"))
  own = registry.settings_of(entry.name)
  for name in config:
    if name == entry.name:
      continue
    if name in registry.names():
      raise ValueError(
          f"config.{name} holds settings of --algorithm={name}, but the run "
          f"is --algorithm={entry.name}"
      )
    if name not in COMMON:
      raise ValueError(f"unknown setting --{name}")
  for name, field in COMMON.items():
    if name not in config:
      raise ValueError(f"the config has no --{name}")
    if config[name] is not None:
      field.check(name, config[name])
  hparams = config.get(entry.name)
  if hparams is None:
    raise ValueError(f"the config has no config.{entry.name} settings")
  fields = registry.fields()
  for name in hparams:
    if name not in own:
      raise ValueError(
          f"--{name} does not apply to --algorithm={entry.name} (its "
          f"settings: {', '.join(own) or 'none'})"
      )
    fields[name].check(name, hparams[name])
  missing = set(own) - set(hparams)
  if missing:
    raise ValueError(f"config.{entry.name} lacks {sorted(missing)}")
  for name, (uses, what) in _DATA_USES.items():
    if config[name] != DEFAULTS[name] and not uses(config):
      raise ValueError(
          f"--{name}={config[name]} is used only by {what}, not by "
          f"--dataset={config.dataset} --partition={config.partition} "
          f"--model={config.model}"
      )
  _validate_data_files(config)
  for low in ("cores", "bandwidth_gbps", "latency_ms"):
    if config[low + "_min"] > config[low + "_max"]:
      raise ValueError(
          f"--{low}_min={config[low + '_min']} exceeds "
          f"--{low}_max={config[low + '_max']}"
      )
  if entry.validate is not None:
    entry.validate(hparams, config)


def _validate_data_files(config: ml_collections.ConfigDict) -> None:
  """--dataset=npz needs --data_file; --split_file replaces the partition
  settings and fixes --num_clients."""
  if config.dataset == "npz" and not config.data_file:
    raise ValueError("--dataset=npz needs --data_file=PATH (an .npz of x, y)")
  if not config.split_file:
    return
  for name in SPLIT_REPLACES:
    if config[name] != DEFAULTS[name]:
      raise ValueError(
          f"--{name}={config[name]} does not apply with --split_file, which "
          "holds the clients' train and test samples"
      )
  clients = files.num_clients_of(config.split_file)
  if config.num_clients != clients:
    raise ValueError(
        f"--num_clients={config.num_clients} but --split_file="
        f"{config.split_file} holds {clients} clients"
    )


def load_file(path: str | pathlib.Path) -> dict[str, Any]:
  """Flat settings from a config file: a .py file's `get_config()` (a dict
  or ConfigDict), or JSON (a config, or a results.json whose "config" it
  takes). The algorithm's sub-config is flattened."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ValueError(f"--config={path}: no such file")
  if path.suffix == ".py":
    loaded = runpy.run_path(str(path)).get("get_config")
    if loaded is None:
      raise ValueError(f"--config={path} defines no get_config()")
    value = loaded()
    value = value.to_dict() if hasattr(value, "to_dict") else dict(value)
  else:
    try:
      value = json.loads(path.read_text())
    except json.JSONDecodeError as error:
      raise ValueError(f"--config={path} is not JSON: {error}") from None
    value = value.get("config", value)
  flat = {k: v for k, v in value.items() if not isinstance(v, dict)}
  for nested in (v for v in value.values() if isinstance(v, dict)):
    flat.update(nested)
  return flat


# Options added after runs were saved: (switch, its value when off, the
# settings it governs). Privacy (`afl.privacy`) and the secure sum
# (`afl.secure_sum`).
ADDED_OPTIONS = (
    ("dp_mode", "off", tuple(catalog.PRIVACY_FIELDS)),
    ("secure_sum", False, tuple(catalog.SECURE_SUM_OFF)),
)


def differences(saved: dict, wanted: dict) -> list[str]:
  """The settings whose values differ between two config dicts (nested
  like `config.to_dict()`), as "name: saved -> wanted", ignoring
  NOT_RESULTS."""

  def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
      if isinstance(v, dict):
        out.update(flat(v, f"{prefix}{k}."))
      elif k not in NOT_RESULTS:
        out[prefix + k] = v
    return out

  a, b = flat(saved), flat(wanted)
  # A run saved before a switched-off option existed ran without it: it is
  # the run of that option off (whose other settings, the validators make
  # sure, are then their defaults).
  for switch, off, fields in ADDED_OPTIONS:
    if all(v == off for k, v in b.items() if k.endswith(f".{switch}")):
      for k in set(b) - set(a):
        if k.rsplit(".", 1)[-1] in fields:
          a[k] = b[k]
  return [
      f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}"
      for k in sorted(set(a) | set(b))
      if a.get(k, "(unset)") != b.get(k, "(unset)")
  ]
