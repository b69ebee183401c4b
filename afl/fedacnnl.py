"""FedACnnL (section III, Algorithm 1): one closed-form round per layer.

Round l (0-based here, l = 1..L in the paper):
  1. every client pushes its data through the solved layers 1..l-1 and forms
     G_i = X_l^T X_l, H_i = X_l^T Z_l with Z_l = Y Q_l (eq. 6);
  2. the server sums them, A_0 = sum_i G_i, A_1 = sum_i H_i (eq. 4), and
     solves W_l = (A_0 + gamma I)^-1 A_1 (eq. 5);
  3. every client replaces layer l by W_l.
The result equals centralized ACnnL on the pooled data (eq. 4), whatever the
partition, client order, batch (block) size or initialization.

The same rounds, summed per group instead of globally, give pFedACnnL's
group meta-models (eq. 10, 11): `solve_layer` takes a block -> group map.
Params are stacked on a leading axis, one entry per model in use (1 for
FedACnnL, K for K groups).

Every solved layer is W_l = P_l Q_l, P_l = (A_0 + gamma I)^-1 X^T Y of width
d_y (see `solve`), so the rounds push data through the factors: the
algorithm's functions take *factored* params (`models.LayerwiseNet` with
`encodings`: layer l is P_l, d_y wide, followed by Q_l), the same function
as the full model at d_y / d_l of the cost per layer (on MNIST-MLP the
784 x 128 first layer becomes 784 x 10 and 10 x 128, which makes the
rounds after it about twice as fast). The last round forms the full
model's ordinary Flax params once, W_l = P_l Q_l (`expand`).

The builder `fedacnnl` returns the algorithm's pure functions, jitted, with
its configuration (model, gamma, label encodings, mesh) in the closure;
`solve_layer` is one round; `afl.analytic` composes the rounds into the
registered algorithms.
"""

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from afl import encoding
from afl import federated
from afl import layers
from afl import models
from afl import privacy
from afl import solve
from afl import statistics

Params = Any  # Flax params, stacked on a leading model axis

# eq. 13 takes the dual form (`solve.dual_solve`) for a client whose padded
# design rows are at most this fraction of the layer's width d: measured on
# MNIST's first layer (d = 785, blocks of 128 rows), 0.7 / 1.8 / 2.6 ms for
# 1 / 2 / 3 blocks against about 4 ms for the d x d system (which also needs
# the client's gram), while at 5 - 6 blocks the dual is slower. With the
# tiled statistics (3.0 ms a system) and 64-row blocks, widening it to 12
# blocks and 0.75 / 1.0 d rows made pFedACnnL's MNIST run 3-4% faster,
# within the noise, and tripled its compile time (machine E, 2026-12-08).
DUAL_ROWS_FRACTION = 0.5
MAX_DUAL_BLOCKS = 8  # bounds the static sizes compiled (one per block count)


class FedACnnL(NamedTuple):
  """FedACnnL's pure functions (see `fedacnnl`).

  Attributes:
    init: key -> factored params stacked [num_models, ...]: any
      initialization; every layer is overwritten before it is used.
    client_statistics: (layer, params, data, param_index, segment_index,
      num_segments, finalize=None, finalize_args=(), square=True) ->
      Statistics: eq. 6 for every block (of rows clipped to the model's
      row_clip, if set: `afl.privacy`), summed per segment, the gram
      square, or (square=False, static) as the tiles of its upper block
      triangle where it is wide (`statistics.gram_tiles`: what the pass
      forms; putting [S, d, d] together is a pass over them); or finalize
      (static) of each segment's sums, given with the tiles
      (`federated.segment_sum`; `--secure_sum`'s masked uploads,
      `afl.secure_sum.finalize_upload`).
    solve: (layer, params, data, param_index, segment_index, num_segments,
      reg, prior [S, d, d_y] or None, dual) -> `solve.Solved`: P_l
      [S, d, d_y], the label-space solution (W_l = P_l Q_l, see `solve`) of
      every segment's statistics (eq. 6 summed per segment), and the
      numeric guards' `solve.Diagnostics` [S] of each segment's system,
      formed by the same finalize that solves it (zeros for a segment
      without blocks; `solve.check` reads them): the server's eq. 5 / 11
      (segments: all clients or a group, reg = gamma, no prior) or a
      client's eq. 13 (reg = eps, the meta-model's P as prior). Each
      segment's statistics are solved as soon as they are complete and
      never stored (`federated.segment_sum`'s finalize), so a d x d sum
      exists only while it is formed; every device solves the segments it
      completes.
      With `dual` (static; the clients' eq. 13), a segment with at most
      d / 2 (padded) design rows lying on one device is solved in the dual
      form instead, from its rows (`federated.segment_apply`,
      `solve.dual_solve`): no d x d system. The server's segments (all
      clients, or a group) are large, and compiling the dual form's static
      sizes (one per block count) doubled the compile time of FedACnnL:
      `solve_layer` passes dual=False.
    solve_sums: (sums: Statistics [S] float64, reg, private=False) ->
      `solve.Solved` [S]: eq. 5 / 11 of given sums, segment s on device s
      mod D (the first layer's, which the server keeps: `afl.analytic`,
      `afl.editing`; with `private`, noisy sums, each gram projected onto
      the PSD cone first, `solve.private_segment_solve`, and reg [S] per
      segment).
    write_layer: (layer, params, P_l [num_models, d, d_y]) -> factored
      params with layer l set to P_l.
    factored: (P_l [num_models, d, d_y] for every layer) -> factored params
      with those layers.
    expand: (P_l [num_models, d, d_y] for every layer) -> the model's Flax
      params [num_models, ...], W_l = P_l Q_l (float32).
    model: the network.
    encodings: Q_l per layer (identity for the output layer).
    num_layers: L.
    gamma: the server's ridge coefficient.
  """

  init: Callable[..., Params]
  client_statistics: Callable[..., statistics.Statistics]
  solve: Callable[..., jax.Array]
  solve_sums: Callable[..., solve.Solved]
  write_layer: Callable[..., Params]
  factored: Callable[..., Params]
  expand: Callable[..., Params]
  model: models.LayerwiseNet
  encodings: tuple[jax.Array, ...]
  num_layers: int
  gamma: float


def layer_input_shapes(
    model: models.LayerwiseNet, input_shape
) -> tuple[tuple[int, ...], ...]:
  """The per-sample input shape of every trainable layer."""
  params = jax.eval_shape(
      lambda: models.init_params(model, jax.random.key(0), input_shape)
  )
  sample = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  return tuple(
      jax.eval_shape(
          functools.partial(model.apply, upto=l), params, sample
      ).shape[1:]
      for l in range(len(model.stages))
  )


def fedacnnl(
    model: models.LayerwiseNet,
    *,
    num_classes: int,
    input_shape,
    mesh: jax.sharding.Mesh,
    gamma: float = 100.0,
    encoding_seed: int = 0,
    rows_per_step: int = 1024,
    statistics_dtype=jnp.float32,
) -> FedACnnL:
  """Builds FedACnnL for `model`.

  Args:
    model: a LayerwiseNet.
    num_classes: d_y.
    input_shape: per-sample input shape, e.g. (28, 28, 1).
    mesh: device mesh with axis 'clients' that the data is sharded over.
    gamma: the ridge coefficient of eq. 1 / 5 (paper: 100).
    encoding_seed: the seed s broadcast to all clients (Algorithm 1, line 1).
    rows_per_step: see `statistics.segment_statistics`.
    statistics_dtype: of the clients' per-block products, float32 or
      float64 (see `statistics`); sums and solves are float64 either way.
  """
  if gamma <= 0:
    raise ValueError(f"gamma must be > 0, got {gamma}")
  encodings = encoding.label_encodings(encoding_seed, model, num_classes)
  input_shapes = layer_input_shapes(model, input_shape)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  @functools.partial(
      jax.jit, static_argnames="num_models", out_shardings=replicated
  )
  def init(key: jax.Array, num_models: int = 1) -> Params:
    # Computed on every device of the mesh (which may span processes).
    params = models.init_params(model, key, input_shape, encodings)
    return jax.tree.map(
        lambda a: jnp.broadcast_to(a, (num_models,) + a.shape), params
    )

  def segment_sums(
      layer,
      params,
      data,
      param_index,
      segment_index,
      num_segments,
      finalize=None,
      finalize_args=(),
      square=True,
  ):
    sums = statistics.segment_statistics(
        model,
        layer,
        params,
        data,
        param_index,
        segment_index,
        num_segments,
        num_classes,
        mesh,
        rows_per_step,
        statistics_dtype,
        finalize,
        finalize_args,
        encodings,
    )
    return statistics.assembled(sums) if square and not finalize else sums

  client_statistics = functools.partial(
      jax.jit, static_argnames=("layer", "num_segments", "finalize", "square")
  )(segment_sums)

  @functools.partial(jax.jit, static_argnames=("layer", "num_segments", "dual"))
  def solve_segments(
      layer,
      params,
      data,
      param_index,
      segment_index,
      num_segments,
      reg,
      prior=None,
      dual=True,
  ):
    # A segment of at most `small` blocks takes the dual form (its rows
    # together, `solve.dual_solve`); the others are summed and solved as
    # soon as their statistics are complete.
    block, positions, width = statistics.design_shape(
        model, layer, params, data, encodings
    )
    if prior is None:
      prior = jnp.zeros((num_segments, width + 1, num_classes), jnp.float64)
    small = dual and min(
        MAX_DUAL_BLOCKS,
        int(DUAL_ROWS_FRACTION * (width + 1)) // (block * positions),
    )
    dual_solved = None
    if small:

      def dual_one(params, x, y, mask, segment, args):
        reg, prior = args
        # As in `statistics.block_statistics`: raw padding rows are zero.
        rows = layers.design_rows(
            model.stages[layer].layer,
            model.apply(params, x, upto=layer, encodings=encodings),
            None if layer == 0 else mask,
        )  # [n, positions, d - 1]
        if model.row_clip is not None:  # as `statistics.block_statistics`
          rows = privacy.clip_rows(rows, model.row_clip)
        row_mask = jnp.broadcast_to(mask[:, None], rows.shape[:2]).reshape(-1)
        design = jnp.concatenate(  # X [n * positions, d], bias last
            [rows.reshape(len(row_mask), width), row_mask[:, None]], 1
        ).astype(statistics_dtype)
        labels = (
            jax.nn.one_hot(
                jnp.broadcast_to(y[:, None], rows.shape[:2]).reshape(-1),
                num_classes,
            )
            * row_mask[:, None]
        )
        return solve.dual_solve(design, labels, reg, prior[segment])

      dual_solved, taken = federated.segment_apply(
          dual_one,
          params,
          data,
          param_index,
          segment_index,
          num_segments,
          mesh,
          small,
          (reg, prior),
      )
      segment_index = jnp.where(taken, -1, segment_index)

    def finalize(stats, segment, args):
      reg, prior = args
      return solve.segment_solve(stats, reg, prior[segment])

    solved = segment_sums(
        layer,
        params,
        data,
        param_index,
        segment_index,
        num_segments,
        finalize,
        (reg, prior),
    )
    if dual_solved is not None:  # each segment is solved one way, zeros else
      solved = jax.tree.map(jnp.add, dual_solved, solved)
    return solved

  @functools.partial(
      jax.jit, static_argnames="private", out_shardings=replicated
  )
  def solve_sums(
      sums: statistics.Statistics, reg, private: bool = False
  ) -> solve.Solved:
    present = jnp.ones(len(sums.label_counts), bool)
    if private:  # reg: [S], each segment's own
      segment_solve = lambda stats, segment, reg: solve.private_segment_solve(
          stats, reg[segment]
      )
    else:
      segment_solve = lambda stats, segment, reg: solve.segment_solve(
          stats, reg
      )
    return federated.finalize_each(
        segment_solve,
        sums,
        present,
        reg,
        mesh,
    )

  def layer_params(layer, solution, factored):
    """Flax params of layer `layer` from P_l [..., d, d_y]: the factor, or
    the full W_l = P_l Q_l."""
    stage = model.stages[layer].layer
    channels = input_shapes[layer][-1]
    if factored:
      return layers.to_params(
          models.factored_layer(stage, encodings[layer]), solution, channels
      )
    return layers.to_params(stage, solution, channels, encodings[layer])

  @functools.partial(jax.jit, static_argnames="layer", donate_argnums=1)
  def write_layer(layer, params, solution):
    inner = dict(params["params"])
    inner[models.layer_name(layer)] = layer_params(layer, solution, True)
    return {**params, "params": inner}

  def all_layers(factored):
    @jax.jit
    def params_of(solutions):
      return {
          "params": {
              models.layer_name(layer): layer_params(layer, solution, factored)
              for layer, solution in enumerate(solutions)
          }
      }

    return params_of

  return FedACnnL(
      init,
      client_statistics,
      solve_segments,
      solve_sums,
      write_layer,
      all_layers(True),
      all_layers(False),
      model,
      encodings,
      len(model.stages),
      gamma,
  )


def solve_layer(
    algorithm: FedACnnL,
    data: federated.FederatedData,
    layer: int,
    params: Params,
    block_group: jax.Array,
    num_groups: int,
    segment: jax.Array | None = None,
) -> solve.Solved:
  """Round `layer` of FedACnnL: every client's eq. 6 statistics through the
  solved layers, summed per group and solved (eq. 5, or eq. 11 per group).

  Args:
    algorithm: from `fedacnnl`.
    data: training blocks, sharded over the algorithm's mesh.
    layer: l (0-based).
    params: factored params [num_groups, ...] with layers < l solved.
    block_group: [num_blocks] the group of each block's client (zeros for
      one global model).
    num_groups: K.
    segment: [num_blocks] the group whose sums each block goes to, -1 for
      a block of a client that did not report (`afl.participation`); None:
      block_group.

  Returns:
    P_l [num_groups, d, d_y] and the solves' Diagnostics [num_groups].
  """
  return algorithm.solve(
      layer,
      params,
      data,
      block_group,
      block_group if segment is None else segment,
      num_groups,
      algorithm.gamma,
      dual=False,
  )
