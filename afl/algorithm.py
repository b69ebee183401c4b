"""What every federated algorithm is: pure functions over its state.

An algorithm module's builder takes the algorithm's settings and a
`Federation` (the clients' data laid out over the devices, the model, the
clients' simulated hardware) and returns an `Algorithm` (optax / fedjax
style: the configuration lives in the closure, the state is a pytree that
every function returns anew):

  state = algorithm.init(key)
  state, metrics = algorithm.round(state, index, key, who)
                           # index = 1, 2, ..; who: the round's
                           # participation.Participation, None: everyone
  tested = algorithm.models(state, key)                  # None: no model yet
  work = algorithm.work(index, batch_size)               # for the clock

The one run loop (`afl.runtime`) calls them; what a round means is the
algorithm's: a layer or a personalization layer for the analytic
algorithms, a round of local training and a server step for the gradient
and zeroth-order ones, C applied updates of the asynchronous event replay
for PersA-FL.
"""

from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

from afl import clock as clock_lib
from afl import data as data_lib
from afl import distributed
from afl import federated
from afl import models

State = Any


class Tested(NamedTuple):
  """The models to test: params stacked on a leading axis and the index of
  each client's model among them."""

  params: Any  # [M, ...]
  client_model: np.ndarray  # [C] int


class Algorithm(NamedTuple):
  """A federated algorithm (module docstring).

  Attributes:
    init: root key of the stream "init" -> state.
    round: (state, index, key, who) -> (state, metrics): round `index`
      (1-based) with its key and who took part (`participation.
      Participation`: sampled, dropped, late; None: every client reports,
      the common case, which the algorithms keep fast); metrics
      is a flat dict of numbers and short strings for the round's record (a
      "local_loss" that is not finite stops the run as diverged).
    num_rounds: rounds in the run.
    models: (state, key) -> Tested, or None while the state holds no model
      to test (the analytic algorithms before their last layer).
    work: (index, batch sizes [C]) -> what every client did in round
      `index` (`clock.ClientWork`) for the synchronous simulated clock, or
      None for a round without communication; None: the algorithm keeps its
      own clock (its `summary` returns "timing").
    adaptive_batch_size: the clock adapts the batch sizes by eq. 7.
    summary: state -> dict of results.json fields of this algorithm.
    files: state -> {file name: content}: more files of the run's folder
      (the analytic algorithms' kept server state, `analytic.ServerState`).
    train_loss: the loop measures the tested models' training loss.
    layout: the client order of the training blocks the algorithm uses
      (`Federation.blocks`), or None: the clients' own order.
    upload_rounds: the rounds 1..upload_rounds are the ones in which
      clients upload (and can be sampled, drop out or be late); None: all.
    reports_final: the run's accuracy is its final model's, not the best
      tested round's (the analytic algorithms: their earlier models are
      stages of the final one, and the paper reports the final).
    model: the network the tested params are for, if not the federation's
      (a private analytic run's clips every layer's input rows,
      `afl.privacy`); None: the federation's.
  """

  init: Callable[[jax.Array], State]
  round: Callable[[State, int, jax.Array, Any], tuple[State, dict]]
  num_rounds: int
  models: Callable[[State, jax.Array], Tested | None]
  work: Callable[[int, np.ndarray], clock_lib.ClientWork | None] | None
  adaptive_batch_size: bool = False
  summary: Callable[[State], dict] = lambda state: {}
  files: Callable[[State], dict[str, bytes]] = lambda state: {}
  train_loss: bool = True
  layout: Sequence[int] | None = None
  upload_rounds: int | None = None
  reports_final: bool = False
  model: Any = None


def model_inputs(model: models.LayerwiseNet, x: np.ndarray) -> np.ndarray:
  """Samples flattened for a model whose first layer is Dense.

  The model would flatten them itself; doing it once on the host keeps every
  block contiguous, which makes the client map's products faster.
  """
  if isinstance(model.stages[0].layer, models.Dense):
    return x.reshape(len(x), -1)
  return x


class Federation:
  """The clients' data over the devices, and what every algorithm builds on.

  Attributes:
    split: the clients' samples (`afl.data.ClientSplit`).
    model: the network.
    inputs: [N, ...] the model's inputs (`model_inputs` of split.x).
    mesh: 1-D mesh over the devices of every process (axis 'clients').
    seed: the root seed (label encodings and K-means use it, `afl.rng`).
    key: the root key.
    block_size: rows per client block, or None for the default.
    profiles: the clients' simulated hardware (`clock.draw_profiles`).
    cost_model: the simulated clock's cost model of this host.
  """

  def __init__(
      self,
      split: data_lib.ClientSplit,
      model: models.LayerwiseNet,
      mesh: jax.sharding.Mesh,
      seed: int,
      block_size: int | None,
      profiles: clock_lib.DeviceProfiles,
      cost_model: clock_lib.CostModel,
  ):
    self.split, self.model, self.mesh = split, model, mesh
    self.seed, self.key = seed, jax.random.key(seed)
    self.block_size = block_size
    self.profiles, self.cost_model = profiles, cost_model
    self.inputs = model_inputs(model, split.x)
    self._blocks = {}

  @property
  def num_clients(self) -> int:
    return len(self.split.train_indices)

  @property
  def num_classes(self) -> int:
    return self.split.num_classes

  @property
  def input_shape(self) -> tuple[int, ...]:
    return tuple(self.inputs.shape[1:])

  @property
  def client_sizes(self) -> np.ndarray:
    """[C] training samples of each client."""
    return np.array([len(i) for i in self.split.train_indices], np.int64)

  @property
  def label_counts(self) -> np.ndarray:
    """[C, d_y] training samples of each class per client."""
    return data_lib.client_label_histograms(
        self.split.train_indices, self.split.y, self.num_classes
    )

  def blocks(
      self, part: str = "train", order: Sequence[int] | None = None
  ) -> federated.FederatedData:
    """The clients' `part` ("train" or "test") samples in blocks over the
    mesh (each process fills its own devices', `federated.distribute`),
    clients laid out in `order`; built once per (part, order)."""
    key = (part, None if order is None else tuple(int(c) for c in order))
    if key not in self._blocks:
      indices = {
          "train": self.split.train_indices,
          "test": self.split.test_indices,
      }[part]
      self._blocks[key] = federated.distribute(
          self.inputs, self.split.y, indices, self.mesh, self.block_size, order
      )
    return self._blocks[key]

  def replicated(self, tree):
    """Host arrays placed whole on every device of the mesh."""
    return distributed.replicate(tree, self.mesh)
