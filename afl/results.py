"""A run's files: results.json and the params file it names.

  OUTPUT_DIR/results.json              configuration, status, accuracy
                                       (best, last, per client, per round),
                                       per-round records, times, memory;
  OUTPUT_DIR/params-<sha256>.msgpack   the tested models' Flax params
                                       (`load_params`), named by
                                       results.json's `params_file`;
  OUTPUT_DIR/split.npz                 the clients' train and test samples
                                       (`afl.data.files`; --split_file);
  OUTPUT_DIR/server_state.npz          the analytic algorithms' kept
                                       server state (`analytic.ServerState`,
                                       `afl.editing`).

The pair is written as one unit (`write`, process 0 only): the params go to
a file named by their hash, written to a temporary name, fsynced and renamed
(the other files likewise); then results.json, which names that file, the
same way; the rename of results.json is the commit; its "files" gives every
other file's size in bytes. A write killed at any point leaves results.json
naming a complete params file, the old pair or the new one, never a mix.
What a killed write leaves behind (a temporary file, a params file that no
results.json names) is removed by the next write. An existing results.json
is replaced only with `--overwrite` (`check_output`, before any work).
"""

import hashlib
import json
import os
import pathlib
import resource

import flax.serialization
import jax
import numpy as np

from afl import distributed

RESULTS = "results.json"
_TEMPORARY = ".tmp"


def check_output(output_dir: str | os.PathLike, overwrite: bool) -> None:
  """Raises FileExistsError if output_dir holds results, unless overwrite."""
  path = pathlib.Path(output_dir) / RESULTS
  if path.exists() and not overwrite:
    raise FileExistsError(
        f"{path} exists; choose another --output_dir or pass --overwrite"
    )


def _write_durably(path: pathlib.Path, payload: bytes) -> None:
  """path's content becomes payload at once (temporary file, fsync,
  rename, fsync of the folder)."""
  tmp = path.with_name(path.name + _TEMPORARY)
  with open(tmp, "wb") as f:
    f.write(payload)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  folder = os.open(path.parent, os.O_RDONLY)
  try:
    os.fsync(folder)
  finally:
    os.close(folder)


def write(
    output_dir: str | os.PathLike,
    results: dict,
    params,
    client_model,
    extra: dict[str, bytes] | None = None,
) -> dict:
  """Writes the params, the `extra` files (name -> content) and
  results.json (naming the params) as one unit, on process 0; returns the
  results as written (on every process)."""
  payload = flax.serialization.msgpack_serialize(
      {
          "models": jax.tree.map(np.asarray, params),
          "client_model": np.asarray(client_model),
      }
  )
  digest = hashlib.sha256(payload).hexdigest()
  name = f"params-{digest[:16]}.msgpack"
  results = dict(results, params_file=name, params_sha256=digest)
  if not distributed.is_main_process():
    return results
  output_dir = pathlib.Path(output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  _write_durably(output_dir / name, payload)
  for extra_name, content in (extra or {}).items():
    _write_durably(output_dir / extra_name, content)
  path = output_dir / RESULTS
  _write_durably(path, json.dumps(results, indent=2).encode("utf-8"))
  for stale in output_dir.glob("params-*.msgpack*"):
    if stale.name != name:
      stale.unlink()
  (output_dir / (RESULTS + _TEMPORARY)).unlink(missing_ok=True)
  return results


def params_path(output_dir: str | os.PathLike) -> pathlib.Path:
  """The params file that output_dir's results.json names."""
  output_dir = pathlib.Path(output_dir)
  results = json.loads((output_dir / RESULTS).read_text())
  return output_dir / results["params_file"]


def load_params(path: str | os.PathLike, client: int = 0):
  """The params of `client`'s model, for `model.apply`, from a run's folder
  (the file its results.json names) or a params file.

  For FedACnnL and FedAvg every client has the global model; for pFedACnnL
  and pFedMe its own personalized model; for pFedACnnL-WP its group's
  meta-model.
  """
  path = pathlib.Path(path)
  if path.is_dir():
    path = params_path(path)
  saved = flax.serialization.msgpack_restore(path.read_bytes())
  index = int(saved["client_model"][client])
  return jax.tree.map(lambda a: a[index], saved["models"])


_STATUS = pathlib.Path("/proc/self/status")


def reset_peak_memory() -> bool:
  """Starts this process's peak resident memory afresh from what it holds
  now (Linux: 5 to /proc/self/clear_refs resets VmHWM), so that each of
  several runs in one process reports its own peak; False where the
  system cannot (`peak_memory_gb` then gives the process's peak)."""
  try:
    pathlib.Path("/proc/self/clear_refs").write_text("5")
    return True
  except OSError:
    return False


def peak_memory_gb() -> float:
  """Peak resident memory since the last `reset_peak_memory` (VmHWM), or
  of the process so far where /proc has no VmHWM (ru_maxrss, KiB)."""
  try:
    for line in _STATUS.read_text().splitlines():
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 2**20  # kB
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
