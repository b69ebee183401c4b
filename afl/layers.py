"""A trainable layer seen as a least-squares problem (eq. 1, 2 and Fig. 1).

Layer l maps an input row x to x W_l. For a Dense layer a row is one sample's
flattened input; for a Conv layer (Fig. 1) a row is one ks x ks x C_in patch
around an output position (im2col, via `lax.conv_general_dilated_patches`), so
each sample contributes H x W rows that all share the sample's pseudo label.

Bias convention: every row is extended by a constant 1, and W_l has one more
row than the kernel: W_l = [kernel; bias], (d_in + 1) x d_out. The ridge term
gamma ||W_l||^2 of eq. 1 therefore regularizes the bias like any other weight,
exactly as if the data matrix had a column of ones (ACnnL's formulation).

Patch features come out channel-major, (C_in, kh, kw); `to_params` and
`from_params` convert between that order and Flax's HWIO kernels.
"""

import jax
import jax.numpy as jnp

from afl import models


def input_width(layer: models.Dense | models.Conv, input_shape) -> int:
  """d_l: the width of a design row (with its bias 1) for this layer."""
  if isinstance(layer, models.Dense):
    size = 1
    for dim in input_shape:
      size *= dim
    return size + 1
  return layer.kernel_size**2 * input_shape[-1] + 1


def design_rows(
    layer: models.Dense | models.Conv, x: jax.Array, mask: jax.Array | None
) -> jax.Array:
  """The rows X_l^{b} of eq. 6 for a batch, without the bias column.

  Args:
    layer: the trainable layer.
    x: [B, d_in] (Dense) or [B, H, W, C_in] (Conv): the layer's input.
    mask: [B] bool, False for padding samples; None when x is already zero
      there.

  Returns:
    [B, positions, d - 1]: positions = 1 for Dense, H*W for Conv; rows of
    masked samples are zero. The bias column of ones is implicit: see
    `statistics.Statistics` for how it enters G and H.
  """
  if isinstance(layer, models.Conv):
    k = layer.kernel_size
    patches = jax.lax.conv_general_dilated_patches(
        x, (k, k), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    rows = patches.reshape(x.shape[0], -1, patches.shape[-1])
  else:
    rows = x[:, None, :]
  if mask is None:
    return rows
  return rows * mask[:, None, None].astype(rows.dtype)


def to_params(
    layer: models.Dense | models.Conv,
    weights: jax.Array,
    input_channels: int | None = None,
    encoding: jax.Array | None = None,
) -> dict[str, jax.Array]:
  """Flax {'kernel', 'bias'} (float32) from a solved W_l [..., d, d_out].

  Leading axes (e.g. one per group or client) are kept. With `encoding`
  Q [k, d_out], `weights` is the label-space P [..., d, k] and the params
  are those of W = P Q, multiplied in float32 (what is stored) after the
  kernel and bias rows are split: no [..., d, d_out] float64 product to
  slice and convert (for pFedACnnL's 100 first layers, 80 MB: 0.07 s
  against 0.01 s measured).
  """
  kernel, bias = weights[..., :-1, :], weights[..., -1, :]
  if encoding is not None:
    encoding = encoding.astype(jnp.float32)
    kernel = kernel.astype(jnp.float32) @ encoding
    bias = bias.astype(jnp.float32) @ encoding
  if isinstance(layer, models.Conv):
    k = layer.kernel_size
    lead = kernel.shape[:-2]
    kernel = kernel.reshape(lead + (input_channels, k, k, layer.features))
    n = len(lead)
    kernel = jnp.moveaxis(kernel, n, n + 2)  # (C_in, kh, kw) -> (kh, kw, C_in)
  return {
      "kernel": kernel.astype(jnp.float32),
      "bias": bias.astype(jnp.float32),
  }


def from_params(
    layer: models.Dense | models.Conv, params: dict[str, jax.Array]
) -> jax.Array:
  """The inverse of `to_params`: W_l [..., d, d_out] from Flax params."""
  kernel = params["kernel"]
  if isinstance(layer, models.Conv):
    n = kernel.ndim - 4
    kernel = jnp.moveaxis(kernel, n + 2, n)  # (kh, kw, C_in) -> (C_in, kh, kw)
    kernel = kernel.reshape(kernel.shape[:n] + (-1, layer.features))
  return jnp.concatenate([kernel, params["bias"][..., None, :]], axis=-2)
