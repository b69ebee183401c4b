"""Who takes part in a round: client sampling, dropouts and deadlines.

One plan serves every synchronous algorithm (the iterative baselines and
the analytic rounds that communicate); the run loop (`afl.runtime`) asks it
before every round that uploads something, then asks the simulated clock
(`afl.clock`) who missed the deadline, and hands the algorithm the clients
that reported.

Round r (1-based) of a run with C clients:

  sampled   `--clients_per_round` m of the C clients, drawn without
            replacement from the key `fold_in(stream(root, "participation"),
            r)` (0: all C; a value in (0, 1): that fraction of C, rounded,
            at least 1);
  dropped   each sampled client independently with probability
            `--dropout` (from the same round key): it does its work, which
            the clock counts, but its upload never arrives;
  late      sampled, not dropped, but arriving on the simulated clock after
            the server's deadline `--deadline_s` (the clock decides,
            `clock.Clock.round`);
  reported  sampled and neither dropped nor late: the clients whose uploads
            the server aggregates.

An explicit schedule (`--participation_file`, `load_schedule`) replaces the
draws, for tests and for replaying real traces: a [rounds, C] integer matrix
with 0 (sits the round out), 1 (reports) or 2 (drops out); row r - 1 is
round r. The deadline still applies on top of it.

Rounds are drawn independently of each other from the root key, so a
resumed run draws what the uninterrupted one drew.
"""

import pathlib
from typing import NamedTuple

import jax
import numpy as np

from afl import rng

SITS_OUT, REPORTS, DROPS = 0, 1, 2


class Participation(NamedTuple):
  """Round participation, [C] bool each (module docstring)."""

  sampled: np.ndarray
  dropped: np.ndarray
  late: np.ndarray

  @property
  def reported(self) -> np.ndarray:
    return self.sampled & ~self.dropped & ~self.late

  def record(self) -> dict:
    """The round record's counts and client ids."""
    ids = {
        name: np.flatnonzero(getattr(self, name)).tolist()
        for name in ("sampled", "dropped", "late")
    }
    return {
        "sampled": len(ids["sampled"]),
        "dropped": len(ids["dropped"]),
        "late": len(ids["late"]),
        "reported": int(self.reported.sum()),
        "participation": ids,
    }


def everyone(num_clients: int) -> Participation:
  """Every client sampled, none dropped or late."""
  none = np.zeros(num_clients, bool)
  return Participation(~none, none, none)


def num_sampled(clients_per_round: float, num_clients: int) -> int:
  """m of `--clients_per_round` (module docstring) for C clients."""
  if clients_per_round <= 0:
    return num_clients
  if clients_per_round < 1:
    return max(1, int(round(clients_per_round * num_clients)))
  if clients_per_round != int(clients_per_round):
    raise ValueError(
        "--clients_per_round must be a fraction in (0, 1) or a whole number "
        f"of clients, got {clients_per_round}"
    )
  if clients_per_round > num_clients:
    raise ValueError(
        f"--clients_per_round={int(clients_per_round)} exceeds "
        f"--num_clients={num_clients}"
    )
  return int(clients_per_round)


def load_schedule(path: str | pathlib.Path, num_clients: int) -> np.ndarray:
  """A participation schedule: [rounds, C] int8 of 0 / 1 / 2 (module
  docstring) from a .npy file or a text file (whitespace or commas, one
  round a line). Raises ValueError naming what is wrong."""
  path = pathlib.Path(path)
  name = f"--participation_file={path}"
  if not path.is_file():
    raise ValueError(f"{name}: no such file")
  try:
    if path.suffix == ".npy":
      schedule = np.load(path, allow_pickle=False)
    else:
      text = path.read_text().replace(",", " ")
      schedule = np.array(
          [line.split() for line in text.splitlines() if line.strip()],
          dtype=np.float64,
      )
  except ValueError as error:
    raise ValueError(f"{name} is not a matrix of numbers: {error}") from None
  if schedule.ndim != 2 or schedule.shape[1] != num_clients:
    raise ValueError(
        f"{name} holds a matrix of shape {schedule.shape}; expected one row "
        f"per round and one column per client ({num_clients})"
    )
  if not np.isin(schedule, (SITS_OUT, REPORTS, DROPS)).all():
    raise ValueError(
        f"{name} holds values other than 0 (sits out), 1 (reports) and 2 "
        "(drops out)"
    )
  return schedule.astype(np.int8)


class Plan:
  """Who is sampled and who drops out in each round (module docstring)."""

  def __init__(
      self,
      key: jax.Array,
      num_clients: int,
      clients_per_round: float = 0.0,
      dropout: float = 0.0,
      schedule: np.ndarray | None = None,
  ):
    if not 0 <= dropout < 1:
      raise ValueError(f"--dropout must be in [0, 1), got {dropout}")
    if schedule is not None and (clients_per_round or dropout):
      raise ValueError(
          "--participation_file replaces --clients_per_round and --dropout; "
          "set one or the other"
      )
    self.key = rng.stream(key, "participation")
    self.num_clients = num_clients
    self.num_sampled = num_sampled(clients_per_round, num_clients)
    self.dropout = dropout
    self.schedule = schedule

  def check_rounds(self, num_rounds: int) -> None:
    """Raises ValueError if the schedule has fewer rows than the run has
    rounds that upload."""
    if self.schedule is not None and len(self.schedule) < num_rounds:
      raise ValueError(
          f"--participation_file has {len(self.schedule)} rows but the run "
          f"has {num_rounds} rounds with uploads"
      )

  def draw(self, index: int) -> Participation:
    """Round `index`'s sampled and dropped clients (none late yet)."""
    none = np.zeros(self.num_clients, bool)
    if self.schedule is not None:
      row = self.schedule[index - 1]
      return Participation(row != SITS_OUT, row == DROPS, none)
    key = jax.random.fold_in(self.key, index)
    sampled = ~none
    if self.num_sampled < self.num_clients:
      chosen = jax.random.choice(
          jax.random.fold_in(key, 0),
          self.num_clients,
          (self.num_sampled,),
          replace=False,
      )
      sampled = none.copy()
      sampled[np.asarray(chosen)] = True
    dropped = none
    if self.dropout:
      fails = jax.random.bernoulli(
          jax.random.fold_in(key, 1), self.dropout, (self.num_clients,)
      )
      dropped = sampled & np.asarray(fails)
    return Participation(sampled, dropped, none)
