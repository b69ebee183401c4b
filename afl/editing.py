"""Editing a trained analytic federation: exact unlearning and late joining.

FedACnnL's server state is a sum of client statistics (eq. 4), so a
client's contribution can be taken out or put in exactly. The network is
deep, though: layer 1's inputs are the raw data, but every later layer's
inputs pass through layer 1, so they change for every client when layer 1
does. An edit of a finished run (`edit`) therefore goes:

  1. layer 1: A^[k] <- A^[k] - sum_{i leaving} G_i + sum_{i joining} G_i in
     the kept float64 sums of each touched group k (`analytic.ServerState`;
     the leaving clients recompute their own statistics, so the server never
     stored per-client ones), then W_1^[k] from eq. 5 / 11: no pass over the
     staying clients' data;
  2. layers 2..L: one pass per layer over the touched groups' clients
     (eq. 6 through the new layers, eq. 5 / 11), the run's own rounds
     (`analytic.rounds` with `layer_one`);
  3. pFedACnnL: the touched groups' clients personalize again (eq. 12,
     13); every other group's meta-model and personalized models are
     copied, bit for bit. FedACnnL has one group, always touched.

The result equals training the edited federation from scratch with the
same grouping (`edit(..., retrain=True)` does that, the reference): layer
1's sums are the same numbers summed in another order. K-means is not run
again: a joining client goes to the group whose centroid (the mean of its
members' h_i, eq. 9) is nearest, the assignment step of K-means (eq. 8,
9); all joining clients of one edit are assigned against the centroids
before any of them joins. The centroids then follow their members (kept as
sums). A retrained run with a fresh K-means may group differently.

Precision of the subtraction: the kept sums A are float64, so A - G_S
carries an absolute error of about c u tr(A) (u = 2^-53, c the number of
blocks summed), whatever is subtracted; with ||(A' + gamma I)^-1|| <=
1 / gamma the relative error of the solution is at most about
c u (tr A + gamma) / gamma: the condition bound of the system *before* the
removal (reported per round as `condition_bound`) times c u, e.g. 1e-10 for
MNIST's first layer. It does not grow when a large client leaves a small
group. With float32 products (statistics_dtype, the default) the leaving
clients' statistics are formed in other float32 chunks than in the run's
pass, so the edit equals retraining to float32's rounding of the products
(as float32 equals float64, see `afl.statistics`); float64 products give
the float64 bound above.

Runs with partial participation or dropouts (their layer-1 sums lack the
clients that did not report) cannot be edited and are refused; so are runs
with `--secure_sum` (an edit's passes are in the clear).

A client's ids in an edited run are its position there: the staying
clients in their old order, then the joining ones (results.json's
"edit.client_ids" maps them back).
"""

import json
import math
import pathlib
import time
from typing import Any, NamedTuple, Sequence

import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from afl import analytic
from afl import config as config_lib
from afl import data as data_lib
from afl import evaluation
from afl import federated
from afl import models
from afl import pfedacnnl
from afl import results as results_lib
from afl import runtime
from afl import statistics
from afl import timing
from afl.data import files

# Settings under which a run's layer-1 sums lack clients that did not report.
PARTIAL = ("clients_per_round", "dropout", "deadline_s", "participation_file")


class Source(NamedTuple):
  """A finished analytic run, loaded to be edited (`load`).

  Attributes:
    config: the run's config.
    results: its results.json.
    split: its clients' samples.
    params: its models' Flax params [M, ...] (numpy).
    client_model: [C] each client's model in params.
    server: its kept `analytic.ServerState`.
    model: the network, if not config.model (a custom one), else None.
    path: its folder.
    data_config: the settings whose data split.x, split.y are (the first
      run's, for an edited run).
  """

  config: ml_collections.ConfigDict
  results: dict
  split: data_lib.ClientSplit
  params: Any
  client_model: np.ndarray
  server: analytic.ServerState
  model: models.LayerwiseNet | None
  path: pathlib.Path | None
  data_config: dict


class Newcomers(NamedTuple):
  """Clients that join: their samples' indices into the source's data."""

  train_indices: list
  test_indices: list
  origin: dict | None = None  # where they come from, for results.json


class Edited(NamedTuple):
  """An edited run, to be written (`write`) or used."""

  split: data_lib.ClientSplit
  params: Any  # [M, ...] numpy
  client_model: np.ndarray  # [C']
  server: analytic.ServerState
  results: dict


def load(
    run_dir,
    split: data_lib.ClientSplit | None = None,
    model: models.LayerwiseNet | None = None,
) -> Source:
  """A finished analytic run's folder, to edit.

  Args:
    run_dir: the folder (results.json, params, split.npz,
      server_state.npz).
    split: for a run trained on a ClientSplit given to the Python API, that
      split (its x and y; the clients come from split.npz); else None.
    model: the network of a run trained on a custom model, else None.

  Raises ValueError, naming what is missing, for a folder that cannot be
  edited.
  """
  run_dir = pathlib.Path(run_dir)
  path = run_dir / results_lib.RESULTS
  if not path.is_file():
    raise ValueError(f"--from={run_dir}: no {results_lib.RESULTS} there")
  results = json.loads(path.read_text())
  name = results.get("algorithm")
  if name not in analytic.VARIANTS:
    raise ValueError(
        f"--from={run_dir} is a run of {name}: only the analytic algorithms "
        f"({', '.join(analytic.VARIANTS)}) can be edited"
    )
  config = ml_collections.ConfigDict(results["config"])
  partial = [f"--{n}={config[n]}" for n in PARTIAL if config.get(n)]
  if partial:
    raise ValueError(
        f"--from={run_dir} ran with {', '.join(partial)}: its layer-1 sums "
        "lack the clients that did not report, so it cannot be edited "
        "exactly"
    )
  if config[name].get("secure_sum"):
    raise ValueError(
        f"--from={run_dir} ran with --secure_sum: an edit would form the "
        "leaving clients' statistics and the later layers' sums in the "
        "clear"
    )
  private = (results.get("privacy") or {}).get("mode", "off")
  if private != "off" and math.isfinite(results["privacy"]["epsilon"]):
    raise ValueError(
        f"--from={run_dir} ran with --dp_mode={private}: its kept sums are "
        "noisy, and editing them (a client's exact statistics, the "
        "non-private solve) is not covered by its privacy accounting"
    )
  state_file = run_dir / analytic.SERVER_STATE
  if not state_file.is_file():
    raise ValueError(
        f"--from={run_dir} has no {analytic.SERVER_STATE} (the server's "
        "kept sums): it was written before runs kept them; run it again"
    )
  if results.get("model") == "custom" and model is None:
    raise ValueError(
        f"{run_dir} trained a custom model: pass it, load(..., model=)"
    )
  data_config = results.get("edit", {}).get("data_config", results["config"])
  if split is None:
    if "arrays_sha256" in results["data"]:
      raise ValueError(
          f"{run_dir} was trained on a ClientSplit given to the Python "
          "API: pass it, load(..., split=)"
      )
    split = runtime.prepare_split(ml_collections.ConfigDict(data_config))
  train, test = files.load_split(run_dir / runtime.SPLIT_FILE, len(split.y))
  sizes = [len(i) for i in train]
  if sizes != results["per_client_train_samples"]:
    raise ValueError(
        f"{run_dir / runtime.SPLIT_FILE} does not hold the run's clients "
        "(their training sizes differ from results.json's)"
    )
  saved = flax.serialization.msgpack_restore(
      results_lib.params_path(run_dir).read_bytes()
  )
  server = analytic.ServerState.load(state_file)
  if len(server.client_group) != len(train):
    raise ValueError(f"{state_file} is of another run ({len(train)} clients)")
  return Source(
      config,
      results,
      split._replace(train_indices=train, test_indices=test),
      saved["models"],
      np.asarray(saved["client_model"]),
      server,
      model,
      run_dir,
      data_config,
  )


def newcomers_from(
    source: Source, split_file, clients: Sequence[int] | None = None
) -> Newcomers:
  """Clients of a split file over the source's data (`afl.data.files`;
  e.g. another run's split.npz), all or those listed, as Newcomers."""
  train, test = files.load_split(split_file, len(source.split.y))
  chosen = range(len(train)) if clients is None else _ids(clients, len(train))
  return Newcomers(
      [train[c] for c in chosen],
      [test[c] for c in chosen],
      {"split_file": str(split_file), "clients": [int(c) for c in chosen]},
  )


def unlearn(source: Source, clients: Sequence[int], **kwargs) -> Edited:
  """`edit` removing `clients` (ids of the source run)."""
  return edit(source, remove=clients, **kwargs)


def join(source: Source, newcomers: Newcomers, **kwargs) -> Edited:
  """`edit` adding `newcomers`."""
  return edit(source, add=newcomers, **kwargs)


def _ids(clients, num_clients: int) -> np.ndarray:
  ids = np.asarray(list(clients), np.int64)
  bad = ids[(ids < 0) | (ids >= num_clients)]
  if len(bad):
    raise ValueError(
        f"client id(s) {bad.tolist()} out of range: there are {num_clients} "
        f"clients (0..{num_clients - 1})"
    )
  if len(np.unique(ids)) != len(ids):
    raise ValueError(f"client ids listed twice: {ids.tolist()}")
  return np.sort(ids)


def _check_disjoint(split, stay: np.ndarray, add: Newcomers) -> None:
  """A joining client's samples must not be a staying client's (it would
  be counted twice): ValueError naming them."""
  owner = np.full(len(split.y), -1)
  for c in stay:
    owner[split.train_indices[c]] = c
    owner[split.test_indices[c]] = c
  for j, (train, test) in enumerate(zip(add.train_indices, add.test_indices)):
    if not len(train):
      raise ValueError(f"joining client {j} has no training samples")
    taken = owner[np.concatenate([train, test])]
    if (taken >= 0).any():
      raise ValueError(
          f"joining client {j} holds {(taken >= 0).sum()} samples of the "
          f"run's client {taken[taken >= 0][0]}: is it already in the "
          "federation?"
      )


def _edited_config(config, num_clients: int, block_size: int):
  """The source's config for the edited federation (split.npz is set by
  `write`); the run's block size kept."""
  edited = ml_collections.ConfigDict(config.to_dict())
  edited.num_clients = num_clients
  edited.block_size = block_size
  for name in config_lib.SPLIT_REPLACES:
    edited[name] = config_lib.DEFAULTS[name]
  return edited


def _regroup(source, stay, remove, add, algorithm):
  """The groups after the edit (module docstring): (old group of every
  client of the edited run [C'], centroid sums [K, d_h], group sizes [K]),
  groups in the source's numbering."""
  server, split = source.server, source.split
  groups = server.client_group
  num_classes = split.num_classes

  def vectors(indices):
    if not indices:
      return np.zeros((0, server.centroid_sums.shape[1]))
    counts = data_lib.client_label_histograms(indices, split.y, num_classes)
    return pfedacnnl.label_vectors(counts, algorithm)

  centroid_sums = server.centroid_sums.copy()
  sizes = server.group_sizes.copy()
  np.subtract.at(
      centroid_sums,
      groups[remove],
      vectors([split.train_indices[c] for c in remove]),
  )
  np.subtract.at(sizes, groups[remove], 1)
  joining = vectors(list(add.train_indices))
  joined = np.zeros(0, np.int32)
  if len(joining):
    alive = np.flatnonzero(sizes > 0)
    if not len(alive):
      raise ValueError("no group is left for the joining clients")
    centroids = centroid_sums[alive] / sizes[alive, None]
    joined = alive[pfedacnnl.nearest_groups(joining, centroids)]
    np.add.at(centroid_sums, joined, joining)
    np.add.at(sizes, joined, 1)
  return np.concatenate([groups[stay], joined]), centroid_sums, sizes


def _moved_sums(algorithm, fed, movers, segments, num_segments):
  """Layer 1's sums (eq. 6 summed) of the leaving and joining clients, per
  segment [num_segments] (float64)."""
  blocks = federated.distribute(
      fed.inputs, fed.split.y, movers, fed.mesh, fed.block_size
  )
  segment = jnp.asarray(segments, jnp.int32)[blocks.client]
  return algorithm.client_statistics(
      0,
      algorithm.init(fed.key, 1),
      blocks,
      jnp.zeros_like(segment),
      segment,
      num_segments,
  )


def edit(
    source: Source,
    remove: Sequence[int] = (),
    add: Newcomers | None = None,
    *,
    retrain: bool = False,
    progress: bool = True,
) -> Edited:
  """Removes the clients `remove` (the source's ids) and adds `add`
  (module docstring), exactly; with `retrain`, trains the edited
  federation from scratch instead, with the same grouping (the
  reference). Raises ValueError for a bad edit before any work."""
  config = source.config
  hparams = config[config.algorithm]
  variant = analytic.VARIANTS[config.algorithm]
  num_clients = len(source.split.train_indices)
  remove = _ids(remove, num_clients)
  add = add or Newcomers([], [])
  if not (len(remove) or add.train_indices or retrain):
    raise ValueError("nothing to edit: give clients to remove or to add")
  stay = np.setdiff1d(np.arange(num_clients), remove)
  if not len(stay) and not add.train_indices:
    raise ValueError("removing every client leaves no federation")
  _check_disjoint(source.split, stay, add)
  edited_config, fed, algorithm = _federation(source, stay, add)
  server = source.server
  num_groups = len(server.group_sizes)
  old_group, centroid_sums, sizes = _regroup(
      source, stay, remove, add, algorithm
  )
  joined = old_group[len(stay) :]
  touched = np.zeros(num_groups, bool)
  touched[server.client_group[remove]] = True
  touched[joined] = True
  touched = (touched | retrain) & (sizes > 0)
  touched_ids = np.flatnonzero(touched)
  say = runtime.Progress(progress)
  sums, layer_one, moved_s, moved_compile_s = _layer_one(
      algorithm, fed, source, remove, add, joined, touched_ids, retrain
  )
  say(
      f"edit of {source.path}: {len(remove)} client(s) leave, "
      f"{len(add.train_indices)} join; group(s) {touched_ids.tolist()} of "
      f"{num_groups} re-solved"
      + ("" if retrain else f"; layer 1's sums updated in {moved_s:.3f}s")
  )
  members, out = _resolve(
      algorithm, fed, variant, hparams, old_group, touched, layer_one, say
  )
  if out is not None:  # the touched groups' layer-1 sums, as solved
    kept_sums = statistics.assembled(out["state"].kept)
    for name, kept in kept_sums._asdict().items():
      getattr(sums, name)[touched_ids] = np.asarray(kept)

  alive = np.flatnonzero(sizes > 0)
  renumber = np.full(num_groups, -1)
  renumber[alive] = np.arange(len(alive))
  groups = renumber[old_group].astype(np.int32)
  params, client_model = _merged_params(
      source, variant, out, stay, members, old_group, touched, alive
  )
  accuracy = evaluation.evaluate(
      fed.model.apply,
      fed.replicated(params),
      fed.blocks("test"),
      fed.mesh,
      client_model,
  )
  edited_server = analytic.ServerState(
      jax.tree.map(lambda a: a[alive], sums),
      centroid_sums[alive],
      sizes[alive],
      groups,
  )
  rounds_s = out["wall_time_s"] if out else 0.0
  rounds_compile_s = out["compile_time_s"] if out else 0.0
  results = _results(
      source,
      edited_config,
      fed,
      accuracy,
      edited_server,
      out["records"] if out else [],
      dict(
          source=None if source.path is None else str(source.path),
          removed=remove.tolist(),
          added=add.origin or {"clients": len(add.train_indices)},
          retrained=retrain,
          client_ids=[{"from_run": int(c)} for c in stay]
          + [{"joined": j} for j in range(len(add.train_indices))],
          touched_groups=touched_ids.tolist(),
          dropped_groups=np.flatnonzero(
              (server.group_sizes > 0) & (sizes == 0)
          ).tolist(),
          clients_re_solved=int(len(members)),
          accuracy_before=_accuracy_before(source, stay),
          accuracy_after=_accuracy_after(accuracy, len(stay)),
          layer_one_s=moved_s,
          rounds_s=rounds_s,
          time_s=moved_s + rounds_s,
          compile_s=moved_compile_s + rounds_compile_s,
          data_config=source.data_config,
      ),
  )
  say(
      f"edited: test accuracy {accuracy.overall:.4f} (before "
      f"{source.results['accuracy']:.4f}); {moved_s + rounds_s:.3f}s + "
      f"compile {moved_compile_s + rounds_compile_s:.1f}s"
  )
  return Edited(fed.split, params, client_model, edited_server, results)


def _federation(source: Source, stay: np.ndarray, add: Newcomers):
  """The edited federation: (its config, `algorithm.Federation`, the
  source's FedACnnL functions on its mesh)."""
  config = source.config
  hparams = config[config.algorithm]
  split = source.split._replace(
      train_indices=[source.split.train_indices[c] for c in stay]
      + list(add.train_indices),
      test_indices=[source.split.test_indices[c] for c in stay]
      + list(add.test_indices),
  )
  edited_config = _edited_config(
      config, len(split.train_indices), source.results["block_size"]
  )
  fed = runtime.federation(edited_config, split, source.model)
  algorithm = analytic.build_fedacnnl(
      fed.model,
      num_classes=fed.num_classes,
      input_shape=fed.input_shape,
      mesh=fed.mesh,
      gamma=hparams.gamma,
      encoding_seed=config.seed,
      statistics_dtype=hparams.statistics_dtype,
  )
  return edited_config, fed, algorithm


def _layer_one(
    algorithm, fed, source, remove, add, joined, touched_ids, retrain
):
  """Step 1 (module docstring): the kept sums less the leaving clients',
  plus the joining ones' (one pass over the movers' data). Returns (every
  group's sums [K] numpy, the touched groups' [T] to solve or None to
  retrain, seconds, compile seconds)."""
  server = source.server
  num_groups = len(server.group_sizes)
  sums = jax.tree.map(jnp.asarray, server.sums)
  with timing.CompileClock() as compiling:
    began = time.perf_counter()
    layer_one = None
    movers = [source.split.train_indices[c] for c in remove]
    movers += list(add.train_indices)
    if not retrain:
      if movers:
        moved = _moved_sums(
            algorithm,
            fed,
            movers,
            np.concatenate([server.client_group[remove], num_groups + joined]),
            2 * num_groups,
        )
        sums = jax.tree.map(
            lambda kept, m: kept - m[:num_groups] + m[num_groups:], sums, moved
        )
      layer_one = jax.block_until_ready(
          jax.tree.map(lambda a: a[touched_ids], sums)
      )
    seconds = time.perf_counter() - began - compiling.seconds
  return jax.tree.map(np.array, sums), layer_one, seconds, compiling.seconds


def _resolve(
    algorithm, fed, variant, hparams, old_group, touched, layer_one, say
):
  """Steps 2 and 3: the run's rounds on the touched groups' clients, layer
  1 from `layer_one` (None: a pass); `touched` [K] bool. Returns (those clients' ids [n], the
  rounds' `runtime.run_rounds` output or None if there are none)."""
  local = np.where(touched, np.cumsum(touched) - 1, -1)  # group -> touched
  members = np.flatnonzero(local[old_group] >= 0)
  if not len(members):
    return members, None
  member_groups = local[old_group[members]]
  data = federated.distribute(
      fed.inputs,
      fed.split.y,
      [fed.split.train_indices[c] for c in members],
      fed.mesh,
      fed.block_size,
      np.argsort(member_groups, kind="stable"),
  )
  rounds = analytic.rounds(
      algorithm,
      data,
      member_groups,
      eps=hparams.get("eps"),
      personalized=variant.personalized,
      layer_one=layer_one,
  )
  return members, runtime.run_rounds(rounds, fed.key, progress=say)


def _merged_params(
    source, variant, out, stay, members, old_group, touched, alive
):
  """The edited run's models: the re-solved ones of the touched groups,
  the source's (the same bytes) for every other. (params, client_model)."""
  stacked = source.params
  if out is not None:
    trained = jax.tree.map(np.asarray, out["tested"].params)
    stacked = jax.tree.map(
        lambda a, b: np.concatenate([a, b]), source.params, trained
    )
  first_trained = jax.tree.leaves(source.params)[0].shape[0]
  if variant.personalized:  # one model per client
    index = np.zeros(len(old_group), np.int64)
    index[: len(stay)] = source.client_model[stay]
    index[members] = first_trained + np.arange(len(members))
    client_model = np.arange(len(old_group), dtype=np.int32)
  else:  # one model per group; the source's model of group k is k
    local = np.cumsum(touched) - 1
    index = np.where(touched[alive], first_trained + local[alive], alive)
    renumber = np.full(len(touched), -1)
    renumber[alive] = np.arange(len(alive))
    client_model = renumber[old_group].astype(np.int32)
  return jax.tree.map(lambda a: a[index], stacked), client_model


def _accuracy_before(source: Source, stay: np.ndarray) -> dict:
  accuracy = np.array(
      [
          np.nan if a is None else a
          for a in source.results["per_client_accuracy"]
      ]
  )
  count = np.asarray(source.results["per_client_test_samples"], np.float64)
  staying = count[stay].sum()
  return {
      "overall": source.results["accuracy"],
      "staying_clients": float(
          np.nansum(accuracy[stay] * count[stay]) / max(staying, 1)
      ),
  }


def _accuracy_after(accuracy: evaluation.Accuracy, num_staying: int) -> dict:
  def part(sl):
    return float(accuracy.correct[sl].sum() / max(accuracy.count[sl].sum(), 1))

  after = {
      "overall": accuracy.overall,
      "staying_clients": part(slice(None, num_staying)),
  }
  if len(accuracy.count) > num_staying:
    after["joined_clients"] = part(slice(num_staying, None))
  return after


def _results(source, config, fed, accuracy, server, records, edit_record):
  """The edited run's results.json (its params and files: `write`)."""
  per_client = accuracy.per_client
  return {
      "algorithm": config.algorithm,
      "status": "completed",
      "dataset": fed.split.name,
      "model": source.results["model"],
      "model_spec": repr(fed.model),
      "data": dict(source.results["data"], split_written=runtime.SPLIT_FILE),
      "num_clients": config.num_clients,
      "seed": config.seed,
      "accuracy": accuracy.overall,
      "last_accuracy": accuracy.overall,
      "per_client_accuracy": [
          None if np.isnan(a) else float(a) for a in per_client
      ],
      "per_client_test_samples": accuracy.count.tolist(),
      "per_client_train_samples": fed.client_sizes.tolist(),
      "client_group": server.client_group.tolist(),
      "group_sizes": server.group_sizes.tolist(),
      "block_size": fed.block_size,
      "server_state": server.describe(),
      "edit": edit_record,
      "rounds": records,
      "wall_time_s": edit_record["time_s"],
      "compile_time_s": edit_record["compile_s"],
      "num_devices": fed.mesh.size,
      "jax_version": jax.__version__,
      "config": config.to_dict(),
  }


def write(edited: Edited, output_dir, overwrite: bool = False) -> dict:
  """Writes the edited run's folder (results.json, params, split.npz,
  server_state.npz) as one unit (`afl.results`); returns its results."""
  results_lib.check_output(output_dir, overwrite)
  output_dir = pathlib.Path(output_dir).resolve()
  results = dict(edited.results)
  results["config"] = dict(
      results["config"], split_file=str(output_dir / runtime.SPLIT_FILE)
  )
  content = {
      runtime.SPLIT_FILE: files.split_bytes(
          edited.split.train_indices, edited.split.test_indices
      ),
      analytic.SERVER_STATE: edited.server.to_bytes(),
  }
  results["files"] = {name: len(c) for name, c in content.items()}
  return results_lib.write(
      output_dir, results, edited.params, edited.client_model, content
  )
