"""Checkpoints of a run in progress (orbax-checkpoint), for resuming it.

A checkpoint after round r holds everything the run loop needs to go on
from round r + 1 as if it had never stopped:

  leaves  the algorithm's state (any pytree: params, optimizer and server
          state, personal models, an event replay's tables, ...) as its
          leaves, host copies (orbax, OUTPUT_DIR/checkpoints/<r>/leaves);
  meta    JSON: the state's tree structure and which leaves were device
          arrays, the round, the per-round records and best accuracy so
          far, the times so far, the simulated clock's state, and the run's
          config (a rerun with another config is refused, naming the
          settings that differ).

Keys need no saving: every round's key is derived from the root key and the
round's index (`afl.rng`), so a resumed run draws what the uninterrupted
one drew, and its results are bit-identical. Device arrays are restored
whole on every device of the mesh (every algorithm's state is replicated;
the client data are not state). The last `MAX_TO_KEEP` checkpoints are
kept; they are removed once the run's results are written. The tree
structure is stored pickled (base64): restore only checkpoints you wrote.

With several processes every process takes part in each save and restore
(orbax writes host data from process 0); the folder must be shared.

orbax logs some 25 INFO lines per save through absl; the run prints its own
line when it resumes, so orbax's records below WARNING are dropped.
"""

import base64
import logging
import pathlib
import pickle
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

DIRECTORY = "checkpoints"
MAX_TO_KEEP = 3


def _not_orbax_info(record: logging.LogRecord) -> bool:
  return record.levelno >= logging.WARNING or "orbax" not in record.pathname


logging.getLogger("absl").addFilter(_not_orbax_info)


class Checkpoints:
  """The checkpoints of one output folder."""

  def __init__(self, output_dir: str | pathlib.Path):
    self.path = pathlib.Path(output_dir).absolute() / DIRECTORY
    self._manager = None

  @property
  def manager(self) -> ocp.CheckpointManager:
    if self._manager is None:
      self._manager = ocp.CheckpointManager(
          self.path,
          options=ocp.CheckpointManagerOptions(
              max_to_keep=MAX_TO_KEEP, enable_async_checkpointing=False
          ),
      )
    return self._manager

  def latest(self) -> int | None:
    """The round of the newest checkpoint, or None."""
    if not self.path.is_dir():
      return None
    return self.manager.latest_step()

  def save(self, index: int, state: Any, meta: dict) -> None:
    """Saves the state after round `index` with the loop's `meta` (JSON)."""
    leaves, treedef = jax.tree.flatten(state)
    kinds = [_kind(leaf) for leaf in leaves]
    stored = [np.asarray(leaf) for leaf in leaves]
    shapes = [list(a.shape) for a in stored]
    dtypes = [a.dtype.str for a in stored]
    payload = {
        **meta,
        "round": index,
        "treedef": base64.b64encode(pickle.dumps(treedef)).decode("ascii"),
        "kinds": kinds,
        "shapes": shapes,
        "dtypes": dtypes,
    }
    self.manager.save(
        index,
        args=ocp.args.Composite(
            # orbax refuses empty arrays; their shapes are in the meta.
            leaves=ocp.args.StandardSave([a for a in stored if a.size]),
            meta=ocp.args.JsonSave(payload),
        ),
    )
    self.manager.wait_until_finished()

  def size_bytes(self, index: int) -> int:
    """Bytes on disk of the checkpoint after round `index`."""
    folder = self.path / str(index)
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())

  def meta(self, index: int) -> dict:
    """The meta of the checkpoint after round `index`."""
    return self.manager.restore(
        index, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
    ).meta

  def restore(self, index: int, place) -> tuple[Any, dict]:
    """(state, meta) after round `index`; `place` puts a host array whole on
    every device (`Federation.replicated`)."""
    restored = self.manager.restore(
        index,
        args=ocp.args.Composite(
            leaves=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()
        ),
    )
    meta, stored = restored.meta, iter(restored.leaves)
    leaves = []
    for kind, shape, dtype in zip(
        meta["kinds"], meta["shapes"], meta["dtypes"]
    ):
      value = next(stored) if np.prod(shape) else np.zeros(shape, dtype)
      value = np.asarray(value, np.dtype(dtype))
      leaves.append(
          place(value)
          if kind == "device"
          else value.item()
          if kind == "python"
          else value
      )
    treedef = pickle.loads(base64.b64decode(meta["treedef"]))
    return jax.tree.unflatten(treedef, leaves), meta

  def remove(self) -> None:
    """Removes every checkpoint (on process 0; the run is complete)."""
    if self._manager is not None:
      self._manager.close()
      self._manager = None
    if jax.process_index() == 0:
      shutil.rmtree(self.path, ignore_errors=True)


def _kind(leaf) -> str:
  if isinstance(leaf, jax.Array):
    return "device"
  if isinstance(leaf, np.ndarray):
    return "host"
  return "python"
