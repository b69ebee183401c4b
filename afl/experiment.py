"""One experiment end to end: data, federation, training, evaluation, results.

`run_experiment(config, output_dir)` is what `python -m experiments.run`
calls after parsing its flags; it is importable and testable on its own
(Flax-examples style: thin main, thick library). It writes

  output_dir/results.json   configuration, accuracy (overall and per client),
                            per-round records, times, memory;
  output_dir/params.msgpack the trained Flax params (`load_params`).

Results are written atomically (temporary file, then rename) and an existing
results.json is never overwritten unless `config.overwrite` is set.
"""

import functools
import json
import os
import pathlib
import resource
import time
from typing import Any, NamedTuple

from absl import logging
import flax.serialization
import jax
import ml_collections
import numpy as np

from afl import clock as clock_lib
from afl import data as data_lib
from afl import distributed
from afl import evaluation
from afl import fedacnnl
from afl import memory
from afl import federated
from afl import models
from afl import pfedacnnl

# algorithm -> (clustered into --num_groups groups, personalized): FedACnnL
# and the pFedACnnL family of section V-A share one code path.
ANALYTIC = {
    "fedacnnl": (False, False),
    "fedacnnl_wa": (False, False),  # without the adaptive batch size (eq. 7)
    "pfedacnnl": (True, True),
    "pfedacnnl_wc": (False, True),
    "pfedacnnl_wp": (True, False),
}
# Gradient and zeroth-order baselines, run by baselines.experiment.
BASELINES = (
    "fedavg",
    "fedzo",
    "baffle",
    "pfedme",
    "pfedzo",
    "meta_fedavg",
    "persafl",
)
ALGORITHMS = tuple(ANALYTIC) + BASELINES
FIXED_BATCH_SIZE = ("fedacnnl_wa",)


def default_config() -> ml_collections.ConfigDict:
  """Every setting of a run, with the paper's defaults (section V-A)."""
  return ml_collections.ConfigDict(
      dict(
          algorithm="fedacnnl",
          dataset="synthetic",
          model="mlp",
          width=1.0,  # DCNN width multiplier
          num_clients=100,
          partition="default",
          dirichlet_beta=0.1,
          min_client_size=10,
          test_fraction=0.25,
          synthetic_alpha=0.5,
          synthetic_beta=0.5,
          data_dir=None,
          data_source="auto",
          gamma=100.0,
          eps=2500.0,  # pFedACnnL's personalization weight (eq. 12, 13)
          num_groups=10,  # pFedACnnL's K
          statistics_dtype="float32",  # of the clients' products; see statistics
          seed=0,
          data_seed=-1,  # seed of the data split / generator; -1: `seed`
          block_size=0,  # 0: `federated.default_block_size`
          num_devices=0,  # 0: all local devices
          overwrite=False,
          # Simulated training time (afl.clock; README "Training time model")
          initial_batch_size=32,  # B_1 of Algorithm 1
          cores_min=1,
          cores_max=4,
          bandwidth_gbps_min=100.0,
          bandwidth_gbps_max=100.0,
          latency_ms_min=0.002,
          latency_ms_max=0.002,
      )
  )


def check_settings(
    config: ml_collections.ConfigDict,
    choices: dict[str, tuple] | None = None,
    positive: tuple[str, ...] = (),
    non_negative: tuple[str, ...] = (),
) -> None:
  """Raises ValueError naming the first setting out of its range."""
  for name, valid in (choices or {}).items():
    if config[name] not in valid:
      raise ValueError(f"--{name}={config[name]!r} is not one of {valid}")
  for name in positive:
    if not config[name] > 0:
      raise ValueError(f"--{name} must be > 0, got {config[name]}")
  for name in non_negative:
    if config[name] < 0:
      raise ValueError(f"--{name} must be >= 0, got {config[name]}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the setting for anything out of range."""
  check_settings(
      config,
      choices={
          "algorithm": ALGORITHMS,
          "dataset": data_lib.DATASETS,
          "model": models.MODELS,
          "partition": data_lib.PARTITIONS,
          "statistics_dtype": ("float32", "float64"),
      },
      positive=(
          "num_clients",
          "gamma",
          "eps",
          "num_groups",
          "width",
          "dirichlet_beta",
          "initial_batch_size",
          "cores_min",
          "bandwidth_gbps_min",
      ),
      non_negative=("block_size", "num_devices", "min_client_size"),
  )
  for low in ("cores", "bandwidth_gbps", "latency_ms"):
    if not 0 <= config[low + "_min"] <= config[low + "_max"]:
      raise ValueError(
          f"--{low}_min={config[low + '_min']} must be in "
          f"[0, --{low}_max={config[low + '_max']}]"
      )
  if not 0 < config.test_fraction < 1:
    raise ValueError(
        f"--test_fraction must be in (0, 1), got {config.test_fraction}"
    )
  if config.num_groups > config.num_clients:
    raise ValueError(
        f"--num_groups={config.num_groups} exceeds "
        f"--num_clients={config.num_clients}"
    )
  if config.num_devices and jax.process_count() > 1:
    raise ValueError(
        "--num_devices must be 0 (all devices) with several processes, got "
        f"{config.num_devices}"
    )
  if config.num_devices > jax.local_device_count():
    raise ValueError(
        f"--num_devices={config.num_devices} but only "
        f"{jax.local_device_count()} devices are visible"
    )


def model_inputs(model: models.LayerwiseNet, x: np.ndarray) -> np.ndarray:
  """Flattens samples for a model whose first layer is Dense.

  The model would flatten them itself; doing it once on the host keeps every
  block contiguous, which makes the client map's products faster.
  """
  if isinstance(model.stages[0].layer, models.Dense):
    return x.reshape(len(x), -1)
  return x


def prepare_output(
    config: ml_collections.ConfigDict, output_dir: str | os.PathLike
) -> tuple[pathlib.Path, pathlib.Path]:
  """(output_dir, its results.json), the folder created; raises
  FileExistsError if results.json exists unless `config.overwrite`."""
  output_dir = pathlib.Path(output_dir)
  path = output_dir / "results.json"
  if path.exists() and not config.overwrite:
    raise FileExistsError(
        f"{path} exists; choose another --output_dir or pass --overwrite"
    )
  output_dir.mkdir(parents=True, exist_ok=True)  # on every process: no race
  return output_dir, path


def _write_atomically(path: pathlib.Path, payload: bytes) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_bytes(payload)
  os.replace(tmp, path)


def save_params(path: pathlib.Path, params, client_model: np.ndarray) -> None:
  """Writes stacked Flax params and each client's model index (msgpack)."""
  _write_atomically(
      path,
      flax.serialization.msgpack_serialize(
          {
              "models": jax.tree.map(np.asarray, params),
              "client_model": np.asarray(client_model),
          }
      ),
  )


def load_params(path: str | os.PathLike, client: int = 0):
  """The params of `client`'s model from `save_params`, for `model.apply`.

  For FedACnnL every client has the global model; for pFedACnnL its own
  personalized model; for pFedACnnL-WP its group's meta-model.
  """
  saved = flax.serialization.msgpack_restore(pathlib.Path(path).read_bytes())
  index = int(saved["client_model"][client])
  return jax.tree.map(lambda a: a[index], saved["models"])


def peak_memory_gb() -> float:
  """Peak resident memory of this process so far (Linux ru_maxrss is KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def prepare_split(config: ml_collections.ConfigDict) -> data_lib.ClientSplit:
  """The clients' data for `config` (the paper's protocol, see afl.data)."""
  return data_lib.prepare(
      config.dataset,
      num_clients=config.num_clients,
      partition=config.partition,
      dirichlet_beta=config.dirichlet_beta,
      min_client_size=config.min_client_size,
      test_fraction=config.test_fraction,
      seed=config.seed if config.data_seed < 0 else config.data_seed,
      data_dir=config.data_dir,
      source=config.data_source,
      synthetic_alpha=config.synthetic_alpha,
      synthetic_beta=config.synthetic_beta,
  )


class Setup(NamedTuple):
  """Everything a run needs before training (see `setup`)."""

  model: models.LayerwiseNet
  mesh: jax.sharding.Mesh
  algorithm: fedacnnl.FedACnnL
  counts: np.ndarray  # [C, num_classes] training label counts per client
  groups: np.ndarray  # [C] pFedACnnL group (all 0 without clustering)
  grouping_s: float
  train_data: federated.FederatedData
  test_data: federated.FederatedData


# `fedacnnl.fedacnnl`, built once per configuration in a process: the runs
# that share one (Table II's four analytic columns of a seed and setting)
# reuse its compiled rounds wherever their shapes agree.
build_algorithm = functools.lru_cache(maxsize=16)(fedacnnl.fedacnnl)


def setup(
    config: ml_collections.ConfigDict, split: data_lib.ClientSplit
) -> Setup:
  """Model, mesh, algorithm, grouping (pFedACnnL stage 1) and client blocks.

  Clients are laid out by group, so that group sums merge neighbours. With
  several processes the mesh spans all their devices and each process holds
  only its own devices' client blocks (`federated.distribute`).
  """
  model = models.get_model(config.model, split.num_classes, config.width)
  x = model_inputs(model, split.x)
  if jax.process_count() > 1:
    devices = jax.devices()
  else:
    devices = jax.local_devices()[: config.num_devices or None]
  mesh = federated.client_mesh(devices)
  algorithm = build_algorithm(
      model,
      num_classes=split.num_classes,
      input_shape=x.shape[1:],
      mesh=mesh,
      gamma=config.gamma,
      encoding_seed=config.seed,
      statistics_dtype=config.statistics_dtype,
  )
  clustered, _ = ANALYTIC[config.algorithm]
  counts = data_lib.client_label_histograms(
      split.train_indices, split.y, split.num_classes
  )
  groups, grouping_s = pfedacnnl.assign_groups(
      counts, algorithm, config.num_groups if clustered else 1, config.seed
  )
  groups = distributed.same_on_all_processes(groups)
  if clustered:
    logging.info(
        "K-means grouping (eq. 8, 9) in %.3fs:\n%s",
        grouping_s,
        pfedacnnl.grouping_report(groups, counts),
    )
  train_data, test_data = (
      federated.distribute(
          x,
          split.y,
          indices,
          mesh,
          config.block_size or None,
          order=np.argsort(groups, kind="stable"),
      )
      for indices in (split.train_indices, split.test_indices)
  )
  return Setup(
      model, mesh, algorithm, counts, groups, grouping_s, train_data, test_data
  )


def make_clock(
    config: ml_collections.ConfigDict, client_sizes: np.ndarray
) -> clock_lib.Clock:
  """The simulated clock of `config` for clients of `client_sizes` training
  samples: profiles from the root seed, the cost model from this host's
  calibration, eq. 7 unless FedACnnL-WA or a baseline (fixed batches)."""
  profiles = clock_lib.draw_profiles(
      jax.random.fold_in(jax.random.key(config.seed), 1),
      config.num_clients,
      (config.cores_min, config.cores_max),
      (config.bandwidth_gbps_min, config.bandwidth_gbps_max),
      (config.latency_ms_min, config.latency_ms_max),
  )
  return clock_lib.Clock(
      profiles,
      clock_lib.CostModel(clock_lib.calibrate()),
      config.initial_batch_size,
      client_sizes,
      adaptive=config.algorithm not in FIXED_BATCH_SIZE + BASELINES,
  )


def train(
    config: ml_collections.ConfigDict,
    run: Setup,
    clock: clock_lib.Clock | None = None,
) -> pfedacnnl.PFedACnnLResult:
  """Trains `config.algorithm` (FedACnnL or a pFedACnnL variant), timing
  its federated rounds on `clock` if given."""
  _, personalized = ANALYTIC[config.algorithm]
  on_round = clock and clock_lib.analytic_round_hook(
      clock,
      run.model,
      run.train_data.x.shape[2:],
      int(run.counts.shape[1]),
      config.statistics_dtype,
      run.train_data.client_sizes(),
  )
  return pfedacnnl.train(
      run.algorithm,
      run.train_data,
      jax.random.fold_in(jax.random.key(config.seed), 0),
      run.groups,
      eps=config.eps,
      personalized=personalized,
      grouping_s=run.grouping_s,
      on_round=on_round,
  )


def run_experiment(
    config: ml_collections.ConfigDict,
    output_dir: str | os.PathLike,
    split: data_lib.ClientSplit | None = None,
) -> dict[str, Any]:
  """Runs one configuration and writes its results; returns them too.

  Args:
    config: see `default_config`.
    output_dir: where results.json and params.msgpack go.
    split: the prepared data for `config`, to share it across runs (e.g.
      several algorithms on one seed); None prepares it.
  """
  if config.algorithm in BASELINES:
    # Imported here: baselines builds on this module.
    from baselines import experiment as baselines_experiment  # pylint: disable=g-import-not-at-top

    return baselines_experiment.run_experiment(config, output_dir, split)
  validate(config)
  output_dir, results_path = prepare_output(config, output_dir)

  start = time.perf_counter()
  split = split or prepare_split(config)
  logging.info(
      "%s over %d clients:\n%s",
      config.dataset,
      config.num_clients,
      data_lib.summarize(split.train_indices, split.y, split.num_classes),
  )
  run = setup(config, split)
  data_time = time.perf_counter() - start - run.grouping_s
  logging.info(
      "data ready in %.2fs: %d train blocks of %d rows on %d " "device(s)",
      data_time,
      run.train_data.num_blocks,
      run.train_data.block_size,
      run.mesh.size,
  )
  clustered, personalized = ANALYTIC[config.algorithm]
  expected = memory.estimate(
      run.model,
      run.train_data.x.shape[2:],
      num_blocks=run.train_data.num_blocks,
      block_size=run.train_data.block_size,
      num_devices=len(run.mesh.local_devices),
      num_groups=config.num_groups if clustered else 1,
      personalized=personalized,
      mesh_size=run.mesh.size,
  )
  logging.info("%s (see afl/memory.py)", expected.describe())
  clock = make_clock(config, run.train_data.client_sizes())
  trained = train(config, run, clock)
  model, mesh, groups, counts = run.model, run.mesh, run.groups, run.counts
  train_data, test_data = run.train_data, run.test_data

  start = time.perf_counter()
  accuracy = evaluation.evaluate(
      model.apply, trained.params, test_data, mesh, trained.client_model
  )
  eval_time = time.perf_counter() - start
  logging.info(
      "%s: overall test accuracy %.4f (%d / %d); training %.3fs + "
      "compile %.3fs",
      config.algorithm,
      accuracy.overall,
      accuracy.correct.sum(),
      accuracy.count.sum(),
      trained.wall_time_s,
      trained.compile_time_s,
  )

  results = {
      "algorithm": config.algorithm,
      "dataset": config.dataset,
      "model": config.model,
      "num_clients": config.num_clients,
      "seed": config.seed,
      "accuracy": accuracy.overall,
      "per_client_accuracy": [
          None if np.isnan(a) else float(a) for a in accuracy.per_client
      ],
      "per_client_test_samples": accuracy.count.tolist(),
      "per_client_train_samples": [len(i) for i in split.train_indices],
      "client_group": groups.tolist(),
      "group_sizes": np.bincount(groups).tolist(),
      "group_label_histograms": [
          counts[groups == k].sum(0).tolist() for k in range(groups.max() + 1)
      ],
      "rounds": trained.rounds,
      "timing": clock.summary(),
      "wall_time_s": trained.wall_time_s,
      "compile_time_s": trained.compile_time_s,
      "grouping_time_s": run.grouping_s,
      "data_time_s": data_time,
      "eval_time_s": eval_time,
      "peak_memory_gb": peak_memory_gb(),
      "expected_peak_memory_gb": expected.peak / memory.GIB,
      "num_devices": mesh.size,
      "num_processes": jax.process_count(),
      "block_size": train_data.block_size,
      "params_file": "params.msgpack",
      "jax_version": jax.__version__,
      "config": config.to_dict(),
  }
  if distributed.is_main_process():  # the params are on every process
    save_params(
        output_dir / "params.msgpack", trained.params, trained.client_model
    )
    _write_atomically(
        results_path, json.dumps(results, indent=2).encode("utf-8")
    )
    logging.info("wrote %s", results_path)
  return results
