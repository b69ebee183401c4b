"""Secure sum of the analytic uploads: a simulation of SecAgg+'s arithmetic.

FedACnnL's server needs only sums (eq. 4: A_0 = sum_i G_i, A_1 = sum_i
H_i; pFedACnnL's per group, eq. 10), so it need not see any client's
statistics: with secure aggregation (Bonawitz et al. 2017, "Practical
Secure Aggregation"; its sparse form SecAgg+, Bell et al. 2020) each client
uploads its statistics under random masks that cancel in the sum. This
module simulates the protocol's arithmetic and cryptography end to end in
one process: the server-side functions see only masked uploads, their sum
and the shares that surviving clients hand over.

Encoding (fixed point in the ring Z_{2^64}). A client's statistics of layer
l are G_i = sum r r^T, S_i = sum r y^T and its label counts
(`statistics.Statistics`), summed over its design rows r. If every entry of
every row satisfies |r_j| <= M_l (the row bound) and the clients hold R
design rows in all, every entry of the sum over all clients is at most R M_l^2
(gram), R M_l (label sums) or R (counts) in magnitude. Each field f is
encoded as q = round(x * s_f) mod 2^64 with s_f the largest power of two
with s_f * bound_f <= 2^62, so the integer sum of the q's cannot leave
(-2^63, 2^63) (a factor 2 to spare for the float32 forward pass) and reads
back exactly as a signed 64-bit integer; dividing by s_f decodes it. Each
client's rounding is at most 1 / (2 s_f) per entry, so a decoded sum of n
clients differs from the float64 sum of their statistics by at most
n / (2 s_f) per entry (`Encoding.quantization_bound`), besides float64's
own rounding of the result (the plain sum has that too). Counts are
integers and their scale a power of two: they are exact.

The row bound: layer 1's rows are the raw inputs, whose range is public
(MNIST's pixels in [0, 1], `DATA_BOUNDS`, or `--secure_sum_bound`; every
client checks its inputs against it, `check_inputs`). A later layer's rows
are f(W [r, 1]) of the previous layer's (with average pooling and patches,
which never exceed their inputs' largest entry, and f = identity, ReLU or
leaky ReLU, |f(z)| <= |z|), so M_{l+1} = max_k (M_l ||W_{:-1,k}||_1 +
|W_{-1,k}|) from the solved, public W_l (`row_bound`). Under differential
privacy (clipped rows, then noise) the clip norm c bounds the rows (M <= c);
noise added before encoding (`privatize`, the hook) widens the bound by its
tail, which whoever adds it must add to the bound.

Masks. Every client i of a group has k neighbours N(i) in the group, a
Harary graph on a random ring (SecAgg+: k = O(log n) instead of n - 1;
each client at ring offsets +-1 .. +-k/2; a group of at most k + 1 clients
is complete). Once per run each client draws an X25519 key pair and every
pair of neighbours agrees on a seed s_ij = HKDF-SHA256(X25519(sk_i, pk_j))
(`cryptography`); each client Shamir-shares its private key among its
neighbours with threshold t (pycryptodome's `Shamir` shares 16-byte
secrets: the 32-byte key is shared as two halves). In round r every
sampled client i draws a fresh self-mask seed b_i, shares it likewise, and
uploads

  y_i = q_i + PRG(b_i, r) + sum_{j in N(i), j sampled} sign_ij PRG(s_ij, r)

with sign_ij = +1 if i < j, else -1, so the pairwise masks of two clients
that both upload cancel in their group's sum. PRG(seed, r) is JAX's
threefry (counter-based), keyed by the seed and the round, expanded on the
devices into uint64 words: each client's upload is formed as soon as its
statistics are complete, in the same pass over the data on the device that
formed them (`finalize_upload`, a device loop over its k + 1 seeds), and
only the [C, m] uploads leave the pass (MNIST-MLP's first layer: m =
315,570, 2.5 MB a client; more than `CHUNK_BYTES` of them go in chunks of
clients, a pass each). The server adds them up per group (`server_sum`).
(Threefry-2x32's key is 64 bits: a 16-byte seed is folded into it. A
deployment expands masks with AES-CTR or ChaCha20 keyed by the full seed;
the arithmetic is the same.)

Dropouts (`--dropout`, late clients). A sampled client j whose upload
never arrives leaves its pairwise masks in its reporting neighbours'
uploads. The server asks the reporting neighbours for their shares: of j's
private key (for the dropped j; t of them rebuild sk_j, and with it the
seeds s_ij with j's reporting neighbours i) and of b_i (for every reporting
i, whose self-mask it then removes). An honest client hands over only one
of the two for any client. Too few reporting holders for a client (fewer
than t) cannot be recovered: `RecoveryError` names the clients. A client
whose private key the server has rebuilt draws a new key pair (and shares)
before it takes part again, or its later uploads would be exposed by its
rebuilt key together with its self-mask; the key agreement is otherwise
once per run, and every round derives its masks from the pair seeds and
its round number.

What this does not simulate: the network, signatures against an active
server, and the consistency checks of the protocol's rounds; clients not
sampled in a round (`--clients_per_round`) would need a graph per round
(`afl.catalog` rejects the combination).
"""

import math
import time
from typing import Callable, NamedTuple

from Crypto.Protocol.SecretSharing import Shamir
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
import jax
import jax.numpy as jnp
import numpy as np

from afl import models
from afl import privacy
from afl import rng as rng_lib
from afl import solve
from afl import statistics
from afl import timing
from afl.data import pipeline

RING_BITS = 64
# Sums stay below 2^(RING_BITS - HEADROOM_BITS) in magnitude: they read back
# as signed 64-bit integers with a factor 2 to spare.
HEADROOM_BITS = 2
# A client's Gaussian noise is taken to stay within NOISE_TAILS stds on
# every entry (the chance of one entry beyond: about 1e-15 at 8).
NOISE_TAILS = 8.0
SEED_BYTES = 16  # Shamir's secret size (pycryptodome)
SEED_WORDS = SEED_BYTES // 4
PAIR_INFO = b"afl.secure_sum pairwise mask seed"
# The uploads of one chunk of clients at a time: at most about this many
# bytes (MNIST-MLP's first layer: all of 100 clients, 2.5 MB each).
CHUNK_BYTES = 512 * 2**20

# The largest |x| of each dataset's preprocessed inputs (`afl.data.pipeline`).
DATA_BOUNDS = {
    "mnist": 1.0,
    "cifar10": float(
        np.max(
            np.abs(
                (np.array([[0.0], [1.0]]) - pipeline.CIFAR10_MEAN)
                / pipeline.CIFAR10_STD
            )
        )
    ),
}

_BOUNDED_ACTIVATIONS = ("identity", "relu", "leaky_relu")  # |f(z)| <= |z|


class RecoveryError(RuntimeError):
  """Too few surviving neighbours hold shares to unmask a round's sum."""


class Encoding(NamedTuple):
  """Fixed-point encoding of one layer's statistics (module docstring).

  Attributes:
    row_bound: M_l, the largest |entry| of a design row.
    total_rows: R, all clients' design rows.
    scales: s_f of (gram, label_sums, label_counts), powers of two.
  """

  row_bound: float
  total_rows: int
  scales: tuple[float, float, float]

  def quantization_bound(self, num_clients: int) -> tuple[float, ...]:
    """The largest error per entry of a decoded sum of `num_clients`
    clients, per field."""
    return tuple(num_clients / (2 * s) for s in self.scales)

  def describe(self, num_clients: int) -> dict:
    return {
        "row_bound": self.row_bound,
        "total_rows": self.total_rows,
        "scales_log2": [math.log2(s) for s in self.scales],
        "quantization_bound": list(self.quantization_bound(num_clients)),
    }


def encoding_for(
    row_bound: float, total_rows: int, noise: float = 0.0
) -> Encoding:
  """The scales for rows bounded by `row_bound` (module docstring) whose
  sums carry noise of at most `noise` per entry (differential privacy:
  NOISE_TAILS times the sum of the clients' noise stds)."""
  largest = 2.0 ** (RING_BITS - HEADROOM_BITS)
  bounds = (
      total_rows * row_bound**2 + noise,
      total_rows * row_bound + noise,
      total_rows + noise,
  )
  scales = tuple(
      2.0 ** math.floor(math.log2(largest / max(b, 1.0))) for b in bounds
  )
  return Encoding(float(row_bound), int(total_rows), scales)


def row_bound(
    model: models.LayerwiseNet,
    encodings,
    solutions,
    input_bound: float,
) -> float:
  """M_l of layer l = len(solutions) from the solved P_j [K, d, d_y] of the
  layers before it (W_j = P_j Q_j) and the inputs' bound (module
  docstring), with 0.1% to spare for the float32 forward pass."""
  bound = float(input_bound)
  for layer, solution in enumerate(solutions):
    activation = model.stages[layer].activation
    if activation not in _BOUNDED_ACTIVATIONS:
      raise ValueError(
          f"--secure_sum bounds the rows after activation {activation!r} "
          f"only for {_BOUNDED_ACTIVATIONS}"
      )
    weights = np.asarray(solution, np.float64) @ np.asarray(
        encodings[layer], np.float64
    )  # [K, d, d_out]
    bound = float(
        np.max(bound * np.abs(weights[:, :-1]).sum(1) + np.abs(weights[:, -1]))
    )
  return bound * 1.001


def check_inputs(inputs: np.ndarray, client_indices, bound: float) -> None:
  """Raises ValueError naming the clients whose inputs exceed `bound` (a
  client checks its own; a deployment would clip)."""
  flat = np.abs(np.asarray(inputs).reshape(len(inputs), -1)).max(1)
  over = [
      (i, float(flat[idx].max()))
      for i, idx in enumerate(client_indices)
      if len(idx) and flat[idx].max() > bound
  ]
  if over:
    named = ", ".join(f"client {i}: {v:.4g}" for i, v in over[:5])
    raise ValueError(
        f"--secure_sum's input bound {bound:g} is exceeded by the largest "
        f"|x| of {len(over)} client(s) ({named}); set --secure_sum_bound"
    )


# Encoding and masking on the devices.


def _upper(gram: jax.Array) -> jax.Array:
  """[..., d (d + 1) / 2] the upper triangle of symmetric [..., d, d]."""
  rows, cols = np.triu_indices(gram.shape[-1])
  return gram[..., rows, cols]


def upload_size(width: int, num_classes: int) -> int:
  """Ring elements per client upload of a layer of d - 1 = `width`: the
  gram's upper triangle, the label sums and the counts."""
  return width * (width + 1) // 2 + width * num_classes + num_classes


def encode(stats: statistics.Statistics, scales) -> jax.Array:
  """[..., m] uint64: round(x s_f) mod 2^64 of every field, flattened."""
  lead = stats.label_counts.shape[:-1]
  parts = [
      _upper(stats.gram) * scales[0],
      stats.label_sums.reshape(lead + (-1,)) * scales[1],
      stats.label_counts * scales[2],
  ]
  fixed = jnp.round(jnp.concatenate(parts, -1)).astype(jnp.int64)
  return jax.lax.bitcast_convert_type(fixed, jnp.uint64)


def decode(
    total: jax.Array, scales, width: int, num_classes: int
) -> statistics.Statistics:
  """Statistics [..., ...] float64 of ring sums [..., m] (`encode`'s
  inverse up to the quantization)."""
  signed = jax.lax.bitcast_convert_type(total, jnp.int64).astype(jnp.float64)
  lead = total.shape[:-1]
  triangle = width * (width + 1) // 2
  upper = signed[..., :triangle] / scales[0]
  rows, cols = np.triu_indices(width)
  gram = jnp.zeros(lead + (width, width), jnp.float64)
  gram = gram.at[..., rows, cols].set(upper).at[..., cols, rows].set(upper)
  label_sums = signed[..., triangle : triangle + width * num_classes]
  label_sums = label_sums.reshape(lead + (width, num_classes)) / scales[1]
  counts = signed[..., triangle + width * num_classes :] / scales[2]
  return statistics.Statistics(gram, label_sums, counts)


def prg(seed: jax.Array, counter, size: int) -> jax.Array:
  """[size] uint64 words of the counter-based generator (threefry) keyed
  by a seed [SEED_WORDS] uint32 and the round `counter`."""
  key = jax.random.wrap_key_data(seed[:2], impl="threefry2x32")
  for word in range(2, SEED_WORDS):
    key = jax.random.fold_in(key, seed[word])
  key = jax.random.fold_in(key, counter)
  return jax.random.bits(key, (size,), jnp.uint64)


def client_masks(seeds: jax.Array, signs: jax.Array, counter, size: int):
  """[size] uint64: sum_j signs[j] PRG(seeds[j], counter) mod 2^64: one
  client's masks, or one group's corrections.

  Args:
    seeds: [slots, SEED_WORDS] uint32.
    signs: [slots] int32 in {-1, 0, +1} (0: an unused slot).
  """

  def term(slot):
    words = prg(seeds[slot], counter, size)
    sign = signs[slot]
    negative = jnp.uint64(0) - words
    return jnp.where(sign > 0, words, jnp.where(sign < 0, negative, 0))

  # The first term starts the sum (a zeros carry would not be varying over
  # the devices inside `federated.segment_sum`'s shard_map).
  return jax.lax.fori_loop(
      1, seeds.shape[0], lambda slot, total: total + term(slot), term(0)
  )


def upload(stats, client, seeds, signs, counter, scales, noise_key, std=None):
  """What client `client` uploads: [m] uint64, its encoded statistics
  (`privatize`d first with noise std `std`; None: none) plus its masks
  (seeds [slots, .], signs [slots])."""
  if std is not None:
    stats = privatize(jax.random.fold_in(noise_key, client), stats, std)
  encoded = encode(stats, scales)
  return encoded + client_masks(seeds, signs, counter, encoded.shape[-1])


def finalize_upload(stats, segment, args):
  """`upload` as `federated.segment_sum`'s finalize: each client's upload
  formed on the device that completes its statistics, in the same pass
  (args: clients [n], seeds [n, slots, .], signs [n, slots], counter,
  scales, noise_key, stds [n] or None)."""
  clients, seeds, signs, counter, scales, noise_key, stds = args
  return upload(
      statistics.assembled(stats),
      clients[segment],
      seeds[segment],
      signs[segment],
      counter,
      scales,
      noise_key,
      None if stds is None else stds[segment],
  )


# The same, vmapped over clients [n] (statistics given, e.g. in tests).
masked_uploads = jax.jit(
    jax.vmap(upload, in_axes=(0, 0, 0, 0, None, None, None, 0))
)


@jax.jit
def mask_total(seeds, signs, counter, like) -> jax.Array:
  """[K, m] the masks that seeds [K, slots, .] leave in each group's sum."""
  return jax.vmap(client_masks, in_axes=(0, 0, None, None))(
      seeds, signs, counter, like.shape[-1]
  )


@jax.jit
def server_sum(uploads: jax.Array, segment: jax.Array, totals: jax.Array):
  """The server's one operation on uploads: add masked uploads [n, m] into
  their groups' totals [K, m] (mod 2^64); segment [n]: -1 for none."""
  kept = jnp.where((segment >= 0)[:, None], uploads, jnp.uint64(0))
  return totals + jax.ops.segment_sum(
      kept, jnp.maximum(segment, 0), totals.shape[0]
  )


def privatize(
    key: jax.Array, stats: statistics.Statistics, std
) -> statistics.Statistics:
  """A client's statistics with its noise (differential privacy,
  `afl.privacy.add_noise`: N(0, std^2) on every released entry, the gram
  symmetric) before they are encoded; the encoding's bound must hold the
  noise's tail (`encoding_for`'s noise)."""
  one = jax.tree.map(lambda a: a[None], stats)
  return jax.tree.map(lambda a: a[0], privacy.add_noise(key, one, std))


# The protocol's host side: keys, graph, shares.


def neighbour_graph(
    groups: np.ndarray, neighbours: int, generator: np.random.Generator
) -> list[np.ndarray]:
  """Each client's neighbours (sorted ids): a Harary graph of degree
  `neighbours` (rounded down to even) on a random ring of its group's
  members; a group of at most neighbours + 1 clients is complete."""
  graph = [np.zeros(0, np.int64)] * len(groups)
  for group in np.unique(groups):
    members = generator.permutation(np.flatnonzero(groups == group))
    size = len(members)
    if neighbours >= size - 1:
      for i in members:
        graph[i] = np.sort(members[members != i])
      continue
    offsets = np.arange(1, neighbours // 2 + 1)
    for position, i in enumerate(members):
      ring = np.concatenate([position + offsets, position - offsets]) % size
      graph[i] = np.sort(members[ring])
  return graph


def default_neighbours(num_clients: int) -> int:
  """SecAgg+'s k = O(log n): 2 ceil(log2 n)."""
  return max(2, 2 * math.ceil(math.log2(max(num_clients, 2))))


def _seed_words(seed: bytes) -> np.ndarray:
  return np.frombuffer(seed[:SEED_BYTES], np.uint32)


def _pair_seed(private: x25519.X25519PrivateKey, public: bytes) -> bytes:
  shared = private.exchange(x25519.X25519PublicKey.from_public_bytes(public))
  return HKDF(
      algorithm=hashes.SHA256(), length=32, salt=None, info=PAIR_INFO
  ).derive(shared)


def _private_bytes(private: x25519.X25519PrivateKey) -> bytes:
  return private.private_bytes(
      serialization.Encoding.Raw,
      serialization.PrivateFormat.Raw,
      serialization.NoEncryption(),
  )


def _public_bytes(private: x25519.X25519PrivateKey) -> bytes:
  return private.public_key().public_bytes(
      serialization.Encoding.Raw, serialization.PublicFormat.Raw
  )


class SecureSum:
  """SecAgg+ for the analytic rounds of one run (module docstring).

  Built once per run: the neighbour graph, every client's key pair and the
  shares of its private key. `aggregate` is one round.
  """

  def __init__(
      self,
      key: jax.Array,
      groups: np.ndarray,
      *,
      input_bound: float,
      neighbours: int = 0,
      threshold: int = 0,
  ):
    """
    Args:
      key: the run's root key (stream "secure_sum": the graph, the keys and
        self-mask seeds, so that a run is reproducible; a deployment's
        clients draw theirs from their own randomness).
      groups: [C] group of each client; each group is summed on its own.
      input_bound: the raw inputs' largest |x| (M_1).
      neighbours: k, 0: `default_neighbours` of the largest group.
      threshold: t, 0: a majority of each client's neighbours.
    """
    if jax.process_count() > 1:  # the protocol's host side is one process's
      raise ValueError("--secure_sum runs in one process")
    start = time.perf_counter()
    self.groups = np.asarray(groups, np.int64)
    self.num_clients = len(self.groups)
    self.num_groups = int(self.groups.max()) + 1
    self.input_bound = float(input_bound)
    self.key = rng_lib.stream(key, "secure_sum")
    self._generator = rng_lib.numpy_rng(key, "secure_sum")
    largest = int(np.bincount(self.groups).max())
    self.neighbours = neighbours or default_neighbours(largest)
    self.graph = neighbour_graph(self.groups, self.neighbours, self._generator)
    # Who holds a client's shares: its neighbours (a lone client: itself).
    self.holders = [
        graph if len(graph) else np.array([i])
        for i, graph in enumerate(self.graph)
    ]
    self.threshold = np.array(
        [min(threshold or len(h) // 2 + 1, len(h)) for h in self.holders]
    )
    slots = max(len(g) for g in self.graph)
    self._neighbour = np.full((self.num_clients, slots), -1, np.int64)
    for i, graph in enumerate(self.graph):
      self._neighbour[i, : len(graph)] = graph
    self._pair_seeds = np.zeros(
        (self.num_clients, slots, SEED_WORDS), np.uint32
    )
    self._private = [None] * self.num_clients
    self._public = [b""] * self.num_clients
    self._key_shares = [None] * self.num_clients
    self.recovered = []  # the clients whose private key was rebuilt
    for i in range(self.num_clients):
      self._new_key_pair(i)
    for i in range(self.num_clients):
      self._agree(i)
    self.setup_s = time.perf_counter() - start
    self.rounds = []

  # Client side.

  def _new_key_pair(self, i: int) -> None:
    """Client i's X25519 key pair, and its private key's shares (two
    16-byte halves) for its holders."""
    private = x25519.X25519PrivateKey.from_private_bytes(
        self._generator.bytes(32)
    )
    self._private[i], self._public[i] = private, _public_bytes(private)
    secret = _private_bytes(private)
    self._key_shares[i] = [
        self._split(i, secret[:SEED_BYTES]),
        self._split(i, secret[SEED_BYTES:]),
    ]

  def _split(self, i: int, secret: bytes) -> list:
    """Shamir shares of `secret`, share j for holders[i][j]."""
    return Shamir.split(int(self.threshold[i]), len(self.holders[i]), secret)

  def _agree(self, i: int) -> None:
    """Client i's pair seeds with all its neighbours (and theirs with it:
    X25519 gives both ends the same secret)."""
    for slot, j in enumerate(self.graph[i]):
      words = _seed_words(_pair_seed(self._private[i], self._public[j]))
      self._pair_seeds[i, slot] = words
      self._pair_seeds[j, list(self.graph[j]).index(i)] = words

  def upload_bytes(self, width: int, num_classes: int) -> int:
    """One client's upload of a layer's masked statistics, in bytes."""
    return upload_size(width, num_classes) * RING_BITS // 8

  def protocol_bytes(self, num_rounds: int) -> dict:
    """What a client sends besides its statistics in `num_rounds` rounds:
    its public key and its private key's shares (once; again after a
    re-keying) and its self-mask seed's shares (every round), each 16-byte
    share with a 1-byte index, one for each of its k holders."""
    share = SEED_BYTES + 1
    return {
        "public_key": 32,
        "key_shares": 2 * share * self.neighbours,
        "self_mask_shares": share * self.neighbours * num_rounds,
    }

  # One round.

  def aggregate(
      self,
      counter: int,
      client_uploads: Callable[[np.ndarray, tuple], jax.Array],
      encoding: Encoding,
      width: int,
      num_classes: int,
      sampled: np.ndarray | None = None,
      reported: np.ndarray | None = None,
      stds: np.ndarray | None = None,
  ) -> tuple[statistics.Statistics, dict]:
    """Round `counter`'s secure sums per group.

    Args:
      counter: the round (1-based); distinct rounds get distinct masks.
      client_uploads: (clients [n] ids, -1 for none; args) -> [n, m]
        uint64: each client's `upload` of its statistics, args being
        `upload`'s but the statistics, one entry per client (`masked_uploads`
        or `finalize_upload`); what is uploaded for -1 is ignored.
      encoding: the layer's `Encoding`.
      width: d - 1 of the layer; num_classes: d_y.
      sampled: [C] bool, the clients that take part (they mask with each
        other); None: all.
      reported: [C] bool, those whose uploads arrive; None: all sampled.
      stds: [C] the noise std each client adds to its statistics before
        encoding them (distributed or local differential privacy,
        `privatize`; `encoding` must hold its tail); None: no noise.

    Returns:
      Statistics [K] float64 per group (decoded) and the round's record.
    Raises:
      RecoveryError: too few surviving holders of some client's shares.
    """
    # Every phase is timed without compilation.
    with timing.CompileClock() as compiling:
      lap = [time.perf_counter(), 0.0]

      def seconds() -> float:
        """Since the last call, less what was compiled meanwhile."""
        now, compiled = time.perf_counter(), compiling.seconds
        elapsed = now - lap[0] - (compiled - lap[1])
        lap[:] = now, compiled
        return elapsed

      every = np.ones(self.num_clients, bool)
      sampled = every if sampled is None else np.asarray(sampled, bool)
      reported = sampled if reported is None else sampled & reported
      # Each sampled client draws its self-mask seed b_i and shares it.
      self_seeds = [self._generator.bytes(SEED_BYTES) for _ in every]
      self_shares = [
          self._split(i, self_seeds[i]) if sampled[i] else None
          for i in range(self.num_clients)
      ]
      seeds, signs = self._client_masks(self_seeds, sampled)
      host_s = seconds()

      # Clients encode and mask (on the devices, `client_uploads`) chunk by
      # chunk; the server adds the uploads that arrive into their groups'.
      size = upload_size(width, num_classes)
      chunk = max(1, min(self.num_clients, CHUNK_BYTES // (8 * size)))
      totals = jnp.zeros((self.num_groups, size), jnp.uint64)
      for first in range(0, self.num_clients, chunk):
        clients = np.arange(first, first + chunk)
        inside = clients < self.num_clients
        present = np.where(inside, clients, 0)
        arrives = inside & reported[present]
        uploads = client_uploads(
            np.where(arrives, clients, -1),
            (
                present,
                seeds[present],
                np.where(arrives[:, None], signs[present], 0),
                counter,
                encoding.scales,
                jax.random.fold_in(self.key, counter),
                None if stds is None else jnp.asarray(stds[present]),
            ),
        )
        segment = np.where(arrives, self.groups[present], -1)
        totals = server_sum(uploads, jnp.asarray(segment), totals)
      totals = jax.block_until_ready(totals)
      upload_s = seconds()
      corrections, recovered = self._unmask(
          counter, sampled, reported, self_shares
      )
      protocol_s = host_s + seconds()
      sums = decode(
          totals - mask_total(*corrections, counter, totals),
          encoding.scales,
          width,
          num_classes,
      )
      sums = jax.block_until_ready(sums)
      unmask_s = seconds()
      for j in recovered:  # the server knows sk_j now: j re-keys
        self._new_key_pair(j)
        self._agree(j)
      protocol_s += seconds()
      self.recovered.extend(recovered)
      record = {
          "secure_sum_recovered": recovered,
          "secure_sum_upload_bytes": self.upload_bytes(width, num_classes),
          # Without compilation: the host's keys and shares (the clients'
          # and the server's), the clients' pass with their uploads and the
          # server's sums, the server's removal of the left masks and decoding.
          "secure_sum_protocol_s": protocol_s,
          "secure_sum_upload_s": upload_s,
          "secure_sum_unmask_s": unmask_s,
          **{
              f"secure_sum_{k}": v
              for k, v in encoding.describe(int(reported.sum())).items()
          },
      }
      self.rounds.append(dict(record, round=counter))
      return sums, record

  def _client_masks(self, self_seeds, sampled):
    """[C, 1 + k, SEED_WORDS] seeds and [C, 1 + k] signs of every client's
    masks: its self-mask, then a pairwise mask per sampled neighbour."""
    seeds = np.concatenate(
        [
            np.stack([_seed_words(s) for s in self_seeds])[:, None],
            self._pair_seeds,
        ],
        1,
    )
    clients = np.arange(self.num_clients)[:, None]
    neighbour = self._neighbour
    pair_sign = np.where(neighbour > clients, 1, -1)
    active = (neighbour >= 0) & sampled[np.maximum(neighbour, 0)]
    signs = np.concatenate(
        [
            np.ones((self.num_clients, 1), np.int32),
            np.where(active, pair_sign, 0).astype(np.int32),
        ],
        1,
    )
    return seeds, signs

  # Server side: shares in, masks out.

  def _unmask(self, counter, sampled, reported, self_shares):
    """The masks left in each group's total, rebuilt from the shares that
    reporting clients hand over: [K, slots, SEED_WORDS] seeds and [K,
    slots] signs, and the dropped clients whose pairwise masks they are."""
    terms = [[] for _ in range(self.num_groups)]
    missing = []

    def holders_given(i):
      """Positions of client i's holders that reported, if enough."""
      given = [p for p, h in enumerate(self.holders[i]) if reported[h]]
      if len(given) < self.threshold[i]:
        missing.append((i, len(given)))
        return None
      return given[: self.threshold[i]]

    def combine(shares, positions):
      return Shamir.combine([shares[p] for p in positions])

    for i in np.flatnonzero(reported):
      positions = holders_given(i)
      if positions is not None:
        seed = combine(self_shares[i], positions)
        terms[self.groups[i]].append((_seed_words(seed), 1))
    recovered = []
    for j in np.flatnonzero(sampled & ~reported):
      survivors = [i for i in self.graph[j] if reported[i]]
      positions = holders_given(j) if survivors else None
      if positions is None:
        continue  # no upload holds j's masks, or too few shares
      private = x25519.X25519PrivateKey.from_private_bytes(
          b"".join(combine(half, positions) for half in self._key_shares[j])
      )
      for i in survivors:
        words = _seed_words(_pair_seed(private, self._public[i]))
        terms[self.groups[i]].append((words, 1 if i < j else -1))
      recovered.append(int(j))
    if missing:
      raise RecoveryError(
          f"secure sum, round {counter}: cannot unmask the sum of "
          f"{len(missing)} client(s)' masks: "
          + "; ".join(
              f"client {i} needs {self.threshold[i]} shares but only {n} of "
              f"its holders ({solve.listed(self.holders[i])}) reported"
              for i, n in missing[:5]
          )
          + (f"; and {len(missing) - 5} more" if len(missing) > 5 else "")
          + ". Unmasking needs at most k - t of each client's k holders "
          "to drop out (--secure_sum_neighbours, --secure_sum_threshold)."
      )
    slots = max(1, max(len(t) for t in terms))
    slots = 1 << (slots - 1).bit_length()  # few compiled shapes
    seeds = np.zeros((self.num_groups, slots, SEED_WORDS), np.uint32)
    signs = np.zeros((self.num_groups, slots), np.int32)
    for group, group_terms in enumerate(terms):
      for slot, (words, sign) in enumerate(group_terms):
        seeds[group, slot], signs[group, slot] = words, sign
    return (seeds, signs), recovered

  def summary(self) -> dict:
    """results.json's "secure_sum" section: the protocol's settings, and
    what the rounds that this process ran recovered and uploaded (a
    resumed run: the rounds since; the round records keep each round's)."""
    return {
        "ring_bits": RING_BITS,
        "neighbours": self.neighbours,
        "threshold": int(self.threshold.max()),
        "input_bound": self.input_bound,
        "setup_s": self.setup_s,
        # Per client, all rounds: the masked statistics (as many bytes as
        # the same statistics in float64, upper triangle of the gram) and
        # the protocol's keys and shares.
        "upload_bytes_per_client": {
            "statistics": sum(
                r["secure_sum_upload_bytes"] for r in self.rounds
            ),
            **self.protocol_bytes(len(self.rounds)),
        },
        "recovered_clients": sorted(set(self.recovered)),
        "rounds": self.rounds,
    }
