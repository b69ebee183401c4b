"""The one run loop: every algorithm, from its config to results.json.

`train_and_evaluate(config, output_dir)` is what `python -m experiments.run`
calls after parsing its flags (Flax-examples style: thin main, thick
library):

  1. checks the config (`afl.config.validate`) and the output folder, before
     any work;
  2. prepares the data (`afl.data`) and the `Federation`: a mesh over the
     devices of every process (`distributed`; one process is the case of
     one), the clients' blocks on it, their simulated hardware;
  3. builds the algorithm from the registry (`afl.registry`) and runs its
     rounds: one root key (`afl.rng`), the simulated clock
     (`afl.clock`) fed by the algorithm's `work`, a test every
     `eval_every` rounds and after the last (`afl.evaluation`), a stop when
     the local loss diverges, the compile time kept apart from the run
     time, one progress line per round;
  4. saves checkpoints while it goes (`afl.checkpoints`; a rerun into the
     same folder resumes from the last one) and writes results.json and the
     params on process 0 as one unit (`afl.results`).

`accuracy` is the best overall test accuracy over the tested rounds (the
paper's protocol for the iterative methods; the analytic ones are tested
once, after their last round), next to `last_accuracy` and the accuracy of
every tested round. Progress goes to standard output whether or not absl
logging is set up, so a notebook shows the same lines as a terminal
(`progress=False` silences them).

`run_or_reuse` is the studies' way to run a configuration once: a saved run
is read back only if its whole configuration equals the requested one.
"""

import hashlib
import json
import math
import os
import pathlib
import time
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from afl import algorithm as algorithm_lib
from afl import checkpoints as checkpoints_lib
from afl import clock as clock_lib
from afl import config as config_lib
from afl import data as data_lib
from afl import distributed
from afl import evaluation
from afl import federated
from afl import models
from afl import participation as participation_lib
from afl import registry
from afl import results as results_lib
from afl import rng
from afl import timing


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
      data_file=config.data_file,
      split_file=config.split_file,
  )


def _mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """All devices of all processes, or the first --num_devices local ones."""
  if jax.process_count() > 1:
    if config.num_devices:
      raise ValueError(
          "--num_devices must be 0 (all devices) with several processes, "
          f"got {config.num_devices}"
      )
    return federated.client_mesh(jax.devices())
  if config.num_devices > jax.local_device_count():
    raise ValueError(
        f"--num_devices={config.num_devices} but only "
        f"{jax.local_device_count()} devices are visible"
    )
  return federated.client_mesh(
      jax.local_devices()[: config.num_devices or None]
  )


def federation(
    config: ml_collections.ConfigDict,
    split: data_lib.ClientSplit | None = None,
    model: models.LayerwiseNet | None = None,
) -> algorithm_lib.Federation:
  """The `Federation` of `config` (on `split` and `model` if given, else its
  data and its named model)."""
  mesh = _mesh(config)
  split = split or prepare_split(config)
  if len(split.train_indices) != config.num_clients:
    raise ValueError(
        f"the split has {len(split.train_indices)} clients, --num_clients="
        f"{config.num_clients}"
    )
  data_lib.check_finite(split)  # a split built by hand, too
  model = model or models.get_model(
      config.model, split.num_classes, config.width
  )
  profiles = clock_lib.draw_profiles(
      rng.stream(jax.random.key(config.seed), "clock"),
      config.num_clients,
      (config.cores_min, config.cores_max),
      (config.bandwidth_gbps_min, config.bandwidth_gbps_max),
      (config.latency_ms_min, config.latency_ms_max),
  )
  return algorithm_lib.Federation(
      split,
      model,
      mesh,
      config.seed,
      config.block_size or None,
      profiles,
      clock_lib.CostModel(clock_lib.calibrate()),
  )


def build(
    config: ml_collections.ConfigDict, fed: algorithm_lib.Federation
) -> algorithm_lib.Algorithm:
  """The registered algorithm of `config` over `fed`."""
  return registry.builder(config.algorithm)(config[config.algorithm], fed)


class Progress:
  """One line per round on standard output (process 0), if `enabled`."""

  def __init__(self, enabled: bool):
    self.enabled = enabled and distributed.is_main_process()

  def __call__(self, text: str) -> None:
    if self.enabled:
      print(text, flush=True)


def _describe(record: dict, num_rounds: int) -> str:
  """A round's record as one line."""
  skip = ("round", "seconds", "compile_s", "timing")
  parts = []
  for name, value in record.items():
    if name in skip or isinstance(value, (list, dict)) or value is None:
      continue
    if isinstance(value, float):
      value = f"{value:.4f}" if 1e-3 <= abs(value) < 1e4 else f"{value:.4g}"
    parts.append(f"{name} {value}")
  return (
      f"round {record['round']}/{num_rounds}: {', '.join(parts)}; "
      f"{record['seconds']:.3f}s (+{record['compile_s']:.1f}s compile)"
  )


def _per_client(values: np.ndarray) -> list:
  return [None if np.isnan(v) else float(v) for v in values]


class Resume(NamedTuple):
  """Where a run resumes: after round `index`, with the algorithm's state
  and the loop's records and times so far (`afl.checkpoints`)."""

  index: int
  state: Any
  records: list
  best: tuple[float, int]
  wall_time_s: float
  compile_time_s: float
  eval_time_s: float


def run_rounds(
    algorithm: algorithm_lib.Algorithm,
    key: jax.Array,
    *,
    clock: clock_lib.Clock | None = None,
    evaluate=None,
    eval_every: int = 1,
    progress=None,
    resume: Resume | None = None,
    after_round=None,
    plan: participation_lib.Plan | None = None,
) -> dict[str, Any]:
  """Runs the algorithm's rounds from the root key.

  Args:
    algorithm: the algorithm.
    key: the root key (`rng` streams "init", "rounds", "evaluation").
    clock: the simulated clock that the algorithm's `work` goes to, if any.
    evaluate: Tested -> (evaluation.Accuracy, {metric: value}) for the
      tested rounds, or None.
    eval_every: rounds between tests; the last round is always tested
      (and the only one asked for its models without `evaluate`).
    progress: a line per round goes to it, if given.
    resume: go on after a checkpoint's round instead of from `init`.
    after_round: (index, state, Resume of the loop so far) -> None, called
      after every round but the last and a diverged one (checkpoints).
    plan: who is sampled and drops out in the rounds with uploads
      (`afl.participation`), or None: every client; the clock marks those
      past its deadline. The round's record gets the counts and ids.

  Returns:
    dict: the final state, the round records, best (accuracy, round), the
    last Accuracy, the last models tested (`Tested`), whether and when the
    run diverged, and the times.
  """
  last, tested, diverged = None, None, False
  with timing.CompileClock() as compile_clock:
    if resume is None:
      start = time.perf_counter()
      state = jax.block_until_ready(algorithm.init(rng.stream(key, "init")))
      init_s = time.perf_counter() - start - compile_clock.seconds
      resume = Resume(0, state, [], (-1.0, 0), init_s, 0.0, 0.0)
    state, records, best = resume.state, list(resume.records), resume.best
    train_time, eval_time = resume.wall_time_s, resume.eval_time_s
    compiled_before = resume.compile_time_s
    for index in range(resume.index + 1, algorithm.num_rounds + 1):
      who, timed = _participation(algorithm, index, clock, plan)
      partial = None if who is None or who.reported.all() else who
      round_start, compile_before = time.perf_counter(), compile_clock.seconds
      state, metrics = algorithm.round(
          state, index, rng.round_key(key, index), partial
      )
      state = jax.block_until_ready(state)
      compile_s = compile_clock.seconds - compile_before
      record = {
          "round": index,
          **metrics,
          **(who.record() if who is not None else {}),
          "seconds": time.perf_counter() - round_start - compile_s,
          "compile_s": compile_s,
      }
      train_time += record["seconds"]
      if timed is not None:
        record["timing"] = timed
      diverged = not math.isfinite(metrics.get("local_loss", 0.0))
      final = index == algorithm.num_rounds or diverged
      if (evaluate is not None and index % eval_every == 0) or final:
        eval_start = time.perf_counter()
        models = algorithm.models(
            state, jax.random.fold_in(rng.stream(key, "evaluation"), index)
        )
        if models is not None:
          tested = models
          if evaluate is not None:
            last, extra = evaluate(models)
            record.update(accuracy=last.overall, **extra)
            if last.overall > best[0]:
              best = (last.overall, index)
        eval_time += time.perf_counter() - eval_start
      records.append(record)
      if progress:
        progress(_describe(record, algorithm.num_rounds))
      if diverged:
        if progress:
          progress(f"round {index}: the local loss diverged; stopping")
        break
      if after_round is not None and not final:
        after_round(
            index,
            state,
            Resume(
                index,
                None,
                records,
                best,
                train_time,
                compiled_before + compile_clock.seconds,
                eval_time,
            ),
        )
  return dict(
      state=state,
      records=records,
      best=best,
      last=last,
      tested=tested,
      diverged_round=records[-1]["round"] if diverged else None,
      wall_time_s=train_time,
      compile_time_s=compiled_before + compile_clock.seconds,
      eval_time_s=eval_time,
  )


def _participation(algorithm, index, clock, plan):
  """(round `index`'s Participation or None, the clock's record or None):
  the plan's draw for a round with uploads, with the clock's late clients
  when the round is on the clock."""
  uploads = index <= (algorithm.upload_rounds or algorithm.num_rounds)
  who = plan.draw(index) if plan is not None and uploads else None
  work = clock and algorithm.work and algorithm.work(index, clock.batch_size)
  if not work:
    return who, None
  timed, marked = clock.round(work, who)
  if who is not None or clock.deadline_s:
    who = marked
  return who, timed


def participation_plan(
    config: ml_collections.ConfigDict,
    fed: algorithm_lib.Federation,
    algorithm: algorithm_lib.Algorithm,
) -> participation_lib.Plan | None:
  """The run's `participation.Plan` (None: every client reports), checked
  against the algorithm; ValueError naming the setting."""
  partial = {
      name: config[name]
      for name in (
          "clients_per_round",
          "dropout",
          "participation_file",
          "deadline_s",
      )
      if config[name]
  }
  if not partial:
    return None
  if algorithm.work is None:
    raise ValueError(
        f"--{next(iter(partial))} needs a synchronous algorithm whose rounds "
        f"are on the simulated clock; --algorithm={config.algorithm} keeps "
        "its own (asynchronous) clock"
    )
  if set(partial) == {"deadline_s"}:
    return None
  schedule = None
  if config.participation_file:
    schedule = participation_lib.load_schedule(
        config.participation_file, fed.num_clients
    )
  plan = participation_lib.Plan(
      fed.key,
      fed.num_clients,
      config.clients_per_round,
      config.dropout,
      schedule,
  )
  plan.check_rounds(algorithm.upload_rounds or algorithm.num_rounds)
  return plan


def evaluator(
    fed: algorithm_lib.Federation, algorithm: algorithm_lib.Algorithm
):
  """Tested -> (test Accuracy, {"train_loss": ..} if the algorithm wants
  it) on the federation's blocks."""
  test_blocks = fed.blocks("test")
  train_blocks = algorithm.train_loss and fed.blocks("train", algorithm.layout)

  def evaluate(tested: algorithm_lib.Tested):
    apply_fn, mesh = (algorithm.model or fed.model).apply, fed.mesh
    accuracy = evaluation.evaluate(
        apply_fn, tested.params, test_blocks, mesh, tested.client_model
    )
    extra = {}
    if train_blocks:
      extra["train_loss"] = evaluation.mean_loss(
          apply_fn, tested.params, train_blocks, mesh, tested.client_model
      )
    return accuracy, extra

  return evaluate


class Run(NamedTuple):
  """A run set up and ready for its rounds (`prepare`)."""

  config: ml_collections.ConfigDict
  output_dir: pathlib.Path
  fed: algorithm_lib.Federation
  algorithm: algorithm_lib.Algorithm
  clock: clock_lib.Clock | None
  plan: participation_lib.Plan | None
  checkpoints: checkpoints_lib.Checkpoints
  resume: Resume | None
  data_time_s: float
  custom_model: models.LayerwiseNet | None = None


def _check_checkpoints(
    config: ml_collections.ConfigDict, saved: checkpoints_lib.Checkpoints
) -> int | None:
  """The round to resume after, if output_dir holds a run in progress of
  this config; ValueError naming the settings if of another (unless
  --overwrite, which starts afresh)."""
  latest = saved.latest()
  if latest is None or config.overwrite:
    return None
  differ = config_lib.differences(
      saved.meta(latest)["config"], config.to_dict()
  )
  if differ:
    raise ValueError(
        f"{saved.path} holds a run in progress of other settings "
        f"({'; '.join(differ)}): pass --overwrite to start afresh or choose "
        "another --output_dir"
    )
  return latest


def prepare(
    config: ml_collections.ConfigDict,
    output_dir: str | os.PathLike,
    split: data_lib.ClientSplit | None = None,
    model: models.LayerwiseNet | None = None,
) -> Run:
  """Checks the config and the output folder, prepares the data, builds the
  algorithm and the clock, and restores the last checkpoint of a run in
  progress there. Writes nothing; raises ValueError (a setting, the data:
  `afl.data.DataError`) or FileExistsError (a finished run is there)."""
  config_lib.validate(config)
  results_lib.check_output(output_dir, config.overwrite)
  results_lib.reset_peak_memory()  # results.json's peak is this run's
  saved = checkpoints_lib.Checkpoints(output_dir)
  latest = _check_checkpoints(config, saved)
  start = time.perf_counter()
  fed = federation(config, split, model)
  algorithm = build(config, fed)
  clock = None
  if algorithm.work is not None:
    clock = clock_lib.Clock(
        fed.profiles,
        fed.cost_model,
        config[config.algorithm].get("initial_batch_size", 1),
        fed.client_sizes,
        adaptive=algorithm.adaptive_batch_size,
        deadline_s=config.deadline_s,
    )
  plan = participation_plan(config, fed, algorithm)
  resume = None
  if latest is not None:
    state, meta = saved.restore(latest, fed.replicated)
    if clock is not None:
      clock.load_state(meta["clock"])
    resume = Resume(
        latest,
        state,
        meta["records"],
        tuple(meta["best"]),
        meta["wall_time_s"],
        meta["compile_time_s"],
        meta["eval_time_s"],
    )
  return Run(
      config,
      pathlib.Path(output_dir),
      fed,
      algorithm,
      clock,
      plan,
      saved,
      resume,
      time.perf_counter() - start,
      model,
  )


def _checkpointer(run: Run):
  """after_round for `run_rounds`: a checkpoint every --checkpoint_every
  rounds, or (0) once --checkpoint_seconds have passed since the last; the
  decision is process 0's, so that every process saves together."""
  config, saved, clock = run.config, run.checkpoints, run.clock
  last = [time.monotonic()]
  spent = {"checkpoint_time_s": 0.0, "checkpoints": 0, "checkpoint_bytes": 0}

  def after_round(index, state, loop: Resume):
    if config.checkpoint_every:
      due = index % config.checkpoint_every == 0
    else:
      due = time.monotonic() - last[0] >= config.checkpoint_seconds
    if not distributed.same_on_all_processes(np.asarray(due)):
      return
    began = time.perf_counter()
    saved.save(
        index,
        state,
        {
            "config": config.to_dict(),
            "records": loop.records,
            "best": list(loop.best),
            "wall_time_s": loop.wall_time_s,
            "compile_time_s": loop.compile_time_s,
            "eval_time_s": loop.eval_time_s,
            "clock": clock.state_dict() if clock else None,
        },
    )
    spent["checkpoint_time_s"] += time.perf_counter() - began
    spent["checkpoints"] += 1
    spent["checkpoint_bytes"] = saved.size_bytes(index)
    last[0] = time.monotonic()

  return after_round, spent


SPLIT_FILE = "split.npz"  # a run folder's split (afl/data/files.py)


def _data_summary(split: data_lib.ClientSplit) -> dict:
  """results.json's "data": where the samples came from (file names and
  checksums), or, for a split built by hand, its arrays' checksum; and the
  run folder's copy of the split."""
  if split.origin is not None:
    data = dict(split.origin)
  else:
    digest = hashlib.sha256()
    for a in (split.x, split.y, *split.train_indices, *split.test_indices):
      digest.update(np.ascontiguousarray(a).tobytes())
    data = {
        "dataset": split.name,
        "source": "a ClientSplit given to the Python API (the config's data "
        "settings were not used)",
        "arrays_sha256": digest.hexdigest(),
        "num_samples": len(split.y),
    }
  return dict(
      data,
      input_shape=list(split.x.shape[1:]),
      num_classes=split.num_classes,
      split_written=SPLIT_FILE,
  )


def _participation_summary(config, fed, records) -> dict | None:
  """results.json's "participation": the settings, and per client the
  rounds it was sampled in and reported in (None if everyone always
  reports)."""
  rounds = [r["participation"] for r in records if "participation" in r]
  if not rounds:
    return None
  sampled, reported = np.zeros((2, fed.num_clients), np.int64)
  for ids in rounds:
    sampled[ids["sampled"]] += 1
    reported[ids["sampled"]] += 1
    reported[ids["dropped"] + ids["late"]] -= 1
  return {
      "clients_per_round": config.clients_per_round,
      "dropout": config.dropout,
      "deadline_s": config.deadline_s,
      "participation_file": config.participation_file,
      "rounds_with_uploads": len(rounds),
      "sampled_per_client": sampled.tolist(),
      "reported_per_client": reported.tolist(),
      "never_reported": np.flatnonzero(reported == 0).tolist(),
  }


def execute(run: Run, progress: bool = True) -> dict[str, Any]:
  """Runs the prepared run's rounds (from its checkpoint, if any) and writes
  its results; returns them too."""
  config, fed, algorithm, clock = run.config, run.fed, run.algorithm, run.clock
  say = Progress(progress)
  if config.overwrite and run.resume is None:
    run.checkpoints.remove()  # a run in progress there starts afresh
  say(
      f"{config.algorithm} on {config.dataset}-{config.model}: "
      f"{config.num_clients} clients on {fed.mesh.size} device(s) of "
      f"{jax.process_count()} process(es), {algorithm.num_rounds} rounds; "
      f"set up in {run.data_time_s:.2f}s"
  )
  if run.resume is not None:
    say(
        f"resuming after round {run.resume.index} from the checkpoint in "
        f"{run.checkpoints.path}"
    )
  after_round, checkpointing = _checkpointer(run)
  out = run_rounds(
      algorithm,
      fed.key,
      clock=clock,
      evaluate=evaluator(fed, algorithm),
      eval_every=config.eval_every,
      progress=say,
      resume=run.resume,
      after_round=after_round,
      plan=run.plan,
  )
  best, last = out["best"], out["last"]
  diverged = out["diverged_round"]
  results = {
      "algorithm": config.algorithm,
      "status": "completed" if diverged is None else "diverged",
      "diverged_round": diverged,
      "dataset": fed.split.name,
      "model": config.model if run.custom_model is None else "custom",
      "model_spec": repr(algorithm.model or fed.model),
      "data": _data_summary(fed.split),
      "num_clients": config.num_clients,
      "seed": config.seed,
      "accuracy": last.overall if algorithm.reports_final else best[0],
      "best_accuracy": best[0],
      "best_round": best[1],
      "last_accuracy": last.overall,
      "accuracy_per_round": [r.get("accuracy") for r in out["records"]],
      "train_loss_per_round": [r.get("train_loss") for r in out["records"]],
      "per_client_accuracy": _per_client(last.per_client),
      "per_client_test_samples": last.count.tolist(),
      "per_client_train_samples": fed.client_sizes.tolist(),
      "rounds": out["records"],
      "participation": _participation_summary(config, fed, out["records"]),
      "timing": clock.summary() if clock else None,
      "wall_time_s": out["wall_time_s"],
      "compile_time_s": out["compile_time_s"],
      "data_time_s": run.data_time_s,
      "eval_time_s": out["eval_time_s"],
      **checkpointing,  # checkpoint_time_s, checkpoints, checkpoint_bytes
      "resumed_after_round": run.resume and run.resume.index,
      "peak_memory_gb": results_lib.peak_memory_gb(),
      "num_devices": fed.mesh.size,
      "num_processes": jax.process_count(),
      "jax_version": jax.__version__,
      "privacy": None,  # the private algorithms' summary has it
      **algorithm.summary(out["state"]),
      "config": config.to_dict(),
  }
  files = {
      SPLIT_FILE: data_lib.files.split_bytes(
          fed.split.train_indices, fed.split.test_indices
      ),
      **algorithm.files(out["state"]),
  }
  results["files"] = {name: len(content) for name, content in files.items()}
  results = results_lib.write(
      run.output_dir,
      results,
      out["tested"].params,
      out["tested"].client_model,
      files,
  )
  run.checkpoints.remove()
  say(
      f"{config.algorithm}: "
      + ("" if diverged is None else f"DIVERGED at round {diverged}; ")
      + f"test accuracy {best[0]:.4f} (best, round {best[1]}), last "
      f"{last.overall:.4f}; training {out['wall_time_s']:.2f}s + compile "
      f"{out['compile_time_s']:.2f}s; wrote {run.output_dir / results_lib.RESULTS}"
  )
  return results


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    output_dir: str | os.PathLike,
    split: data_lib.ClientSplit | None = None,
    progress: bool = True,
    model: models.LayerwiseNet | None = None,
) -> dict[str, Any]:
  """Runs one configuration and writes its results; returns them too.

  A run in progress in output_dir (its checkpoints) resumes after its last
  checkpoint, with the results of an uninterrupted run.

  Args:
    config: from `afl.config.get_config` (checked again here).
    output_dir: where results.json and the params go.
    split: the prepared data for `config`, to share it across runs (e.g.
      several algorithms on one seed); None prepares it.
    progress: print one line per round.
    model: a `models.LayerwiseNet` to train instead of config.model.

  Returns:
    results.json's content; its "status" is "diverged" (with
    "diverged_round") if the local loss stopped being finite.
  """
  return execute(prepare(config, output_dir, split, model), progress)


def saved_results(
    config: ml_collections.ConfigDict, output_dir: str | os.PathLike
) -> dict[str, Any] | None:
  """The results saved in output_dir if they are of `config`'s whole
  configuration; None if none are saved; ValueError naming the differing
  settings if they are of another."""
  path = pathlib.Path(output_dir) / results_lib.RESULTS
  if not path.exists():
    return None
  saved = json.loads(path.read_text())
  differ = config_lib.differences(saved.get("config", {}), config.to_dict())
  if differ:
    raise ValueError(
        f"{path} holds a run of other settings ({'; '.join(differ)}): remove "
        "it or choose another output folder"
    )
  return saved


def run_or_reuse(
    config: ml_collections.ConfigDict,
    output_dir: str | os.PathLike,
    split: data_lib.ClientSplit | None = None,
    progress: bool = False,
) -> dict[str, Any]:
  """The results of `config` in output_dir: read back if a run of the same
  configuration is saved there (`saved_results`), else run now."""
  saved = saved_results(config, output_dir)
  if saved is not None:
    return saved
  return train_and_evaluate(config, output_dir, split, progress)
