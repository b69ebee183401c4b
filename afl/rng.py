"""One root key per run, split into named streams.

Every random draw of a run comes from `jax.random.key(config.seed)` through
a stream named after its purpose (big_vision style: one root key, then
`fold_in`): `stream(root, "init")` for the initial weights, `round_key(root,
index)` for what round `index` draws (batches, perturbations), and so on.
A stream's index is the CRC-32 of its name, so adding a stream never moves
the others and two purposes never share a key by accident (a table of small
integers did: round 1's key was the clock's).

Host-side draws that need a NumPy generator (`numpy_rng`) derive its seed
from the same stream. Two seeds are the root *integer* itself, as the paper's
protocol has them broadcast: the label encodings Q_l (Algorithm 1, line 1,
`afl.encoding`) and the server's K-means (eq. 8, 9); the data split has its
own integer seed (`--data_seed`, default the root seed; `afl.data`).
"""

import zlib

import jax
import numpy as np


def stream(root: jax.Array, name: str) -> jax.Array:
  """The key of the stream `name` under `root`."""
  return jax.random.fold_in(root, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def round_key(root: jax.Array, index: int) -> jax.Array:
  """The key of round `index` (1-based) of the stream "rounds"."""
  return jax.random.fold_in(stream(root, "rounds"), index)


def numpy_rng(root: jax.Array, name: str) -> np.random.Generator:
  """A NumPy generator seeded from the stream `name`."""
  return np.random.default_rng(
      np.asarray(jax.random.key_data(stream(root, name))).astype(np.uint64)
  )
