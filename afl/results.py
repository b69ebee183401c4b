"""A run's files: results.json and params.msgpack.

  OUTPUT_DIR/results.json    configuration, accuracy (best, last, per client,
                             per round), per-round records, times, memory;
  OUTPUT_DIR/params.msgpack  the tested models' Flax params (`load_params`).

Only process 0 writes (`distributed.is_main_process`). Each file is written
to a temporary name and renamed into place, so a reader never sees half a
file; an existing results.json is replaced only with `--overwrite`
(`check_output`, called before any work).
"""

import json
import os
import pathlib
import resource

import flax.serialization
import jax
import numpy as np

from afl import distributed

RESULTS = "results.json"
PARAMS = "params.msgpack"


def check_output(output_dir: str | os.PathLike, overwrite: bool) -> None:
  """Raises FileExistsError if output_dir holds results, unless overwrite."""
  path = pathlib.Path(output_dir) / RESULTS
  if path.exists() and not overwrite:
    raise FileExistsError(
        f"{path} exists; choose another --output_dir or pass --overwrite"
    )


def _write_atomically(path: pathlib.Path, payload: bytes) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_bytes(payload)
  os.replace(tmp, path)


def write(
    output_dir: str | os.PathLike, results: dict, params, client_model
) -> pathlib.Path | None:
  """Writes params.msgpack and results.json on process 0; returns the
  results' path there (None on the other processes)."""
  if not distributed.is_main_process():
    return None
  output_dir = pathlib.Path(output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  _write_atomically(
      output_dir / PARAMS,
      flax.serialization.msgpack_serialize(
          {
              "models": jax.tree.map(np.asarray, params),
              "client_model": np.asarray(client_model),
          }
      ),
  )
  path = output_dir / RESULTS
  _write_atomically(path, json.dumps(results, indent=2).encode("utf-8"))
  return path


def load_params(path: str | os.PathLike, client: int = 0):
  """The params of `client`'s model in params.msgpack, for `model.apply`.

  For FedACnnL and FedAvg every client has the global model; for pFedACnnL
  and pFedMe its own personalized model; for pFedACnnL-WP its group's
  meta-model.
  """
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / PARAMS
  saved = flax.serialization.msgpack_restore(path.read_bytes())
  index = int(saved["client_model"][client])
  return jax.tree.map(lambda a: a[index], saved["models"])


def peak_memory_gb() -> float:
  """Peak resident memory of this process so far (Linux ru_maxrss is KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
