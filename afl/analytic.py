"""FedACnnL, pFedACnnL and the ablations as registered algorithms.

One `Algorithm` (`afl.algorithm`) serves the five (section V-A):

  fedacnnl      L rounds, one global model (eq. 5), adaptive batch size
                (eq. 7) on the clock;
  fedacnnl_wa   the same without eq. 7 (every client keeps B_1);
  pfedacnnl     K-means groups (stage 1, eq. 8, 9, at build time), L rounds
                of group meta-models (eq. 10, 11), then L personalization
                rounds (eq. 12, 13) without communication;
  pfedacnnl_wc  pFedACnnL with K = 1 (no clustering);
  pfedacnnl_wp  pFedACnnL without the personalization rounds.

Round l <= L is `fedacnnl.solve_layer` on the client -> group map (one
group for FedACnnL); round L + l is `pfedacnnl.personalize_layer`, starting
every client from its group's meta-model and using the meta-model's
label-space solution as the prior of eq. 13. The state holds the factored
params (`fedacnnl`: W_l = P_l Q_l) and the solutions so far; the last round
of the run forms the full model once (`FedACnnL.expand`), and only then is
there a model to test. The training blocks are laid out by group, so group
sums merge neighbours.

Every round checks its solves on the host once they are done (`solve.check`
on the `solve.Diagnostics` that the same compiled pass forms): non-finite
or overflowing statistics, a ridge term below float64's resolution, a
failed Cholesky factorization or a non-finite solution raise
`solve.NumericalError` naming the round, the layer, the equation, the
groups (server, eq. 5 / 11) or clients (eq. 13) and the likely cause, with
the raw inputs of their clients; a condition bound beyond what float64
resolves to 1e-6 warns. The round's metrics carry the largest condition
bound and relative residual of its systems (`condition_bound`,
`residual`).

Round 1's sums per group (eq. 4 / 10 of layer 1, on the raw data) are
kept in the state and written with the run (`ServerState`,
server_state.npz): from them `afl.editing` removes or adds clients exactly
(`rounds(..., layer_one=)` solves given sums instead of a pass).

With `--secure_sum` (`afl.secure_sum`) a federated round forms every
reporting client's statistics and its masked upload in one pass, sums the
uploads per group, unmasks and decodes the sums, and solves them as the
first layer's are solved (`FedACnnL.solve_sums`).

`train` runs the same rounds on given blocks and groups without the rest of
a run (no clock, no test): the library's way to train on one's own
`federated.FederatedData`.
"""

import functools
import io
import time
from typing import Any, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from afl import algorithm as algorithm_lib
from afl import catalog
from afl import clock as clock_lib
from afl import distributed
from afl import fedacnnl
from afl import federated
from afl import memory
from afl import models
from afl import pfedacnnl
from afl import privacy
from afl import rng
from afl import runtime
from afl import secure_sum as secure_sum_lib
from afl import solve
from afl import statistics
from afl import timing

Variant = catalog.Variant
VARIANTS = catalog.VARIANTS


class State(NamedTuple):
  """Between rounds.

  Attributes:
    params: factored params stacked [M, ...] (M = K in the federated rounds,
      C in the personalization rounds).
    solutions: the P_l [M, d, d_y] of the current stage's rounds so far.
    meta: the federated stage's P_l once all L are solved, else ().
    full: the full model of the run's last round (`expand`), else None.
    kept: the first layer's sums per group (`statistics.Statistics` [K],
      float64, the gram square or in tiles) once round 1 is done, else
      None: the server's kept state
      (`ServerState`, `afl.editing`).
  """

  params: Any
  solutions: tuple
  meta: tuple
  full: Any
  kept: Any = None


def rounds(
    algorithm: fedacnnl.FedACnnL,
    data: federated.FederatedData,
    groups: np.ndarray | None = None,
    *,
    eps: float | None = None,
    personalized: bool = False,
    work=None,
    adaptive: bool = False,
    layer_one: statistics.Statistics | None = None,
    secure: secure_sum_lib.SecureSum | None = None,
    private: privacy.Privacy | None = None,
    noise_key: jax.Array | None = None,
) -> algorithm_lib.Algorithm:
  """The analytic rounds (module docstring) on `data`.

  Args:
    algorithm: from `fedacnnl.fedacnnl`.
    data: training blocks, sharded over the algorithm's mesh.
    groups: [C] group of each client, or None for one global model.
    eps: epsilon of eq. 13 (personalized only).
    personalized: run the L personalization rounds.
    work: the clock's work (`clock.analytic_work`), or None.
    adaptive: eq. 7 on the clock.
    layer_one: the first layer's sums per group [K] to solve in round 1
      instead of a pass over the clients' data (`afl.editing`: the kept
      sums less the leaving clients', plus the joining ones'), or None.
    secure: sum the federated rounds' statistics securely
      (`afl.secure_sum`, `--secure_sum`): per-client statistics, masked,
      summed per group, unmasked; then the same solves. None: in the clear.
    private: differential privacy of the federated rounds' uploads
      (`afl.privacy`: rows clipped, sums noised, solved through the PSD
      projection), or None; not private unless `private.enabled`.
    noise_key: the privacy noise's stream (with `private`); round r draws
      from fold_in(noise_key, r).
  """
  if private is not None and not private.enabled:
    private = None
  if private is not None and algorithm.model.row_clip != private.clip:
    raise ValueError(
        f"a private run's model must clip its rows at --dp_clip="
        f"{private.clip} (model.clone(row_clip=C)), got "
        f"{algorithm.model.row_clip}"
    )
  num_layers = algorithm.num_layers
  if groups is None:
    groups = np.zeros(data.num_clients, np.int32)
  groups = np.asarray(groups, np.int32)
  num_groups = int(groups.max()) + 1
  if personalized and not (eps or 0) > 0:
    raise ValueError(f"eps must be > 0, got {eps}")
  if secure is not None and not np.array_equal(secure.groups, groups):
    raise ValueError("the secure sum's groups differ from the rounds' groups")
  block_group = jax.numpy.asarray(groups)[data.client]
  num_rounds = 2 * num_layers if personalized else num_layers

  def init(key):
    return State(algorithm.init(key, num_groups), (), (), None)

  def round_fn(state: State, index: int, key, who=None):
    del key  # nothing random: every round is a closed-form solve
    with timing.CompileClock() as compiling:
      return timed_round(state, index, compiling, who)

  def timed_round(state: State, index: int, compiling, who):
    began = time.perf_counter()
    stage = "federated" if index <= num_layers else "personalization"
    layer = (index - 1) % num_layers
    extra, kept = {}, state.kept  # more of the round's record
    if stage == "federated":
      params = state.params
      segment = block_group
      if who is not None:  # the others' blocks count for no segment
        reported = who.reported
        segment = jnp.where(jnp.asarray(reported)[data.client], block_group, -1)
        extra = _unreported_groups(reported, index)
      if private is not None or (
          secure is not None and (layer > 0 or layer_one is None)
      ):  # eq. 4 / 10 of noisy (`afl.privacy`) or secure sums
        sums, ridge, released = _released_sums(
            state, index, layer, params, segment, who
        )
        extra.update(released)
        kept = sums if layer == 0 else kept
        solved = algorithm.solve_sums(
            sums, algorithm.gamma + ridge, private=private is not None
        )
      elif layer == 0:  # eq. 4's sums, kept by the server; then eq. 5 / 11
        kept = layer_one
        if kept is None:
          kept = algorithm.client_statistics(  # put together when written
              0, params, data, block_group, segment, num_groups, square=False
          )
        solved = algorithm.solve_sums(kept, algorithm.gamma)
      else:
        solved = fedacnnl.solve_layer(
            algorithm, data, layer, params, block_group, num_groups, segment
        )
    else:
      prior = state.meta[layer][groups]  # [C, d, d_y]
      params = state.params
      if layer == 0:
        params = algorithm.factored(tuple(s[groups] for s in state.meta))
      solved = pfedacnnl.personalize_layer(
          algorithm, data, layer, params, prior, eps
      )
    solved = jax.block_until_ready(solved)
    statistics_compile_s = compiling.seconds
    statistics_s = time.perf_counter() - began - statistics_compile_s
    conditioning = _check(solved.diagnostics, index, stage, layer)
    solution = solved.solution
    solutions = state.solutions + (solution,)
    meta, full = state.meta, None
    if layer + 1 < num_layers:
      params = algorithm.write_layer(layer, params, solution)
    elif stage == "federated":
      meta, solutions = solutions, ()
      if index == num_rounds:
        full = algorithm.expand(meta)
    else:
      full = algorithm.expand(solutions)
    jax.block_until_ready((params, full))
    solve_s = time.perf_counter() - began - statistics_s - compiling.seconds
    return State(params, solutions, meta, full, kept), {
        "stage": stage,
        "layer": models.layer_name(layer),
        "width": int(solution.shape[-2]),
        "outputs": int(algorithm.encodings[layer].shape[-1]),
        # One pass forms the statistics (eq. 6) and solves them; the
        # writing of the layer (and the full model) is solve_s. Neither
        # counts compilation (the record's compile_s).
        "statistics_s": statistics_s,
        "solve_s": solve_s,
        # The numeric guards' conditioning (`solve.check`): the largest
        # condition bound (trace G + reg) / reg and relative residual over
        # the round's systems.
        **conditioning,
        **extra,
    }

  if secure is not None:  # one process (`_secure_sum`): on the host
    block_client = np.asarray(data.client)
    block_real = np.asarray(data.mask).any(1)

  def _released_sums(state, index, layer, params, segment, who):
    """Round `index`'s sums per group [K] as the server receives them:
    with the noise of the reporting clients' uploads if private (each
    upload's std from the sensitivity of clipped rows, `afl.privacy`),
    summed securely if `secure`; the ridge the noise needs per group [K]
    (`privacy.noise_ridge`; 0.0 without noise), and the round's record."""
    reported = np.ones(len(groups), bool) if who is None else who.reported
    _, positions, width = statistics.design_shape(
        algorithm.model, layer, params, data, algorithm.encodings
    )
    ridge, record, stds = 0.0, {}, None
    if private is not None:
      std = private.noise_multiplier * privacy.sensitivity(
          private.clip, positions
      )
      contributors = np.bincount(groups[reported], minlength=num_groups)
      sum_std = privacy.sum_std(std, contributors, private.mode)
      ridge = privacy.noise_ridge(sum_std, width + 1)  # d, with the bias
      record = {"dp_noise_std": std, "dp_ridge": float(ridge.max())}
      stds = np.array(  # each client's share of its group's noise
          [privacy.share_std(std, n, private.mode) for n in contributors]
      )[groups]
    if secure is not None:
      sums, secured = _secure_sums(
          state, index, layer, params, who, stds, positions, width
      )
      return sums, ridge, dict(record, **secured)
    sums = algorithm.client_statistics(  # of rows clipped by the model
        layer, params, data, block_group, segment, num_groups
    )
    noisy = privacy.add_noise(
        jax.random.fold_in(noise_key, index), sums, sum_std
    )
    return noisy, ridge, record

  def _secure_sums(state, index, layer, params, who, stds, positions, width):
    """Round `index`'s sums per group [K] by `secure` (eq. 4 / 10 of
    every client's statistics, noised by stds [C] if given, encoded,
    masked, summed, unmasked) and the round's record; positions and width
    (d - 1) are the layer's (`statistics.design_shape`)."""
    bound = secure_sum_lib.row_bound(
        algorithm.model,
        algorithm.encodings,
        state.solutions,
        secure.input_bound,
    )
    noise = 0.0
    if stds is not None:  # clipped rows; each client's noise's tail
      bound = min(bound, private.clip)
      noise = secure_sum_lib.NOISE_TAILS * float(stds.sum())
    encoding = secure_sum_lib.encoding_for(
        bound, int(data.client_sizes().sum()) * positions, noise
    )

    def client_uploads(clients, args):  # [n] ids, -1: none
      local = np.full(data.num_clients, -1, np.int32)
      present = clients >= 0
      local[clients[present]] = np.flatnonzero(present)
      segment = np.where(block_real, local[block_client], -1)
      return algorithm.client_statistics(
          layer,
          params,
          data,
          block_group,
          jnp.asarray(segment),
          len(clients),
          secure_sum_lib.finalize_upload,
          args,
      )

    return secure.aggregate(
        index,
        client_uploads,
        encoding,
        width,
        algorithm.encodings[-1].shape[0],
        None if who is None else who.sampled,
        None if who is None else who.reported,
        stds,
    )

  def _unreported_groups(reports, index) -> dict:
    """{"groups_unreported": [...]} for the groups of which no client
    reported (their solve has only the ridge term: W_l = 0), warned."""
    heard = np.bincount(groups[reports], minlength=num_groups)
    silent = np.flatnonzero(heard == 0).tolist()
    if silent:
      logging.warning(
          "round %d: no client of %s reported; its layer is the ridge "
          "solution of no data (zero weights)",
          index,
          "the model" if num_groups == 1 else f"group(s) {silent}",
      )
    return {"groups_unreported": silent} if silent else {}

  def _check(diagnostics, index, stage, layer) -> dict:
    """`solve.check` of a round's Diagnostics, naming its groups or
    clients (raises solve.NumericalError)."""
    federated_stage = stage == "federated"
    if federated_stage:
      equation = "eq. 5" if num_groups == 1 else "eq. 11"
    else:
      equation = "eq. 13"
    where = f"round {index} ({stage}, {models.layer_name(layer)}, {equation})"

    def clients_of(segments):
      if federated_stage:
        return np.flatnonzero(np.isin(groups, segments))
      return np.asarray(segments)

    def names(segments):
      if not federated_stage:
        return f"client(s) {solve.listed(segments)}"
      if num_groups == 1:
        return "the global model (all clients)"
      return (
          f"group(s) {solve.listed(segments)} (clients "
          f"{solve.listed(clients_of(segments))})"
      )

    return solve.check(
        diagnostics,
        where=where,
        reg=algorithm.gamma if federated_stage else eps,
        reg_name="gamma" if federated_stage else "eps",
        names=names,
        explain=lambda segments: _inputs_report(data, clients_of(segments)),
    )

  clients = np.arange(data.num_clients)

  def tested(state: State, key):
    """The final model; before it, from round L on, the complete model of
    the round: the federated model (meta-models) at round L, and after
    personalization round L + l every client's layers 1..l with its
    group's meta-model above them (Fig. 6's curves)."""
    del key
    if state.full is not None:
      return algorithm_lib.Tested(
          state.full, clients if personalized else groups
      )
    if not state.meta:  # no complete model before round L
      return None
    if not state.solutions:
      return algorithm_lib.Tested(algorithm.expand(state.meta), groups)
    above = tuple(p[groups] for p in state.meta[len(state.solutions) :])
    return algorithm_lib.Tested(
        algorithm.expand(state.solutions + above), clients
    )

  def clock_work(index, batch_size):
    return work(index - 1, batch_size) if index <= num_layers else None

  return algorithm_lib.Algorithm(
      init=init,
      round=round_fn,
      num_rounds=num_rounds,
      models=tested,
      work=clock_work if work else None,
      adaptive_batch_size=adaptive,
      train_loss=False,
      upload_rounds=num_layers,
      reports_final=True,
  )


def _inputs_report(data: federated.FederatedData, clients: np.ndarray) -> str:
  """What the raw inputs of `clients` hold: their non-finite values and
  largest magnitudes, against the median client's (for an error message;
  one pass over the blocks, only when a round fails)."""

  def per_block(x, mask):
    flat = x.reshape(x.shape[:2] + (-1,))
    finite = jnp.isfinite(flat)
    real = mask[..., None]
    return (
        jnp.sum(~finite & real, (1, 2)),
        jnp.max(jnp.where(finite & real, jnp.abs(flat), 0), (1, 2)),
    )

  sharding = getattr(data.x, "sharding", None)
  if isinstance(sharding, jax.sharding.NamedSharding):
    everywhere = jax.sharding.NamedSharding(
        sharding.mesh, jax.sharding.PartitionSpec()
    )
    per_block = jax.jit(per_block, out_shardings=everywhere)
  else:
    per_block = jax.jit(per_block)
  nonfinite, largest = (np.asarray(a) for a in per_block(data.x, data.mask))
  owner = np.asarray(data.client)
  client_nonfinite = np.bincount(owner, nonfinite, data.num_clients)
  client_largest = np.zeros(data.num_clients)
  np.maximum.at(client_largest, owner, largest.astype(np.float64))
  order = sorted(
      clients, key=lambda c: (-client_nonfinite[c], -client_largest[c])
  )[:5]
  parts = [
      f"client {c}: {int(client_nonfinite[c])} non-finite value(s), largest "
      f"finite |x| {client_largest[c]:.3g}"
      for c in order
  ]
  return (
      "Their raw inputs (layer 0's, the most suspicious first): "
      + "; ".join(parts)
      + f" (the median client's largest |x|: "
      f"{np.median(client_largest):.3g})."
  )


SERVER_STATE = "server_state.npz"  # a run folder's ServerState


class ServerState(NamedTuple):
  """What the server of a finished analytic run keeps to edit it
  (`afl.editing`: remove clients exactly, add new ones).

  Layer 1's inputs are the raw data, so its sums are the only ones that a
  client's leaving or joining changes by its own statistics alone; every
  later layer's inputs change for every client of the group with layer 1,
  and are formed anew by one pass. So the server keeps layer 1's sums
  (eq. 4 / 10 before the label encoding), not the later layers'. A client
  keeps nothing but its data: leaving, it recomputes its layer-1
  statistics to be subtracted; it takes part in the later layers' passes.

  Attributes:
    sums: `statistics.Statistics` [K] float64, layer 1's sums per group.
    centroid_sums: [K, d_h] float64, sum of the members' h_i (eq. 9): group
      k's centroid is centroid_sums[k] / group_sizes[k] (the K-means
      centroid of the final assignment), where a newcomer is assigned.
    group_sizes: [K] int64, clients per group.
    client_group: [C] int32.
  """

  sums: statistics.Statistics
  centroid_sums: np.ndarray
  group_sizes: np.ndarray
  client_group: np.ndarray

  def to_bytes(self) -> bytes:
    buffer = io.BytesIO()
    np.savez(
        buffer,
        **self.sums._asdict(),
        centroid_sums=self.centroid_sums,
        group_sizes=self.group_sizes,
        client_group=self.client_group,
    )
    return buffer.getvalue()

  @classmethod
  def load(cls, path) -> "ServerState":
    with np.load(path) as saved:
      arrays = {name: saved[name] for name in saved.files}
    sums = statistics.Statistics(
        *(arrays.pop(name) for name in statistics.Statistics._fields)
    )
    return cls(sums, **arrays)

  def describe(self) -> dict:
    """results.json's "server_state": its file, arrays and size."""
    arrays = {**self.sums._asdict(), "centroid_sums": self.centroid_sums}
    return {
        "file": SERVER_STATE,
        "layer": models.layer_name(0),
        "groups": len(self.group_sizes),
        "shapes": {name: list(a.shape) for name, a in arrays.items()},
        "bytes": int(sum(a.nbytes for a in arrays.values())),
    }


def server_state(
    state: State, vectors: np.ndarray, groups: np.ndarray
) -> ServerState:
  """The ServerState of a finished run's state, its clients' h_i [C, d_h]
  (eq. 9) and groups [C]."""
  num_groups = int(groups.max()) + 1
  centroid_sums = np.zeros((num_groups, vectors.shape[1]))
  np.add.at(centroid_sums, groups, vectors)
  return ServerState(
      jax.tree.map(
          lambda a: np.asarray(a, np.float64), statistics.assembled(state.kept)
      ),
      centroid_sums,
      np.bincount(groups, minlength=num_groups).astype(np.int64),
      np.asarray(groups, np.int32),
  )


class Trained(NamedTuple):
  """Output of `train`.

  Attributes:
    params: the model's Flax params stacked [M, ...] (one global model, K
      meta-models, or C personalized models).
    client_model: [C] index of each client's model in params.
    solutions: the federated rounds' P_l [K, d, d_y] per layer (W_l = P_l
      Q_l); the priors of eq. 13.
    rounds: one record per round.
    wall_time_s: training time without compilation.
    compile_time_s: time spent tracing and compiling.
  """

  params: Any
  client_model: np.ndarray
  solutions: tuple
  rounds: list
  wall_time_s: float
  compile_time_s: float


def train(
    algorithm: fedacnnl.FedACnnL,
    data: federated.FederatedData,
    key: jax.Array,
    groups: np.ndarray | None = None,
    *,
    eps: float = 2500.0,
    personalized: bool = False,
    plan=None,
    secure: secure_sum_lib.SecureSum | None = None,
) -> Trained:
  """FedACnnL (groups None), its group meta-models, or pFedACnnL
  (personalized) on `data`, through the one run loop without a clock or
  tests (see `rounds`); `plan`: who reports in each federated round
  (`afl.participation.Plan`), None: every client; `secure`: sum the
  statistics securely (`rounds`)."""
  run = runtime.run_rounds(
      rounds(
          algorithm,
          data,
          groups,
          eps=eps,
          personalized=personalized,
          secure=secure,
      ),
      key,
      plan=plan,
  )
  tested = run["tested"]
  return Trained(
      tested.params,
      tested.client_model,
      run["state"].meta,
      run["records"],
      run["wall_time_s"],
      run["compile_time_s"],
  )


# `fedacnnl.fedacnnl`, built once per configuration in a process: the runs
# that share one (Table II's four analytic columns of a seed and setting)
# reuse its compiled rounds wherever their shapes agree.
build_fedacnnl = functools.lru_cache(maxsize=16)(fedacnnl.fedacnnl)


def _build(variant: Variant):
  def build(hparams, fed: algorithm_lib.Federation) -> algorithm_lib.Algorithm:
    # Releases: the grouping's label counts (clustered), and every layer.
    private = privacy.from_settings(
        hparams, len(fed.model.stages) + variant.clustered
    )
    model = fed.model  # private: trained and tested on clipped rows
    if private.enabled:
      model = model.clone(row_clip=private.clip)
    algorithm = build_fedacnnl(
        model,
        num_classes=fed.num_classes,
        input_shape=fed.input_shape,
        mesh=fed.mesh,
        gamma=hparams.gamma,
        encoding_seed=fed.seed,
        statistics_dtype=hparams.statistics_dtype,
    )
    counts = fed.label_counts
    num_groups = hparams.num_groups if variant.clustered else 1
    noise_key = rng.stream(fed.key, "privacy")
    released = counts  # what the server sees of them (eq. 9's input)
    if private.enabled and variant.clustered:
      released = privacy.noisy_label_counts(
          jax.random.fold_in(noise_key, 0),
          counts,
          private.noise_multiplier * privacy.LABEL_COUNT_SENSITIVITY,
      )
    groups, grouping_s = pfedacnnl.assign_groups(
        released, algorithm, num_groups, fed.seed
    )
    groups = distributed.same_on_all_processes(groups)
    vectors = pfedacnnl.label_vectors(released, algorithm)  # the centroids'

    if variant.clustered:
      logging.info(
          "K-means grouping (eq. 8, 9) in %.3fs:\n%s",
          grouping_s,
          pfedacnnl.grouping_report(groups, counts),
      )
    secure = None
    if hparams.get("secure_sum"):
      secure = _secure_sum(hparams, fed, groups)
    layout = np.argsort(groups, kind="stable")
    data = fed.blocks("train", layout)
    expected = memory.estimate(
        fed.model,
        fed.input_shape,
        num_blocks=data.num_blocks,
        block_size=data.block_size,
        num_devices=len(fed.mesh.local_devices),
        num_groups=num_groups,
        personalized=variant.personalized,
        mesh_size=fed.mesh.size,
    )
    logging.info("%s (see afl/memory.py)", expected.describe())
    work = clock_lib.analytic_work(
        fed.model,
        fed.input_shape,
        fed.num_classes,
        hparams.statistics_dtype,
        fed.client_sizes,
    )
    summary = {
        "client_group": groups.tolist(),
        "group_sizes": np.bincount(groups).tolist(),
        "group_label_histograms": [
            counts[groups == k].sum(0).tolist() for k in range(groups.max() + 1)
        ],
        "grouping_time_s": grouping_s,
        "expected_peak_memory_gb": expected.peak / memory.GIB,
        "block_size": data.block_size,
        "privacy": private.summary(),
    }
    return rounds(
        algorithm,
        data,
        groups,
        eps=hparams.get("eps"),
        personalized=variant.personalized,
        work=work,
        adaptive=variant.adaptive,
        secure=secure,
        private=private,
        noise_key=noise_key,
    )._replace(
        summary=lambda state: dict(
            summary,
            server_state=server_state(state, vectors, groups).describe(),
            **({"secure_sum": secure.summary()} if secure else {}),
        ),
        files=lambda state: {
            SERVER_STATE: server_state(state, vectors, groups).to_bytes()
        },
        layout=layout,
        model=model if private.enabled else None,
    )

  return build


def _secure_sum(hparams, fed, groups) -> secure_sum_lib.SecureSum:
  """`--secure_sum`'s protocol for the run, its input bound checked
  against every client's data (ValueError naming the clients)."""
  bound = hparams.secure_sum_bound or secure_sum_lib.DATA_BOUNDS.get(
      fed.split.name
  )
  if not bound:
    raise ValueError(
        f"--secure_sum needs a bound on the inputs of --dataset="
        f"{fed.split.name}: set --secure_sum_bound"
    )
  secure_sum_lib.check_inputs(fed.inputs, fed.split.train_indices, bound)
  return secure_sum_lib.SecureSum(
      fed.key,
      groups,
      input_bound=bound,
      neighbours=hparams.secure_sum_neighbours,
      threshold=hparams.secure_sum_threshold,
  )


# The builders by name (`afl.registry`, declared in `afl.catalog`).
BUILDERS = {name: _build(variant) for name, variant in VARIANTS.items()}
