"""Client statistics G_i = X_l^T X_l and H_i = X_l^T Z_l (eq. 6), and their sums.

What a client computes is `block_statistics`: for one block of its samples,
push them through the already-solved layers 1..l-1 and form the Gram matrix of
the layer's design rows and their per-class sums. Since Z_l = Y Q_l (eq. 2's
label encoding), H = X^T Z = (X^T Y) Q_l; we keep S = X^T Y (d x num_classes)
and apply Q_l on the server side, which is the same number and cheaper because
num_classes <= d_l. Batching never changes the sums (the weight-invariant
property, section III-B).

How clients are mapped is `federated.segment_sum`, which `segment_statistics`
calls: blocks sharded over devices, scanned on each, every block
folded into the sum of its segment (its client, its group, or one global
segment) as soon as it is produced. Memory is O(num_segments d^2) plus one
chunk of blocks, never O(num_blocks d^2).

The Gram matrix is symmetric, so a block forms only its lower block
triangle (a syrk): the columns are cut into GRAM_TILES tiles, and row
tile a is the product of tile a's columns with columns 0 .. of tile a's
end (`gram_tiles`), about (T + 1) / 2T of the full product's
multiplications. The tiles are summed like any other statistic; a solve
reads them as they are (the lower triangle is what a lower Cholesky
factorization reads, and G x is formed tile by tile: `Statistics`), and
`Statistics.square` puts the symmetric matrix together where one is
needed. Measured on one core for 28 steps of 1,024 rows of MNIST against
the bare product of the same rows (machine E, 2026-12-08): upper row
tiles with 2 / 3 / 4 / 5 / 8 tiles 0.91 / 0.81 / 0.78 / 0.81 / 0.93 (ideal
0.75 / 0.67 / 0.63 / 0.60 / 0.56: narrower products run less
efficiently), with 4 tiles lower rows 0.82, upper rows 0.84, lower
columns 0.89 in one run; the full product 1.07. A narrow layer (d <
MIN_TILED) keeps the full product.

Precision: the forward pass is float32 (the model's dtype); each block's
products are float32 (fast) or float64 (`dtype`), and every block's result
is converted to float64 before it is accumulated (this needs
jax_enable_x64, which importing `afl` turns on); the solves are float64, or a
float32 factorization refined with a float64 residual where the system is
provably well-conditioned (`afl.solve`).
Accumulating all blocks in float32 would lose about 1e-5 of relative
accuracy, which the conditioning of eq. 5 (about 2e4 on MNIST with
gamma = 100) amplifies in the weights. Measured against a float64 reference:
float32 products give MNIST-MLP weights within about 5e-6 (relative); image
patches are far worse conditioned, and a small conv net on CIFAR-10 is then
off by about 1e-4 in its first layer, while float64 products bring it to
1e-7 at a few times the cost on CPU.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from afl import federated
from afl import layers
from afl import models
from afl import privacy

GRAM_TILES = 4
MIN_TILED = 256  # narrower Grams are cheap and stay one product


def gram_tiles(flat: jax.Array) -> tuple[jax.Array, ...]:
  """flat [n, d] -> the row tiles of the lower block triangle of flat^T flat:
  tile a is [t_a, a t + t_a] (t = ceil(d / GRAM_TILES), t_a = t but for the
  last), rows a t .. a t + t_a and columns 0 .. a t + t_a of the Gram."""
  d = flat.shape[-1]
  t = -(-d // GRAM_TILES)
  contract_rows = (((0,), (0,)), ((), ()))
  return tuple(
      jax.lax.dot_general(flat[:, s : s + t], flat[:, : s + t], contract_rows)
      for s in range(0, d, t)
  )


def lower_gram(tiles: tuple[jax.Array, ...]) -> jax.Array:
  """`gram_tiles`' tiles [..., t_a, a t + t_a] (summed or not) -> [..., d, d]:
  the Gram's lower block triangle, zeros above it (all that a lower
  Cholesky factorization reads)."""
  d = tiles[-1].shape[-1]
  return jnp.concatenate(
      [
          jnp.pad(tile, [(0, 0)] * (tile.ndim - 1) + [(0, d - tile.shape[-1])])
          for tile in tiles
      ],
      -2,
  )


def assemble_gram(tiles: tuple[jax.Array, ...]) -> jax.Array:
  """`gram_tiles`' tiles -> the symmetric Gram [..., d, d]."""
  lower = lower_gram(tiles)
  block = np.arange(lower.shape[-1]) // tiles[0].shape[-1]
  return jnp.where(
      block[:, None] >= block[None, :], lower, jnp.swapaxes(lower, -1, -2)
  )


def gram_times(tiles: tuple[jax.Array, ...], x: jax.Array) -> jax.Array:
  """G x [..., d, k] of the Gram in `gram_tiles`' tiles, without putting it
  together: block row a is tile a times x's first a t + t_a rows, plus the
  mirror of the later tiles' columns of block a."""
  t = tiles[0].shape[-1]
  starts = [a * t for a in range(len(tiles))]
  rows = []
  for a, (tile, start) in enumerate(zip(tiles, starts)):
    size = tile.shape[-2]
    row = tile @ x[..., : start + size, :]
    for later, begin in zip(tiles[a + 1 :], starts[a + 1 :]):
      mirrored = jnp.swapaxes(later[..., :, start : start + size], -1, -2)
      row += mirrored @ x[..., begin : begin + later.shape[-2], :]
    rows.append(row)
  return jnp.concatenate(rows, -2)


def gram_diagonal(tiles: tuple[jax.Array, ...]) -> jax.Array:
  """[..., d] the Gram's diagonal, from `gram_tiles`' tiles."""
  t = tiles[0].shape[-1]
  return jnp.concatenate(
      [
          jnp.diagonal(tile[..., :, a * t :], axis1=-2, axis2=-1)
          for a, tile in enumerate(tiles)
      ],
      -1,
  )


class Statistics(NamedTuple):
  """Summed statistics of one layer, one entry per segment.

  A design row is x = [r, 1] (the layer input r and the bias 1; see
  `layers`), so G = sum x x^T and S = sum x y^T are assembled from sums over
  the rows r alone, which avoids materializing a column of ones. Every real
  row has exactly one label and padding rows are zero, so sum r is the row
  sum of `label_sums` and needs no pass of its own.

  Attributes:
    gram: [S, d - 1, d - 1] float64, sum of r r^T; or, as
      `segment_statistics` gives it, a tuple of the tiles of its upper
      block triangle [S, t, d - 1 - a t] (`gram_tiles`; `square` puts them
      together).
    label_sums: [S, d - 1, num_classes] float64, sum of r y^T.
    label_counts: [S, num_classes] float64, number of rows of each class.
  """

  gram: jax.Array
  label_sums: jax.Array
  label_counts: jax.Array

  def square(self) -> jax.Array:
    """[S, d - 1, d - 1] sum of r r^T, put together if `gram` holds the
    tiles of its lower block triangle (`gram_tiles`)."""
    if isinstance(self.gram, tuple):
      return assemble_gram(self.gram)
    return self.gram

  def _bias_parts(self):
    """(row sums [S, d - 1], count [S]): the bias row of G."""
    return self.label_sums.sum(-1), self.label_counts.sum(-1)

  def full_gram(self) -> jax.Array:
    """[S, d, d] G = X_l^T X_l with the bias column (A_0 of eq. 5)."""
    row_sums, count = self._bias_parts()
    top = jnp.concatenate([self.square(), row_sums[..., :, None]], -1)
    bottom = jnp.concatenate([row_sums, count[..., None]], -1)[..., None, :]
    return jnp.concatenate([top, bottom], -2)

  def lower_system(self, reg, dtype) -> jax.Array:
    """[S, d, d] in `dtype`, whose lower triangle is G + reg I's (with the
    bias row; above it, zeros or G's): what a lower Cholesky factorization
    reads, formed from the tiles in one pass."""
    row_sums, count = self._bias_parts()
    if isinstance(self.gram, tuple):
      inner = lower_gram(self.gram)
    else:
      inner = self.gram
    top = jnp.concatenate([inner, jnp.zeros_like(row_sums)[..., :, None]], -1)
    bottom = jnp.concatenate([row_sums, count[..., None]], -1)[..., None, :]
    system = jnp.concatenate([top, bottom], -2).astype(dtype)
    return system + reg * jnp.eye(system.shape[-1], dtype=dtype)

  def gram_times(self, x: jax.Array) -> jax.Array:
    """G x [S, d, k] (G with the bias row, x [S, d, k]), from the tiles."""
    row_sums, count = self._bias_parts()
    top, bias = x[..., :-1, :], x[..., -1:, :]
    if isinstance(self.gram, tuple):
      inner = gram_times(self.gram, top)
    else:
      inner = self.gram @ top
    return jnp.concatenate(
        [
            inner + row_sums[..., :, None] * bias,
            row_sums[..., None, :] @ top + count[..., None, None] * bias,
        ],
        -2,
    )

  def trace(self) -> jax.Array:
    """[S] trace(G), G with the bias row."""
    if isinstance(self.gram, tuple):
      diagonal = gram_diagonal(self.gram)
    else:
      diagonal = jnp.diagonal(self.gram, axis1=-2, axis2=-1)
    return diagonal.sum(-1) + self._bias_parts()[1]

  def labels(self) -> jax.Array:
    """[S, d, d_y] X_l^T Y with the bias row."""
    return jnp.concatenate(
        [self.label_sums, self.label_counts[..., None, :]], -2
    )

  def cross(self, encoding: jax.Array) -> jax.Array:
    """[S, d, d_l] H = X_l^T Z_l = (X_l^T Y) Q_l (A_1 of eq. 5)."""
    return self.labels() @ encoding


def block_statistics(
    model: models.LayerwiseNet,
    layer: int,
    params,
    x: jax.Array,
    y: jax.Array,
    mask: jax.Array,
    num_classes: int,
    dtype=jnp.float32,
    encodings=None,
    tiled: bool = False,
) -> Statistics:
  """One client's batch: eq. 6's summand for layer `layer`.

  Args:
    model: the network.
    layer: index l of the layer being trained (0-based).
    params: Flax params whose layers 0..l-1 are solved (the rest unused);
      factored with `encodings` (see `models.LayerwiseNet`).
    x: [B, *feature_shape] float32 raw inputs.
    y: [B] int32 labels.
    mask: [B] bool.
    num_classes: d_y.
    dtype: of the products (float32 or float64).
    encodings: None, or the Q_l of factored params.
    tiled: the Gram as `gram_tiles` (when d - 1 >= MIN_TILED) instead of
      the full [d - 1, d - 1].

  Returns:
    Statistics of this batch (no segment axis), in `dtype`.
  """
  inputs = model.apply(params, x, upto=layer, encodings=encodings)
  # Padding samples of the raw input are zero (`FederatedData`); deeper
  # inputs are not (the bias), so only they need masking. Skipping it at
  # layer 0 saves a pass over the largest array.
  rows = layers.design_rows(
      model.stages[layer].layer, inputs, None if layer == 0 else mask
  ).astype(dtype)
  if model.row_clip is not None:  # a private run's (`afl.privacy`)
    rows = privacy.clip_rows(rows, model.row_clip)
  flat = rows.reshape(-1, rows.shape[-1])  # [B * positions, d - 1]
  contract_rows = (((0,), (0,)), ((), ()))
  onehot = jax.nn.one_hot(y, num_classes, dtype=rows.dtype)
  onehot = onehot * mask[:, None].astype(rows.dtype)
  if tiled and flat.shape[-1] >= MIN_TILED:
    gram = gram_tiles(flat)
  else:
    gram = jax.lax.dot_general(flat, flat, contract_rows)
  return Statistics(
      gram=gram,
      label_sums=jax.lax.dot_general(rows.sum(1), onehot, contract_rows),
      label_counts=onehot.sum(0) * rows.shape[1],
  )


def design_shape(
    model: models.LayerwiseNet,
    layer: int,
    params,
    data: federated.FederatedData,
    encodings=None,
) -> tuple[int, int, int]:
  """(block size, design rows per sample, d - 1) of layer `layer`'s rows."""
  return jax.eval_shape(
      lambda p, x: layers.design_rows(
          model.stages[layer].layer,
          model.apply(p, x, upto=layer, encodings=encodings),
          None,
      ),
      jax.tree.map(lambda a: a[0], params),
      data.x[0],
  ).shape


def segment_statistics(
    model: models.LayerwiseNet,
    layer: int,
    params,
    data: federated.FederatedData,
    param_index: jax.Array,
    segment_index: jax.Array,
    num_segments: int,
    num_classes: int,
    mesh: jax.sharding.Mesh,
    rows_per_step: int = 1024,
    dtype=jnp.float32,
    finalize=None,
    finalize_args=(),
    encodings=None,
) -> Statistics:
  """eq. 6 for every block, summed per segment, over a device mesh.

  Args:
    model: the network.
    layer: index of the layer being trained.
    params: Flax params stacked on a leading axis, one entry per model in use
      (1 for FedACnnL; one per group or client in pFedACnnL).
    data: the blocks, sharded over `mesh` (see `federated.shard`).
    param_index: [num_blocks] int32, which stacked model each block uses.
    segment_index: [num_blocks] int32 in [0, num_segments): where each
      block's statistics are summed (its client, its group, or 0).
    num_segments: S.
    num_classes: d_y.
    mesh: the device mesh with axis 'clients'.
    rows_per_step: design rows per step when blocks can be merged (see
      `federated.segment_sum`); a conv layer has H*W rows per sample.
    dtype: of the per-block products (see the module docstring).
    finalize, finalize_args: see `federated.segment_sum`: what is kept of
      each segment's complete Statistics (e.g. its solve) instead of them.
    encodings: None, or the Q_l of factored params.

  Returns:
    Statistics with [S, ...] float64 entries, the gram as tiles when d - 1
    >= MIN_TILED (`Statistics.square`), or finalize's results [S, ...]
    (finalize gets each segment's Statistics so), replicated on every
    device.
  """
  block_fn = functools.partial(
      block_statistics,
      model,
      layer,
      num_classes=num_classes,
      dtype=dtype,
      encodings=encodings,
      tiled=True,
  )
  positions = design_shape(model, layer, params, data, encodings)[1]
  return federated.segment_sum(
      block_fn,
      params,
      data,
      param_index,
      segment_index,
      num_segments,
      mesh,
      max(1, rows_per_step // positions),
      finalize,
      finalize_args,
  )


def assembled(stats: Statistics) -> Statistics:
  """`stats` with the square gram (`Statistics.square`)."""
  return stats._replace(gram=stats.square())


def client_statistics_loop(
    model: models.LayerwiseNet,
    layer: int,
    params,
    client_x,
    client_y,
    num_classes: int,
) -> Statistics:
  """Reference path: a Python loop over clients, each client in one batch.

  Exists to test `segment_statistics` against; not for hot paths.

  Args:
    client_x: list of [n_i, *feature_shape] arrays.
    client_y: list of [n_i] label arrays.

  Returns:
    Statistics with one segment per client.
  """
  fn = jax.jit(
      functools.partial(
          block_statistics, model, layer, params, num_classes=num_classes
      )
  )
  per_client = [
      jax.tree.map(
          lambda a: a.astype(jnp.float64),
          fn(
              jnp.asarray(x, jnp.float32),
              jnp.asarray(y),
              jnp.ones(len(y), bool),
          ),
      )
      for x, y in zip(client_x, client_y)
  ]
  return jax.tree.map(lambda *a: jnp.stack(a), *per_client)
