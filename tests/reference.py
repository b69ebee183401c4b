"""Float64 numpy references, written independently of the JAX engine.

Centralized ACnnL (eq. 1, 2) on pooled data: push all samples through the
solved layers, form X^T X and X^T Z in float64, solve with numpy. Conv layers
use an im2col built from numpy's sliding windows, not from
`lax.conv_general_dilated_patches`, so a wrong patch order or kernel layout in
the engine shows up as a mismatch.
"""

import jax
import numpy as np

from afl import layers
from afl import models


def im2col(x: np.ndarray, kernel_size: int) -> np.ndarray:
  """[N, H, W, C] -> [N, H*W, C*k*k] 'SAME'-padded patches, (c, kh, kw) order."""
  pad = (kernel_size - 1) // 2
  padded = np.pad(
      x,
      (
          (0, 0),
          (pad, kernel_size - 1 - pad),
          (pad, kernel_size - 1 - pad),
          (0, 0),
      ),
  )
  windows = np.lib.stride_tricks.sliding_window_view(
      padded, (kernel_size, kernel_size), axis=(1, 2)
  )  # [N, H, W, C, k, k]
  n, h, w = x.shape[:3]
  return windows.reshape(n, h * w, -1)


def apply_stage(
    stage: models.Stage,
    rows: np.ndarray,
    weights: np.ndarray,
    spatial: tuple[int, int] | None,
) -> np.ndarray:
  """f_l(X_l W_l) for a layer whose design rows (with bias 1) are `rows`."""
  out = rows @ weights  # [N, positions, d_out]
  if stage.activation == "relu":
    out = np.maximum(out, 0)
  elif stage.activation == "leaky_relu":
    out = np.where(out > 0, out, models.LEAKY_RELU_SLOPE * out)
  if spatial is None:
    return out[:, 0]
  n = out.shape[0]
  out = out.reshape(n, *spatial, -1)
  if stage.pool == models.GLOBAL_POOL:
    return out.mean(axis=(1, 2))
  if stage.pool > 1:
    p = stage.pool
    h, w = spatial
    out = out.reshape(n, h // p, p, w // p, p, -1).mean(axis=(2, 4))
  return out


def design(stage: models.Stage, x: np.ndarray):
  """(rows [N, positions, d] with the bias column, spatial shape or None)."""
  if isinstance(stage.layer, models.Conv):
    rows = im2col(x, stage.layer.kernel_size)
    spatial = x.shape[1:3]
  else:
    rows = x.reshape(len(x), 1, -1)
    spatial = None
  ones = np.ones(rows.shape[:-1] + (1,))
  return np.concatenate([rows, ones], -1), spatial


def centralized_acnnl(
    model: models.LayerwiseNet,
    x: np.ndarray,
    y: np.ndarray,
    encodings,
    gamma: float,
    priors=None,
) -> list:
  """Per-layer W_l [d, d_out] (bias last row) of ACnnL on the pooled data.

  With `priors` (one W per layer), each layer is shrunk towards its prior
  instead of towards 0: pFedACnnL's personalization (eq. 13) on one client's
  data, with gamma playing eps.
  """
  h = np.asarray(x, np.float64)
  onehot = np.eye(encodings[-1].shape[0])[y]
  priors = priors or [0.0] * len(model.stages)
  weights = []
  for stage, q, prior in zip(model.stages, encodings, priors):
    rows, spatial = design(stage, h)
    flat = rows.reshape(-1, rows.shape[-1])
    targets = np.repeat(onehot @ np.asarray(q, np.float64), rows.shape[1], 0)
    w = np.linalg.solve(
        flat.T @ flat + gamma * np.eye(flat.shape[1]),
        flat.T @ targets + gamma * prior,
    )
    weights.append(w)
    h = apply_stage(stage, rows, w, spatial)
  return weights


def relative_error(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def solved_weights(model: models.LayerwiseNet, params, index: int = 0) -> list:
  """Per-layer W_l [d, d_out] (bias last row) of stacked model `index`."""
  inner = jax.tree.map(lambda a: np.asarray(a[index]), params)["params"]
  return [
      np.asarray(layers.from_params(stage.layer, inner[models.layer_name(l)]))
      for l, stage in enumerate(model.stages)
  ]
