"""Label encoding (section II-B, III-B initialization, eq. 8).

From one shared seed every client builds the same Q_l ~ N(0, 1) of shape
d_y x d_l for each hidden trainable layer l < L; the pseudo labels are
Z_l = Y Q_l. The output layer fits the one-hot labels themselves (Z_L = Y), so
its "encoding" is the identity; keeping it in the same list lets every layer
use H_l = X_l^T Z_l = (X_l^T Y) Q_l.
"""

import jax
import jax.numpy as jnp

from afl import models


def output_widths(model: models.LayerwiseNet) -> tuple[int, ...]:
  """d_l, the output width of every trainable layer."""
  return tuple(stage.layer.features for stage in model.stages)


def label_encodings(
    seed: int, model: models.LayerwiseNet, num_classes: int
) -> tuple[jax.Array, ...]:
  """Q_1 .. Q_{L-1} drawn from `seed`, then the identity for the output layer.

  Returns:
    One float64 array per trainable layer, [num_classes, d_l]. Drawn in
    float32 (what a client would draw) so the values do not depend on x64.
  """
  key = jax.random.key(seed)
  widths = output_widths(model)
  encodings = tuple(
      jax.random.normal(
          jax.random.fold_in(key, l), (num_classes, width), jnp.float32
      ).astype(jnp.float64)
      for l, width in enumerate(widths[:-1])
  )
  return encodings + (jnp.eye(num_classes, widths[-1], dtype=jnp.float64),)
